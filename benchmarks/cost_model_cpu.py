"""Validate the cost model against ONNX Runtime latency measured on this machine's `cpu` target.

6 zoo families x 2 sequence lengths x 2 batch sizes x 3 pipelines (unfused fp32, fused fp32, fused
int8) = 72 configurations, plus 24 decode-like ones (wide GPT-2 and Llama layers on 1-4 tokens,
where the weights stream from memory): 96 in all, 8 families. Phase 1 (`--measure`) optimizes each
one, times the three pipelines of each model and shape interleaved with ONNX Runtime, and stores
the post-pass kernels with the median latency in cost_model_cpu.json. Phase 2 (always) fits a
calibration on half the model families and reports the error on the other half (unseen models),
prints the table and writes the markdown for RESULTS.md.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/cost_model_cpu.py --measure   # ~15 min, 2 cores
    python benchmarks/cost_model_cpu.py                                     # refit from JSON
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

HERE = Path(__file__).parent
DATA = HERE / "results" / "cost_model_cpu.json"
PIPELINES = {"fp32": "cleanup", "fused": "cleanup,fuse_attention",
             "int8": "cleanup,fuse_attention,quantize"}
# medium configs: big enough that GEMMs matter, small enough to run 72 of them in minutes
FAMILIES = {
    "minilm": ({}, (32, 128)),
    "bert": ({"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
              "intermediate_size": 1024, "vocab_size": 8000}, (32, 128)),
    "gpt2": ({"n_embd": 256, "n_layer": 4, "n_head": 4, "vocab_size": 8000}, (32, 128)),
    "llama": ({"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 8,
               "num_key_value_heads": 2, "intermediate_size": 704, "vocab_size": 8000},
              (32, 128)),
    "vit": ({"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
             "intermediate_size": 1024, "patch_size": 8}, (64, 128)),  # image size -> 64/256 tokens
    "dit": ({"num_layers": 4, "num_attention_heads": 4, "attention_head_dim": 64,
             "patch_size": 2}, (16, 32)),  # latent size -> 64/256 tokens
    # decode-like: 1-4 new tokens through wide layers, weight-streaming (memory-bound) GEMVs
    "gpt2-wide": ({"n_embd": 1536, "n_layer": 4, "n_head": 12, "vocab_size": 8000}, (1, 4)),
    "llama-wide": ({"hidden_size": 1536, "num_hidden_layers": 4, "num_attention_heads": 12,
                    "num_key_value_heads": 4, "intermediate_size": 4096, "vocab_size": 8000},
                   (1, 4)),
}
BATCHES = (1, 4)
FIT_FAMILIES = ("bert", "llama", "dit", "gpt2-wide")  # held out: minilm, gpt2, vit, llama-wide


def _load(family: str, size: int, batch: int):
    from optim import zoo

    overrides, _ = FAMILIES[family]
    if family == "vit":
        return zoo.load("vit", batch=batch, image_size=size, **overrides)
    if family == "dit":
        return zoo.load("dit", batch=batch, sample_size=size, **overrides)
    return zoo.load(family.split("-")[0], batch=batch, seq=size, **overrides)


def measure_all(out: Path) -> None:
    """Per (model, shape): optimize the three pipelines, then time the three ORT sessions
    interleaved in one loop, so drift on a shared machine hits all variants alike."""
    import optim
    from hardware.opcost import graph_kernels
    from optim.measure import measure

    rows = json.loads(out.read_text())["rows"] if out.exists() else []
    done = {(r["family"], r["size"], r["batch"]) for r in rows}
    groups = [(f, s, b) for f, (_, sizes) in FAMILIES.items() for s in sizes for b in BATCHES]
    for i, (fam, size, batch) in enumerate(groups):
        if (fam, size, batch) in done:
            continue
        t0 = time.perf_counter()
        z = _load(fam, size, batch)
        opts = {pipe: optim.optimize(z.model, "cpu", z.example_args, text,
                                     example_kwargs=z.example_kwargs, backend="onnxruntime",
                                     measure_latency=False, name=fam)
                for pipe, text in PIPELINES.items()}
        m = measure({pipe: (lambda o=o: o.artifact(*z.example_args, **z.example_kwargs))
                     for pipe, o in opts.items()}, min_runs=15, budget_s=8.0)
        for pipe, o in opts.items():
            rows.append({"family": fam, "size": size, "batch": batch, "pipeline": pipe,
                         "median_ms": m[pipe]["median_ms"], "p10_ms": m[pipe]["p10_ms"],
                         "p90_ms": m[pipe]["p90_ms"], "runs": m[pipe]["runs"],
                         "machine": m[pipe]["machine"],
                         "kernels": [k.to_dict() for k in graph_kernels(o.graph)]})
        out.write_text(json.dumps({"rows": rows}, indent=1))
        print(f"[{i + 1}/{len(groups)}] {fam} size={size} batch={batch}: " + ", ".join(
            f"{p} {m[p]['median_ms']:.2f} ms" for p in PIPELINES)
            + f" ({time.perf_counter() - t0:.0f} s)", flush=True)


def rekernel(data: dict) -> dict:
    """Recompute every row's kernels from its configuration (no timing): the measured latencies
    stay, the cost model's view of the graphs follows the current hardware/opcost.py."""
    import optim
    from hardware.opcost import graph_kernels

    cache = {}
    for r in data["rows"]:
        key = (r["family"], r["size"], r["batch"], r["pipeline"])
        if key not in cache:
            z = _load(r["family"], r["size"], r["batch"])
            om = optim.optimize(z.model, "cpu", z.example_args, PIPELINES[r["pipeline"]],
                                example_kwargs=z.example_kwargs, backend="torch",
                                measure_latency=False, name=r["family"])
            cache[key] = [k.to_dict() for k in graph_kernels(om.graph)]
        r["kernels"] = cache[key]
    return data


def evaluate(data: dict) -> str:
    from hardware.calibrate import fit, score, spearman
    from hardware.costmodel import default_calibration, estimate_kernels
    from hardware.cpu_probe import probe
    from hardware.opcost import Kernel
    from optim.targets import resolve_target

    spec = resolve_target("cpu").spec
    rows = data["rows"]
    graphs = [[Kernel.from_dict(k) for k in r["kernels"]] for r in rows]
    meas = [r["median_ms"] / 1e3 for r in rows]
    train = [i for i, r in enumerate(rows) if r["family"] in FIT_FAMILIES]
    test = [i for i, r in enumerate(rows) if r["family"] not in FIT_FAMILIES]
    cal = fit(spec, [graphs[i] for i in train], [meas[i] for i in train],
              source=f"fit on {len(train)} ORT configs ({', '.join(FIT_FAMILIES)})")
    pred = [estimate_kernels(g, spec, cal).seconds for g in graphs]
    raw = [estimate_kernels(g, spec, default_calibration(spec)).seconds for g in graphs]
    s_test = score([pred[i] for i in test], [meas[i] for i in test])
    s_train = score([pred[i] for i in train], [meas[i] for i in train])
    s_raw = score([raw[i] for i in test], [meas[i] for i in test])
    # rank agreement across the 3 pipeline variants of each held-out (model, shape)
    groups: dict = {}
    for i in test:
        r = rows[i]
        groups.setdefault((r["family"], r["size"], r["batch"]), []).append(i)
    per_group = [spearman([pred[i] for i in g], [meas[i] for i in g]) for g in groups.values()]
    per_group = [x for x in per_group if x == x]
    # pipeline pairs of one (model, shape) whose measured latencies differ by more than the noise
    pairs = [(i, j) for g in groups.values() for a, i in enumerate(g) for j in g[a + 1:]
             if abs(meas[i] - meas[j]) / min(meas[i], meas[j]) > 0.05]
    ordered = sum((pred[i] < pred[j]) == (meas[i] < meas[j]) for i, j in pairs)
    c = Console(width=130)
    t = Table(title="cost model vs ONNX Runtime on this CPU (held-out families marked *)")
    for col in ("model", "size", "batch", "pipeline", "measured ms", "predicted ms", "error",
                "bound"):
        t.add_column(col, justify="right" if col not in ("model", "pipeline") else "left")
    for i, r in enumerate(rows):
        est = estimate_kernels(graphs[i], spec, cal)
        t.add_row(r["family"] + ("*" if i in test else ""), str(r["size"]), str(r["batch"]),
                  r["pipeline"], f"{meas[i] * 1e3:.2f}", f"{pred[i] * 1e3:.2f}",
                  f"{(pred[i] - meas[i]) / meas[i]:+.0%}", est.bound)
    c.print(t)
    lines = [
        f"Calibration fitted on {len(train)} configs ({', '.join(FIT_FAMILIES)}); "
        f"held out: {len(test)} configs of unseen models "
        f"({', '.join(sorted({rows[i]['family'] for i in test}))}).",
        "",
        "| set | n | MAPE | within ±10% | within ±25% | Spearman (all) "
        "| Spearman within (model, shape) | pipeline pairs >5% apart ordered right |",
        "|---|---|---|---|---|---|---|---|",
        f"| held out | {s_test['n']} | {s_test['mape']:.1%} | {s_test['within_10']:.0%} | "
        f"{s_test['within_25']:.0%} | {s_test['spearman']:.3f} | "
        f"{np.mean(per_group):.3f} over {len(per_group)} groups | {ordered}/{len(pairs)} |",
        f"| fit set | {s_train['n']} | {s_train['mape']:.1%} | {s_train['within_10']:.0%} | "
        f"{s_train['within_25']:.0%} | {s_train['spearman']:.3f} | | |",
        f"| held out, uncalibrated spec defaults | {s_raw['n']} | {s_raw['mape']:.1%} | "
        f"{s_raw['within_10']:.0%} | {s_raw['within_25']:.0%} | {s_raw['spearman']:.3f} | | |",
        "",
        "Fitted parameters: " + ", ".join(f"{k}={v:.3g}" for k, v in cal.fit["params"].items()),
        f"Machine: {rows[0]['machine']}; cpu spec: fp32 {spec.peak['fp32'].value / 1e9:.0f} "
        f"GFLOP/s, int8 {spec.peak['int8'].value / 1e9:.0f} GOP/s, streaming read "
        f"{spec.mem_bandwidth.value / 1e9:.1f} GB/s (measured).",
    ]
    from hardware.calibrate import save
    from optim.targets import calibration_path

    dest = calibration_path(spec, "onnxruntime", probe())
    save(cal, dest)
    lines.append(f"Saved the calibration to {dest}; `cpu` estimates on this machine use it.")
    md = "\n".join(lines)
    c.print(md)
    return md


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--measure", action="store_true", help="run the configs (resumes)")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--rekernel", action="store_true",
                    help="recompute kernels from the configs with the current cost model")
    a = ap.parse_args()
    if a.measure:
        measure_all(a.data)
    if not a.data.exists():
        print(f"no data at {a.data}; run with --measure first", file=sys.stderr)
        return 2
    data = json.loads(a.data.read_text())
    if a.rekernel:
        data = rekernel(data)
        a.data.write_text(json.dumps(data, indent=1))
    evaluate(data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
