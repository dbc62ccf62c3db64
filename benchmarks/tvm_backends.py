"""torch eager vs ONNX Runtime vs Apache TVM on this CPU, for MiniLM and a GPT-2-shaped decoder.

TVM rows: "stock" is TVM's own CPU path (Relax zero pipeline + dlight's CPU rules, the state
issue 4 started from; timed once, it takes seconds per call), "rules" is optim's schedule rules
with their untuned default tiles, "tuned" is the same with measured matmul tiles. All rows of a
model except stock are timed in ONE interleaved run; ratios are against ONNX Runtime in that run.
Compile columns: the first tuned build measures the tiles (fresh cache), the second reuses them.

Usage: python benchmarks/tvm_backends.py [--models minilm,gpt2]
       [--out benchmarks/results/tvm_backends.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from optim import zoo
from optim.measure import machine, measure
from optim.numerics import compare

MODELS = {
    "minilm": dict(name="minilm", batch=8, seq=128),
    # GPT-2 small's width, 6 of its 12 layers, its 50257-token LM head; prefill of 128 tokens
    "gpt2": dict(name="gpt2", batch=1, seq=128, n_layer=6, n_embd=768, n_head=12,
                 vocab_size=50257),
}


def stock_tvm(gm, args, kwargs):
    """TVM without optim's rules: the zero pipeline and dlight's CPU GEMV/reduction rules."""
    import tvm
    from tvm import relax
    from tvm.s_tir import dlight as dl

    from backends.tvm import TvmArtifact, to_relax
    from optim.kernels import host_target

    info = gm._graph._codegen.pytree_info
    mod, params = to_relax(gm, args, kwargs)
    tgt = tvm.target.Target(host_target())
    t0 = time.perf_counter()
    with tgt:
        mod = relax.get_pipeline("zero")(mod)
        mod = dl.ApplyDefaultSchedule(dl.cpu.GEMV(), dl.cpu.Reduction())(mod)
    ex = tvm.compile(mod, target=tgt)
    return TvmArtifact(ex, [p.numpy() for p in params["main"]], host_target(), info.in_spec,
                       info.out_spec, time.perf_counter() - t0, schedule="stock")


def bench(spec: dict, console: Console, with_stock: bool) -> list[dict]:
    import optim
    from backends import tvm as btvm

    spec = dict(spec)
    z = zoo.load(spec.pop("name"), batch=spec.pop("batch"), seq=spec.pop("seq"), **spec)
    model, a, k = z.model, z.example_args, z.example_kwargs
    console.print(f"[bold]{z.name}[/]: {z.description}")
    gm = optim.optimize(copy.deepcopy(model), "cpu", a, "cleanup,fuse_attention",
                        example_kwargs=k, backend="torch", measure_latency=False).graph
    with torch.no_grad():
        ref = model(*a, **k)
    ort = optim.optimize(copy.deepcopy(model), "cpu", a, "cleanup,fuse_attention",
                         example_kwargs=k, backend="onnxruntime", measure_latency=False)
    builds = {}
    with tempfile.TemporaryDirectory() as cache:
        os.environ["OPTIM_CACHE_DIR"] = cache  # a fresh tuning database
        t0 = time.perf_counter()
        builds["tvm rules (untuned)"] = (btvm.lower(gm, (a, k), None, btvm.TvmOptions()),
                                         time.perf_counter() - t0)
        t0 = time.perf_counter()
        builds["tvm tuned"] = (btvm.lower(gm, (a, k), None, btvm.TvmOptions(tune=True),
                                          console.print),
                               time.perf_counter() - t0)
        t0 = time.perf_counter()
        cached = btvm.lower(gm, (a, k), None, btvm.TvmOptions(tune=True))
        cache_hit_s = time.perf_counter() - t0
        assert cached.schedule == "tuned (cache hit)", cached.schedule
    cands = {"torch eager": lambda: model(*a, **k), "onnxruntime": lambda: ort(*a, **k)}
    cands |= {name: (lambda art=art: art(*a, **k)) for name, (art, _) in builds.items()}
    console.print("timing (interleaved)…")
    lat = measure(cands, min_runs=10, budget_s=60)
    rows = []
    for name, m in lat.items():
        art, compile_s = builds.get(name, (None, None))
        out = cands[name]()
        row = {"model": z.name, "runtime": name, "median_ms": m["median_ms"],
               "p10_ms": m["p10_ms"], "p90_ms": m["p90_ms"], "runs": m["runs"],
               "vs_onnxruntime": m["median_ms"] / lat["onnxruntime"]["median_ms"],
               "max_abs_error_vs_torch": compare(ref, out)["max_abs_error"]}
        if art is not None:
            row |= {"compile_s": round(compile_s, 1), "schedule": art.schedule}
            if name == "tvm tuned":
                row |= {"tuning_s": art.tuning["seconds"],
                        "cache_hit_compile_s": round(cache_hit_s, 1)}
        rows.append(row)
    if with_stock:
        console.print("stock TVM (one timed call after a warm-up)…")
        stock = stock_tvm(gm, a, k)
        stock(*a, **k)
        t0 = time.perf_counter()
        out = stock(*a, **k)
        ms = (time.perf_counter() - t0) * 1e3
        rows.append({"model": z.name, "runtime": "tvm stock (zero + dlight)", "median_ms": ms,
                     "runs": 1, "vs_onnxruntime": ms / lat["onnxruntime"]["median_ms"],
                     "max_abs_error_vs_torch": compare(ref, out)["max_abs_error"],
                     "compile_s": round(stock.compile_s, 1), "schedule": "stock",
                     "note": "timed after the interleaved run, not in it"})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="minilm,gpt2")
    ap.add_argument("--no-stock", action="store_true", help="skip the slow stock-TVM row")
    ap.add_argument("--out", default="benchmarks/results/tvm_backends.json")
    args = ap.parse_args()
    console = Console()
    rows = []
    for name in args.models.split(","):
        rows += bench(MODELS[name], console, not args.no_stock)
    t = Table(title=f"CPU runtimes, {torch.get_num_threads()} threads, {machine()['cpu']}")
    for col in ("model", "runtime", "median ms", "p10-p90 ms", "vs ORT", "max err vs torch",
                "compile s", "schedule"):
        t.add_column(col)
    for r in rows:
        spread = f"{r['p10_ms']:.0f}-{r['p90_ms']:.0f}" if "p10_ms" in r else "1 run"
        compile_s = r.get("compile_s", "")
        if "cache_hit_compile_s" in r:
            compile_s = f"{compile_s} (tuning {r['tuning_s']}); cached {r['cache_hit_compile_s']}"
        t.add_row(r["model"], r["runtime"], f"{r['median_ms']:.1f}", spread,
                  f"{r['vs_onnxruntime']:.2f}x", f"{r['max_abs_error_vs_torch']:.1e}",
                  str(compile_s), r.get("schedule", ""))
    console.print(t)
    Path(args.out).write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
