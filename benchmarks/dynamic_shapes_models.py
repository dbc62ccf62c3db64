"""One optimized model, many shapes: ViT-B/16 at three batch sizes, the trained digits ViT's
accuracy at three batch sizes, and GPT-2 prefill at three lengths.

Each model is optimized once (default `cpu` pipeline, dynamic shapes) at one example shape and
then called at the others; every latency is measured here, interleaved with the eager model at
the same shape (median ms, ratio eager / optimized). Random weights for ViT-B and GPT-2
(transformers configs), the digits ViT's own trained weights for accuracy.

    python benchmarks/dynamic_shapes_models.py
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import optim
from optim import zoo
from optim.measure import machine, measure
from optim.zoo import digits_vit

VIT_B = {"image_size": 224, "patch_size": 16, "num_hidden_layers": 12, "hidden_size": 768,
         "num_attention_heads": 12, "intermediate_size": 3072}
GPT2_SMALL = {"n_layer": 12, "n_embd": 768, "n_head": 12, "n_positions": 1024, "vocab_size": 50257}


def timed(console, label: str, eager, fast, batches: dict[str, tuple]) -> list[dict]:
    rows = []
    for shape, (args, kwargs) in batches.items():
        console.print(f"  {label} at {shape}")
        r = measure({"eager": lambda: eager(*args, **kwargs),
                     "optim": lambda: fast(*args, **kwargs)}, min_runs=5, budget_s=8)
        rows.append({"model": label, "shape": shape, "eager_ms": r["eager"]["median_ms"],
                     "optim_ms": r["optim"]["median_ms"],
                     "speedup": r["eager"]["median_ms"] / r["optim"]["median_ms"]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/dynamic_shapes_models.json")
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    console = Console()
    rows = []

    vit = zoo.load("vit", batch=2, **VIT_B)
    fast = optim.optimize(vit.model, "cpu", vit.example_args, measure_latency=False)
    rows += timed(console, "ViT-B/16", vit.model, fast,
                  {f"batch {b}": ((torch.randn(b, 3, 224, 224),), {}) for b in (1, 4, 8)})

    gpt = zoo.load("gpt2", batch=1, seq=64, **GPT2_SMALL)
    fast = optim.optimize(gpt.model, "cpu", gpt.example_args, example_kwargs=gpt.example_kwargs,
                          measure_latency=False)
    rows += timed(console, "GPT-2 small prefill", gpt.model, fast,
                  {f"1 x {n} tokens": ((torch.randint(0, 50257, (1, n)),), {"use_cache": False})
                   for n in (32, 128, 512)})

    digits = zoo.load("digits_vit", batch=64)
    fast = optim.optimize(digits.model, "cpu", digits.example_args, measure_latency=False)
    accuracy = {f"batch {b}": {"eager": digits_vit.accuracy(digits.model, b),
                               "optim": digits_vit.accuracy(fast, b)} for b in (360, 64, 7)}

    m = machine()
    table = Table(title=f"one optimized model, other shapes ({m['cpu']}, {m['threads']} threads)")
    for c in ("model", "shape", "eager ms", "optim ms", "speedup (same run)"):
        table.add_column(c)
    for r in rows:
        table.add_row(r["model"], r["shape"], f"{r['eager_ms']:.1f}", f"{r['optim_ms']:.1f}",
                      f"{r['speedup']:.2f}x")
    console.print(table)
    acc = Table(title="digits ViT top-1 on 360 held-out digits, optimized once at batch 64")
    for c in ("batch", "eager %", "optim %"):
        acc.add_column(c)
    for shape, v in accuracy.items():
        acc.add_row(shape, f"{v['eager']:.1f}", f"{v['optim']:.1f}")
    console.print(acc)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"machine": m, "latency": rows, "digits_accuracy": accuracy},
                                      indent=2))
    console.print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
