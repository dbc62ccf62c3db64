"""One symbolic TVM build against one static TVM build per shape, for MiniLM (fp32, exact
rewrites) at three shapes, with ONNX Runtime (dynamic axes) and torch eager as references;
then padding removal on TVM: 8 real sentences padded to 128 tokens, padded vs packed.

The dynamic build is tuned per shape bucket (its matmul kernels switch tile by bucket); each
static build is tuned for its own shape. All rows of one shape are timed in ONE interleaved run;
ratios are against that shape's static TVM build. Tuning records go to a fresh cache.

Usage: python benchmarks/tvm_dynamic.py [--out benchmarks/results/tvm_dynamic.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from optim import zoo
from optim.measure import machine, measure
from optim.numerics import compare

SHAPES = [(1, 16), (8, 128), (32, 64)]  # batch x tokens: one sentence, a padded batch, many


def _tokens(batch: int, seq: int) -> dict:
    g = torch.Generator().manual_seed(batch * 1000 + seq)
    return {"input_ids": torch.randint(1000, 20000, (batch, seq), generator=g),
            "attention_mask": torch.ones(batch, seq, dtype=torch.long)}


def _timed(cands: dict, ref, inputs: dict, label: str, baseline: str) -> list[dict]:
    """One interleaved run of `cands`; a row each, with its ratio to `baseline` and its max
    error against `ref` at real tokens. (The JSON key `vs_tvm_static` is that ratio.)"""
    lat = measure(cands, min_runs=10, budget_s=30)
    base = lat[baseline]["median_ms"]
    rows = []
    for name, m in lat.items():
        err = compare(ref, cands[name](), inputs["attention_mask"])["max_abs_error"]
        rows.append({"shape": label, "runtime": name, "median_ms": m["median_ms"],
                     "p10_ms": m["p10_ms"], "p90_ms": m["p90_ms"],
                     "vs_tvm_static": m["median_ms"] / base, "max_abs_error_vs_torch": err,
                     "baseline": baseline})
    return rows


def main() -> None:
    import optim

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/tvm_dynamic.json")
    args = ap.parse_args()
    console = Console()
    z = zoo.load("minilm", batch=4, seq=64)
    model = z.model

    def build(backend: str, example: dict, pipeline_override: str | None = None, **kw):
        return optim.optimize(copy.deepcopy(model), "cpu", example_kwargs=example,
                              pipeline=pipeline_override or "cleanup,fuse_attention",
                              backend=backend, measure_latency=False, progress=console.print,
                              **kw)

    with tempfile.TemporaryDirectory() as cache:
        os.environ["OPTIM_CACHE_DIR"] = cache
        tune = {"tune": True, "tune_budget_s": 900}
        dynamic = build("tvm", z.example_kwargs, backend_options=tune)
        ort = build("onnxruntime", z.example_kwargs)
        static = {s: build("tvm", _tokens(*s), backend_options=tune, dynamic=False)
                  for s in SHAPES}
        packed = build("tvm", z.example_kwargs, backend_options=tune,
                       pipeline_override="cleanup,fuse_attention,remove_padding")
    tuning = dynamic.report["backend"]["tuning"]
    rows = []
    for shape in SHAPES:
        inputs = _tokens(*shape)
        with torch.inference_mode():
            ref = model(**inputs)
        cands = {"torch eager": lambda: model(**inputs),
                 "onnxruntime (dynamic axes)": lambda: ort(**inputs),
                 "tvm static (built for this shape)": lambda: static[shape](**inputs),
                 "tvm dynamic (one build, buckets)": lambda: dynamic(**inputs)}
        console.print(f"timing {shape[0]} x {shape[1]} (interleaved)…")
        rows += _timed(cands, ref, inputs, f"{shape[0]} x {shape[1]}",
                       "tvm static (built for this shape)")
    from optim.zoo.data import sentences

    inputs = dict(z.tokenizer(sentences(8, seed=3), padding="max_length", max_length=128,
                              truncation=True, return_tensors="pt"))
    inputs = {k: inputs[k] for k in ("input_ids", "attention_mask")}
    real = int(inputs["attention_mask"].sum())
    with torch.inference_mode():
        ref = model(**inputs)
    cands = {"tvm dynamic, padded": lambda: dynamic(**inputs),
             "tvm dynamic + remove_padding": lambda: packed(**inputs)}
    console.print(f"timing 8 real sentences padded to 128 ({real} real tokens)…")
    rows += _timed(cands, ref, inputs, f"8 x 128 padded ({real} real)", "tvm dynamic, padded")
    t = Table(title=f"MiniLM fp32, {torch.get_num_threads()} threads, {machine()['cpu']}; "
                    f"dynamic build's buckets: {', '.join(tuning['buckets'])}")
    # ratio column: against the static build (or, for the padded rows, the padded model)
    for col in ("shape", "runtime", "median ms", "p10-p90 ms", "vs baseline", "max err"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["shape"], r["runtime"], f"{r['median_ms']:.2f}",
                  f"{r['p10_ms']:.2f}-{r['p90_ms']:.2f}", f"{r['vs_tvm_static']:.2f}x",
                  f"{r['max_abs_error_vs_torch']:.1e}")
    console.print(t)
    out = {"machine": machine(), "buckets": tuning["buckets"],
           "dispatched_per_bucket": tuning["dispatched_per_bucket"],
           "tuning_seconds": tuning["seconds"], "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
