"""How fast each linear attention could be if everything but its matrix products were free.

For one attention at L tokens (BERT-base shape: 12 heads × 64, batch 1) this times, in one
interleaved run, fused softmax attention (PyTorch SDPA) and each linear method's real ops
(`passes.linearize_attention.linear_attention.attend`, as `linearize_attention` splices them),
then splits each linear call into the time spent in its matrix-product kernels (aten mm, bmm,
baddbmm, addmm: timed per op inside the real call, so their caches are the real ones) and
everything else.

The GEMM time alone gives a ceiling: softmax ms / GEMM ms is the speedup the method would reach
if every other op (feature maps, masks, scans, normalization, copies) cost nothing. Where that
ceiling is under a target, no rearrangement of the other ops can reach it; only fewer FLOPs or
faster GEMM kernels can. The table also gives each method's GEMM FLOPs and the rate its GEMMs
ran at next to SDPA's (which does its own products inside one fused kernel).

Usage: python benchmarks/linear_attention_gemm_floor.py [--lengths 8192] [--runs 5]
       [--out benchmarks/results/linear_attention_gemm_floor.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

import passes.linearize_attention.linear_attention as la
from optim.measure import GemmTimer, machine
from passes.linearize_attention import LinearizeAttentionConfig, _initial_params

VARIANTS = {"elu": {"method": "elu"}, "flow": {"method": "flow"},
            "hedgehog": {"method": "hedgehog"}, "performer": {"method": "performer"},
            "performer/128": {"method": "performer", "features": 128}}
HEADS, HEAD_DIM = 12, 64


def attention_flops(n: int, causal: bool) -> float:
    """SDPA's FLOPs: q·kᵀ and p·v over all (or, causal, half of the) key positions."""
    return 4 * HEADS * n * n * HEAD_DIM * (0.5 if causal else 1.0)


def run(n: int, causal: bool, runs: int) -> dict:
    g = torch.Generator().manual_seed(n)
    q, k, v = torch.randn(3, 1, HEADS, n, HEAD_DIM, generator=g).unbind(0)
    scale = HEAD_DIM ** -0.5
    fns = {"softmax": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)}
    for name, opts in VARIANTS.items():
        cfg = LinearizeAttentionConfig(**opts)
        params = _initial_params(cfg, q.shape, scale)
        fns[name] = (lambda m=cfg.method, p=params:
                     la.attend(m, q, k, v, None, causal, scale, p))
    times = defaultdict(list)
    splits = defaultdict(list)
    # no_grad, not inference_mode: a Python dispatch mode sees no ops under inference_mode
    with torch.no_grad():
        for fn in fns.values():
            fn()
        for _ in range(runs):  # interleaved: plain calls of every candidate, then the splits
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1e3)
            for name, fn in fns.items():
                if name != "softmax":
                    with GemmTimer() as timer:
                        fn()
                    splits[name].append({"gemm_ms": timer.ms, "gemm_flops": timer.flops})
    softmax_ms = statistics.median(times["softmax"])
    rows = {"softmax": {"ms": softmax_ms, "flops": attention_flops(n, causal)}}
    for name in VARIANTS:
        gemm_ms = statistics.median(s["gemm_ms"] for s in splits[name])
        rows[name] = {"ms": statistics.median(times[name]), "gemm_ms": gemm_ms,
                      "gemm_flops": splits[name][0]["gemm_flops"]}
    return rows


def table(n: int, causal: bool, rows: dict, console: Console) -> None:
    sm = rows["softmax"]
    t = Table(title=f"{'causal' if causal else 'bidirectional'} attention, L={n} "
                    f"({HEADS}×{HEAD_DIM}, batch 1; {machine()['cpu']}, 2 threads): softmax "
                    f"{sm['ms']:.1f} ms, {sm['flops'] / sm['ms'] / 1e6:.0f} GFLOP/s")
    for c in ("method", "ms", "vs softmax", "GEMM ms", "other ms", "GEMM share",
              "GEMM GFLOP", "GEMM GFLOP/s", "ceiling: softmax / GEMM ms"):
        t.add_column(c)
    for name in VARIANTS:
        r = rows[name]
        t.add_row(name, f"{r['ms']:.1f}", f"{sm['ms'] / r['ms']:.2f}x", f"{r['gemm_ms']:.1f}",
                  f"{r['ms'] - r['gemm_ms']:.1f}", f"{r['gemm_ms'] / r['ms']:.0%}",
                  f"{r['gemm_flops'] / 1e9:.1f}", f"{r['gemm_flops'] / r['gemm_ms'] / 1e6:.0f}",
                  f"{sm['ms'] / r['gemm_ms']:.2f}x")
    console.print(t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="8192")
    ap.add_argument("--runs", type=int, default=5, help="interleaved rounds per length")
    ap.add_argument("--out", default="benchmarks/results/linear_attention_gemm_floor.json")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    console = Console(width=200)
    result = {"machine": machine(), "heads": HEADS, "head_dim": HEAD_DIM, "runs": args.runs}
    for n in (int(x) for x in args.lengths.split(",")):
        for causal in (False, True):
            rows = run(n, causal, args.runs)
            table(n, causal, rows, console)
            result[f"{'causal' if causal else 'bidirectional'}_{n}"] = rows
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
