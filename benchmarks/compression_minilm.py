"""Compression on the real all-MiniLM-L6-v2: structured sparsity (30%, 50%), low rank, weight
masks and binarization (`--only binarize --backend torch`: its packed kernel runs on torch),
each alone and followed by `distill_outputs` (output-matching training on the calibration
batches).

Heads and MLP neurons (sparsify) and input-channel RMS (low_rank) come from 64 calibration
sentences (`--calib`); 256 other real sentences measure
fidelity (mean-pooled embedding cosine, nearest-neighbour agreement) against the original
model. Latency: batch 8 × 128, every variant on the same backend, all timed in ONE interleaved
run; the ratio is against the unpruned graph (`cleanup,fuse_attention`) in that run.

Usage: python benchmarks/compression_minilm.py [--backend onnxruntime|torch] [--out ...json]
       [--only prefix,...] [--calib N] [--qat-lr LR]
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
from optim.zoo.data import sentences
from optim.zoo.tasks import sentence_batches, sentence_embedding_fidelity

DISTILL = {"distill_outputs": {"steps": 200, "lr": 1e-4}}
VARIANTS = {"dense": None,
            "sparsify 30%": {"sparsify": {"sparsity": 0.3, "reconstruct": False}},
            "sparsify 30% + refit": {"sparsify": {"sparsity": 0.3}},
            "sparsify 50%": {"sparsify": {"sparsity": 0.5, "reconstruct": False}},
            "sparsify 50% + refit": {"sparsify": {"sparsity": 0.5}},
            "sparsify 30% + refit + distill 200": [{"sparsify": {"sparsity": 0.3}}, DISTILL],
            "sparsify 50% + refit + distill 200": [{"sparsify": {"sparsity": 0.5}}, DISTILL],
            "low_rank energy 0.9": {"low_rank": {"energy": 0.9}},
            "low_rank flops 0.5": {"low_rank": {"flops": 0.5}},
            "low_rank flops 0.5, plain SVD": {"low_rank": {"flops": 0.5,
                                                           "activation_aware": False}},
            "low_rank flops 0.5 + distill 200": [{"low_rank": {"flops": 0.5}}, DISTILL],
            "prune_weights 50% wanda": {"prune_weights": {}},
            "prune_weights 50% magnitude": {"prune_weights": {"score": "magnitude"}},
            "prune_weights 2:4 wanda": {"prune_weights": {"pattern": "2:4"}},
            "prune_weights 2:4 wanda + distill 200": [{"prune_weights": {"pattern": "2:4"}},
                                                      DISTILL],
            "binarize W1A1, training-free": {"binarize": {"distill_steps": 0}},
            "binarize W1A1 + distill 100": {"binarize": {"distill_steps": 100}},
            "binarize W1A1 + distill 300": {"binarize": {"distill_steps": 300}},
            "binarize W1A1 + distill 100 + QAT 100": {"binarize": {"distill_steps": 100,
                                                                    "qat_steps": 100}},
            "binarize W1A1 + distill 100 + QAT 400": {"binarize": {"distill_steps": 100,
                                                                    "qat_steps": 400}},
            "binarize W1A32, training-free": {"binarize": {"activations": "float",
                                                           "distill_steps": 0}},
            "binarize W1A32 + distill 100": {"binarize": {"activations": "float",
                                                          "distill_steps": 100}}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--out", default="benchmarks/results/compression_minilm.json")
    ap.add_argument("--budget", type=float, default=30.0)
    ap.add_argument("--only", default="", help="comma-separated name prefixes to run (and dense)")
    ap.add_argument("--calib", type=int, default=64, help="calibration sentences (8 per batch)")
    ap.add_argument("--qat-lr", type=float, default=None, help="binarize qat_lr for QAT rows")
    args = ap.parse_args()
    only = [p for p in args.only.split(",") if p]
    variants = {k: v for k, v in VARIANTS.items()
                if k == "dense" or not only or any(k.startswith(p) for p in only)}
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    z = zoo.load("minilm", batch=8, seq=128)
    pool = sentences(256 + args.calib)
    calib = sentence_batches(z.tokenizer, pool[256:], 8, 128)
    evals = sentence_batches(z.tokenizer, pool[:256], 8, 128)
    models = {}
    for name, opts in variants.items():
        steps = opts if isinstance(opts, list) else [opts] if opts else []
        if args.qat_lr:
            steps = [{"binarize": {**s["binarize"], "qat_lr": args.qat_lr}}
                     if s.get("binarize", {}).get("qat_steps") else s for s in steps]
        pipe = ["cleanup", "fuse_attention", *steps]
        models[name] = optim.optimize(copy.deepcopy(z.model), "cpu", (), pipe,
                                      example_kwargs=evals[0][1], calibration=calib,
                                      backend=args.backend, measure_latency=False)
    kwargs = evals[0][1]
    stats = measure({k: (lambda om=om: om(**kwargs)) for k, om in models.items()},
                    min_runs=10, max_runs=60, budget_s=args.budget)
    dense_ms = stats["dense"]["median_ms"]
    rows = []
    for name, om in models.items():
        flops = sum(k.flops for k in om.stages[list(om.stages)[-1]]) / \
            sum(k.flops for k in om.stages["captured"])
        rows.append({"variant": name, "median_ms": stats[name]["median_ms"],
                     "speedup": dense_ms / stats[name]["median_ms"], "flops_fraction": flops,
                     "weight_bytes": om.report["model"]["weight_bytes_after"],
                     **sentence_embedding_fidelity(evals)(z.model, om)})
    t = Table(title=f"compression on MiniLM b8×128, {args.backend}, one interleaved "
                    f"run ({machine()['cpu']}, 2 threads)")
    for c in ("variant", "median ms", "speedup", "FLOPs", "weights MB", "emb. cosine mean / min",
              "NN agree"):
        t.add_column(c)
    for r in rows:
        t.add_row(r["variant"], f"{r['median_ms']:.1f}", f"{r['speedup']:.2f}x",
                  f"{r['flops_fraction']:.2f}", f"{r['weight_bytes'] / 1e6:.1f}",
                  f"{r['cosine_mean']:.3f} / {r['cosine_min']:.3f}",
                  f"{100 * r['neighbour_agreement']:.0f}%")
    Console(width=150).print(t)
    Path(args.out).write_text(json.dumps({"machine": machine(), "backend": args.backend,
                                          "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
