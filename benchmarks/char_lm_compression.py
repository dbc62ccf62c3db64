"""Compression of a decoder with real weights, judged by perplexity on real held-out text.

`char_lm` is a byte-level GPT-2 (4 layers, 128 wide) trained here on the Python reference
manual; perplexity is per byte on held-out topics (16 batches of 16 × 128 bytes). Calibration
for Wanda, GPTQ and sparsify uses 8 training batches. No speed is claimed here: these shapes
are tiny; the speed tables are in `benchmarks/RESULTS.md` (MiniLM, the Llama-shaped decoder).

Usage: python benchmarks/char_lm_compression.py [--out benchmarks/results/char_lm_compression.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import warnings
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import optim
from optim import zoo
from optim.measure import machine
from optim.zoo import char_lm

VARIANTS = {
    "fp32 (original)": None,
    "prune_weights 50% unstructured, magnitude": {"prune_weights": {"score": "magnitude"}},
    "prune_weights 50% unstructured, Wanda": {"prune_weights": {}},
    "prune_weights 2:4, Wanda": {"prune_weights": {"pattern": "2:4"}},
    "quantize_int4 g128, round-to-nearest": {"quantize_int4": {"method": "rtn"}},
    "quantize_int4 g128, GPTQ": {"quantize_int4": {"method": "gptq"}},
    "quantize_int4 g32, round-to-nearest": {"quantize_int4": {"method": "rtn", "group_size": 32}},
    "quantize_int4 g32, GPTQ": {"quantize_int4": {"method": "gptq", "group_size": 32}},
    "sparsify 30% (heads + neurons)": {"sparsify": {"sparsity": 0.3}},
    "quantize int8 per-token, no smoothing": {"quantize": {"smooth_alpha": 0.0}},
    "quantize int8 per-token + SmoothQuant 0.5": {"quantize": {"smooth_alpha": 0.5}},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/char_lm_compression.json")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    z = zoo.load("char_lm", batch=16, seq=128)
    calib = [((), {"input_ids": ids}) for ids in char_lm.batches("train", 16, 8, seed=2)]
    held_out = char_lm.batches("test", 16, 16, seed=1)
    base = char_lm.perplexity(z.model, held_out)
    rows = []
    for name, step in VARIANTS.items():
        if step is None:
            rows.append({"variant": name, "perplexity": base})
            continue
        pipe = ["cleanup", "fuse_attention", step]
        om = optim.optimize(copy.deepcopy(z.model), "cpu", (), pipe, backend="torch",
                            example_kwargs=z.example_kwargs, calibration=calib,
                            measure_latency=False)
        rows.append({"variant": name, "perplexity": char_lm.perplexity(om, held_out)})
    t = Table(title=f"char_lm (byte-level GPT-2 trained here), per-byte perplexity on held-out "
                    f"text ({machine()['cpu']})")
    for c in ("variant", "perplexity", "vs original"):
        t.add_column(c)
    for r in rows:
        t.add_row(r["variant"], f"{r['perplexity']:.3f}", f"{r['perplexity'] / base:.3f}x")
    Console(width=120).print(t)
    Path(args.out).write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
