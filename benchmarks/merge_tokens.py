"""Token merging (ToMe) throughput on this CPU: ViT-B/16 at 224² and a DiT-XL/2-shaped block stack.

Every row of a model is timed in ONE interleaved run against the unmerged model (same graph
after cleanup + fuse_attention, torch backend), so the throughput ratios are like for like.
Fidelity is the output cosine against the unmerged model on the same (random) inputs; accuracy
on real data is in `benchmarks/merge_tokens_accuracy.py`.

Usage: python benchmarks/merge_tokens.py [--batch 4] [--out benchmarks/results/merge_tokens.json]
       [--r 4,8,13,16] [--min-runs 5] [--no-dit]
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
from optim import numerics, zoo
from optim.measure import machine, measure

VIT_B16 = dict(image_size=224, patch_size=16, num_hidden_layers=12, hidden_size=768,
               num_attention_heads=12, intermediate_size=3072)
# DiT-XL/2's width and heads at 256² (32² latent, patch 2: 256 tokens), 8 of its 28 blocks
DIT = dict(sample_size=32, patch_size=2, num_layers=8, num_attention_heads=16,
           attention_head_dim=72)


def run_model(name: str, cfg: dict, schedules: dict, batch: int, console: Console,
              min_runs: int = 5) -> list[dict]:
    z = zoo.load(name, batch=batch, **cfg)
    a, k = z.example_args, z.example_kwargs
    console.print(f"[bold]{name}[/] {cfg}: batch {batch}")
    variants = {}
    for label, opts in schedules.items():
        console.print(f"  building {label}")
        pipe = ["cleanup", "fuse_attention"] + ([{"merge_tokens": {**opts, "gate": False}}]
                                                if opts else [])  # the curve: gate off
        om = optim.optimize(copy.deepcopy(z.model), "cpu", a, pipe, example_kwargs=k,
                            backend="torch", measure_latency=False)
        variants[label] = om
    with torch.no_grad():
        ref = variants["unmerged"](*a, **k)
    console.print("  timing (interleaved)")
    stats = measure({lbl: (lambda om=om: om(*a, **k)) for lbl, om in variants.items()},
                    min_runs=min_runs, max_runs=max(30, min_runs), budget_s=60)
    base = stats["unmerged"]["median_ms"]
    rows = []
    for label, om in variants.items():
        res = om.report.pass_result("merge_tokens") if label != "unmerged" else None
        blocks = res["details"]["blocks"] if res else []
        tokens = [b.get("tokens_out", b["tokens_in"]) for b in blocks]
        with torch.no_grad():
            fid = numerics.compare(ref, om(*a, **k))
        rows.append({"model": name, "variant": label, "median_ms": stats[label]["median_ms"],
                     "p10_ms": stats[label]["p10_ms"], "p90_ms": stats[label]["p90_ms"],
                     "runs": stats[label]["runs"], "throughput_x": base / stats[label]["median_ms"],
                     "tokens_last_block": tokens[-1] if tokens else None,
                     "mode": res["details"]["mode"] if res else None,
                     "cosine_min": fid["cosine_min"], "cosine_mean": fid["cosine_mean"]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--dit-batch", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/merge_tokens.json")
    ap.add_argument("--r", default="4,8,13,16", help="ViT merge schedules (r per block) to time")
    ap.add_argument("--min-runs", type=int, default=5)
    ap.add_argument("--no-dit", action="store_true")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    console = Console(width=150)
    vit = {"unmerged": None, **{f"r={r}": {"r": int(r)} for r in args.r.split(",")}}
    dit = {"unmerged": None, **{f"r={r}": {"r": r} for r in (64, 128, 192)}}
    rows = run_model("vit", VIT_B16, vit, args.batch, console, args.min_runs)
    if not args.no_dit:
        rows += run_model("dit", DIT, dit, args.dit_batch, console, args.min_runs)
    t = Table(title=f"merge_tokens throughput vs unmerged, one interleaved run per model "
                    f"({machine()['cpu']}, {torch.get_num_threads()} threads)")
    for c in ("model", "variant", "mode", "tokens at last block", "median ms (p10-p90)",
              "throughput", "output cosine min / mean"):
        t.add_column(c)
    for r in rows:
        t.add_row(r["model"], r["variant"], r["mode"] or "", str(r["tokens_last_block"] or ""),
                  f"{r['median_ms']:.1f} ({r['p10_ms']:.0f}-{r['p90_ms']:.0f})",
                  f"{r['throughput_x']:.2f}x",
                  f"{r['cosine_min']:.4f} / {r['cosine_mean']:.4f}")
    console.print(t)
    Path(args.out).write_text(json.dumps({"machine": machine(),
                                          "batch": {"vit": args.batch, "dit": args.dit_batch},
                                          "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
