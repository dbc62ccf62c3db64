"""Latency of linear vs fused softmax attention from L = 512 to 16384 tokens, on this CPU.

Two tables, each measured interleaved in one run:
1. one attention (BERT-base shape: 12 heads × 64, batch 1): fused softmax (PyTorch SDPA, the
   kernel optim::attention runs) against each linear method's ops, as `linearize_attention`
   splices them in (the same `passes.linearize_attention.linear_attention` functions),
   bidirectional and causal;
2. a whole encoder (2 BERT-base layers, 768 wide, batch 1) optimized by optim with
   `fuse_attention` alone and with `linearize_attention` (gate off, so every length is timed;
   the cost model's estimate for softmax and linear is printed next to the measurement).
The attention tables pass over all lengths `--rounds` times (3) and pool each length's samples,
so that a slow spell of the shared machine is spread over every length. The scaling exponent is
the slope of log(latency) over log(L), least squares over all lengths; each pass's own exponent
is printed too, as the spread within the run.

Usage: python benchmarks/linearize_attention.py [--lengths 512,1024,...] [--out ...json]
       [--rounds 3] [--budget 8] [--no-encoder] [--keep-freed-memory]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

import optim
import passes.linearize_attention.linear_attention as la
from optim import zoo
from optim.host_memory import keep_freed_memory
from optim.measure import machine, measure
from passes.linearize_attention import LinearizeAttentionConfig, _features, _initial_params

LENGTHS = (512, 1024, 2048, 4096, 8192, 16384)
METHODS = ("elu", "performer", "flow", "hedgehog")
# the attention tables also time performer with half its default features (2 × head_dim):
# the feature count is performer's speed/accuracy knob (`features`)
VARIANTS = {m: {"method": m} for m in METHODS} | {
    "performer/128": {"method": "performer", "features": 128}}
HEADS, HEAD_DIM = 12, 64


def exponent(lengths, ms) -> float:
    xs, ys = [math.log(x) for x in lengths], [math.log(y) for y in ms]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def attention_block(lengths, causal: bool, budget_s: float, rounds: int) -> dict:
    """Median ms per length and variant, from `rounds` passes over all lengths: a slow spell
    of this shared machine then lands on every length, not on the one being timed, and the
    fitted exponent no longer depends on when each length ran. Each pass's own medians are
    kept too (`rounds`), so the spread between passes of one run can be read."""
    scale = HEAD_DIM ** -0.5
    fns = {}
    for n in lengths:
        g = torch.Generator().manual_seed(n)
        q, k, v = torch.randn(3, 1, HEADS, n, HEAD_DIM, generator=g).unbind(0)
        fns[n] = {"softmax": (lambda q=q, k=k, v=v:
                              F.scaled_dot_product_attention(q, k, v, is_causal=causal))}
        for name, opts in VARIANTS.items():
            cfg = LinearizeAttentionConfig(**opts)
            params = _initial_params(cfg, q.shape, scale)
            fns[n][name] = (lambda m=cfg.method, p=params, q=q, k=k, v=v:
                            la.attend(m, q, k, v, None, causal, scale, p))
    samples = {n: {name: [] for name in fns[n]} for n in lengths}
    per_round = []
    for r in range(rounds):
        medians = {}
        for n in lengths:  # short calls: many samples, the long ones at least two per pass
            stats = measure(fns[n], warmup=1, min_runs=2, max_runs=200,
                            budget_s=budget_s / rounds, keep_samples=True)
            medians[n] = {name: st["median_ms"] for name, st in stats.items()}
            for name, st in stats.items():
                samples[n][name] += st["samples_ms"]
            print(f"pass {r + 1}/{rounds}, attention {'causal' if causal else 'bidirectional'} "
                  f"L={n}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in medians[n].items()),
                  flush=True)
        per_round.append(medians)
    ms = {n: {name: statistics.median(ts) for name, ts in samples[n].items()} for n in lengths}
    return {"ms": ms, "rounds": per_round,
            "samples": {n: {name: len(ts) for name, ts in samples[n].items()} for n in lengths}}


def encoder(lengths, budget_s: float) -> dict:
    out = {}
    for n in lengths:
        z = zoo.load("bert", batch=1, seq=n, num_hidden_layers=2, hidden_size=768,
                     num_attention_heads=HEADS, intermediate_size=3072, vocab_size=30522,
                     max_position_embeddings=n)
        kwargs = {**z.example_kwargs, "attention_mask": torch.ones(1, n, dtype=torch.long)}
        variants, estimates = {}, {}
        base = optim.optimize(copy.deepcopy(z.model), "cpu", (), ["cleanup", "fuse_attention"],
                              example_kwargs=kwargs, backend="torch", measure_latency=False)
        variants["softmax"] = base
        for m in METHODS:
            om = optim.optimize(copy.deepcopy(z.model), "cpu", (), [
                "cleanup", "fuse_attention",
                {"linearize_attention": {"method": m, "gate": False, "fit_steps": 0,
                                         "fit_batches": 1}}],
                example_kwargs=kwargs, backend="torch", measure_latency=False)
            variants[m] = om
            layers = om.report.pass_result("linearize_attention")["details"]["layers"]
            estimates[m] = {k: sum(la_["estimated_ms"][k] for la_ in layers)
                            for k in ("softmax", "linear")}
        stats = measure({k: (lambda om=om: om(**kwargs)) for k, om in variants.items()},
                        warmup=1, min_runs=3, max_runs=10, budget_s=budget_s)
        out[n] = {"measured_ms": {k: s["median_ms"] for k, s in stats.items()},
                  "estimated_attention_ms": estimates}
        print(f"encoder L={n}: " + ", ".join(f"{k} {s['median_ms']:.0f} ms"
                                              for k, s in stats.items()), flush=True)
    return out


def _table(title: str, rows: dict, names, console) -> dict:
    lengths = sorted(rows)
    t = Table(title=title)
    t.add_column("L")
    for name in names:
        t.add_column(f"{name} ms")
        if name != "softmax":
            t.add_column(f"{name} vs softmax")
    for n in lengths:
        cells = [str(n)]
        for name in names:
            cells.append(f"{rows[n][name]:.1f}")
            if name != "softmax":
                cells.append(f"{rows[n]['softmax'] / rows[n][name]:.2f}x")
        t.add_row(*cells)
    slopes = {name: exponent(lengths, [rows[n][name] for n in lengths]) for name in names}
    t.add_row("exponent", *[c for name in names for c in
                            ([f"{slopes[name]:.2f}"] + ([""] if name != "softmax" else []))])
    console.print(t)
    return slopes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    ap.add_argument("--out", default="benchmarks/results/linearize_attention.json")
    ap.add_argument("--budget", type=float, default=8.0, help="seconds of timing per length")
    ap.add_argument("--rounds", type=int, default=3,
                    help="passes over all lengths for the attention tables (samples pooled)")
    ap.add_argument("--no-encoder", action="store_true", help="time the attention alone only")
    ap.add_argument("--keep-freed-memory", action="store_true",
                    help="serve tensors from a heap that keeps freed pages (optim.host_memory): "
                         "no page faults for tensors over glibc's 32 MB mmap threshold")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    host_memory = "kept (keep_freed_memory)" if args.keep_freed_memory and keep_freed_memory() \
        else "glibc default (tensors over 32 MB are fresh pages)"
    lengths = [int(x) for x in args.lengths.split(",")]
    console = Console(width=200)
    names = ("softmax", *METHODS)
    result = {"machine": machine(), "host_memory": host_memory, "lengths": lengths,
              "heads": HEADS, "head_dim": HEAD_DIM,
              "features": {name: _features(LinearizeAttentionConfig(**opts),
                                           (1, HEADS, 1, HEAD_DIM))
                           * (2 if opts["method"] == "hedgehog" else 1)
                           for name, opts in VARIANTS.items()}}
    for causal in (False, True):
        block = attention_block(lengths, causal, args.budget, args.rounds)
        kind = "causal" if causal else "bidirectional"
        variant_names = ("softmax", *VARIANTS)
        slopes = _table(f"one attention, {kind} ({HEADS}×{HEAD_DIM}, batch 1; "
                        f"{machine()['cpu']}, 2 threads; {args.rounds} passes over the lengths, "
                        f"samples pooled; host memory: {host_memory})", block["ms"],
                        variant_names, console)
        spread = {name: [exponent(lengths, [rnd[n][name] for n in lengths])
                         for rnd in block["rounds"]] for name in variant_names}
        console.print("exponent of each pass alone: " + "; ".join(
            f"{name} " + " / ".join(f"{e:.2f}" for e in es) for name, es in spread.items()))
        result[f"attention_{kind}"] = {**block, "exponent": slopes, "exponent_per_round": spread}
        Path(args.out).write_text(json.dumps(result, indent=1))  # kept if a later part fails
    if args.no_encoder:
        Path(args.out).write_text(json.dumps(result, indent=1))
        return
    enc = encoder(lengths, args.budget)
    rows = {n: e["measured_ms"] for n, e in enc.items()}
    slopes = _table("2-layer BERT-base encoder (768 wide), optimized graphs, torch backend",
                    rows, names, console)
    est = Table(title="cost model (cpu) for the same encoder's attentions: estimated ms, "
                      "softmax vs linear (the gate rewrites where linear < softmax)")
    est.add_column("L")
    for m in METHODS:
        est.add_column(f"{m}: softmax / linear est.")
    for n, e in enc.items():
        est.add_row(str(n), *[f"{e['estimated_attention_ms'][m]['softmax']:.0f} / "
                              f"{e['estimated_attention_ms'][m]['linear']:.0f}" for m in METHODS])
    console.print(est)
    result["encoder"] = {"runs": enc, "exponent": slopes}
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
