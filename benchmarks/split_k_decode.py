"""Split-K decode attention (LeanAttention's idea, `optim.ops._attention_split`) against the one
batched matmul `optim::attention_decode` runs by default: one sequence, one new token, a long
cache; MQA (one KV head: the batched matmul has a single row block) and GQA. Same-run medians,
interleaved.

Usage: python benchmarks/split_k_decode.py [--out benchmarks/results/split_k_decode.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from optim import ops
from optim.measure import machine, measure


def case(kv_heads: int, group: int, slots: int, d: int = 64):
    q = torch.randn(1, kv_heads * group, 1, d)
    k, v = torch.randn(1, kv_heads, 1, d), torch.randn(1, kv_heads, 1, d)
    kc, vc = torch.randn(1, kv_heads, slots, d), torch.randn(1, kv_heads, slots, d)
    return (q, k, v, kc, vc, ops.cache_bias(torch.ones(1, slots, dtype=torch.bool)),
            ops.new_bias(torch.ones(1, 1), group), 0.125)


def run(args: tuple, split: bool):
    ops.SPLIT_K_ENABLED[0] = split
    try:
        return ops.attention_decode._init_fn(*args)
    finally:
        ops.SPLIT_K_ENABLED[0] = False


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/split_k_decode.json"))
    out = ap.parse_args().out
    torch.manual_seed(0)
    rows = []
    for kv_heads, group in ((1, 8), (2, 6)):
        for slots in (1024, 4096, 16384):
            args = case(kv_heads, group, slots)
            whole, split = run(args, False), run(args, True)
            m = measure({"one matmul": lambda a=args: run(a, False),
                         "split-K": lambda a=args: run(a, True)},
                        min_runs=30, max_runs=300, budget_s=4)
            ops.SPLIT_K_ENABLED[0] = True
            pieces = ops.split_k(kv_heads, slots)
            ops.SPLIT_K_ENABLED[0] = False
            rows.append({"kv_heads": kv_heads, "query_heads": kv_heads * group, "slots": slots,
                         "splits": pieces,
                         "one_matmul_us": m["one matmul"]["median_ms"] * 1e3,
                         "split_k_us": m["split-K"]["median_ms"] * 1e3,
                         "split_k_speedup": m["one matmul"]["median_ms"]
                         / m["split-K"]["median_ms"],
                         "max_error": float((whole[0] - split[0]).abs().max())})
            print(rows[-1])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
