"""Token merging on a ViT trained here on real data (scikit-learn digits): accuracy vs r.

The shipped `digits_vit` (65 tokens: 64 pixels + CLS, 4 blocks) is merged at several r; each
row gives the tokens left at the last block, top-1 accuracy on the 360 held-out digits, and the
throughput ratio against the unmerged model on that whole set, all variants timed interleaved in
one run.

Usage: python benchmarks/merge_tokens_accuracy.py
       [--out benchmarks/results/merge_tokens_accuracy.json]
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
from optim.measure import machine, measure
from optim.zoo import digits_vit

R_VALUES = (0, 2, 4, 6, 8, 10, 12, 16)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/merge_tokens_accuracy.json")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    console = Console(width=150)
    z = zoo.load("digits_vit", batch=360)
    x = z.example_args[0]
    variants, tokens = {}, {}
    for r in R_VALUES:
        pipe = ["cleanup", "fuse_attention"] + ([{"merge_tokens": {"r": r, "gate": False}}]
                                                if r else [])  # the curve: every r, gate off
        om = optim.optimize(copy.deepcopy(z.model), "cpu", (x,), pipe, backend="torch",
                            measure_latency=False)
        variants[r] = om
        res = om.report.pass_result("merge_tokens") if r else None
        tokens[r] = res["details"]["blocks"][-1]["tokens_out"] if res else 65
    stats = measure({r: (lambda om=om: om(x)) for r, om in variants.items()},
                    min_runs=10, max_runs=40, budget_s=30)
    base_ms = stats[0]["median_ms"]
    rows = [{"r": r, "tokens_last_block": tokens[r], "accuracy": digits_vit.accuracy(om),
             "median_ms": stats[r]["median_ms"], "throughput_x": base_ms / stats[r]["median_ms"]}
            for r, om in variants.items()]
    t = Table(title="merge_tokens on the digits ViT (360 held-out digits; "
                    f"{machine()['cpu']}, {torch.get_num_threads()} threads, one interleaved run)")
    for c in ("r", "tokens at last block", "top-1 %", "drop (points)", "median ms", "throughput"):
        t.add_column(c)
    for row in rows:
        t.add_row(str(row["r"]), str(row["tokens_last_block"]), f"{row['accuracy']:.1f}",
                  f"{rows[0]['accuracy'] - row['accuracy']:.1f}", f"{row['median_ms']:.1f}",
                  f"{row['throughput_x']:.2f}x")
    console.print(t)
    Path(args.out).write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
