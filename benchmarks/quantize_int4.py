"""Weight-only int4 (`quantize_int4`): decoder latency at decode-like shapes, GPTQ vs RTN quality.

1. A Llama-shaped decoder from config (4 layers, 2048 wide, MLP 5632, 16 heads / 4 KV heads,
   random weights), batch 1: one token (decode-like: every GEMM is a GEMV that streams its
   weights) and 128 tokens (prefill), fp32 vs int4 (group 128) on ONNX Runtime (MatMulNBits),
   timed interleaved in one run per shape. The LM head stays fp32 by default (`skip`); one
   variant quantizes it too.
2. all-MiniLM-L6-v2 on real sentences: round-to-nearest vs GPTQ at group 128 and 32, embedding
   fidelity against fp32 on 256 sentences (64 others calibrate GPTQ), mean per-layer SQNR.

Usage: python benchmarks/quantize_int4.py [--out benchmarks/results/quantize_int4.json]
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

LLAMA = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 4,
         "num_attention_heads": 16, "num_key_value_heads": 4, "vocab_size": 32000}


def decoder(budget: float) -> list[dict]:
    rows = []
    for seq in (1, 128):
        z = zoo.load("llama", batch=1, seq=seq, **LLAMA)
        variants = {}
        for name, extra in (("fp32", []),
                            ("int4 rtn g128", [{"quantize_int4": {"method": "rtn"}}]),
                            ("int4 rtn g128 + LM head", [{"quantize_int4": {
                                "method": "rtn", "skip": []}}])):
            variants[name] = optim.optimize(copy.deepcopy(z.model), "cpu", z.example_args,
                                            ["cleanup", "fuse_attention", *extra],
                                            example_kwargs=z.example_kwargs,
                                            backend="onnxruntime", measure_latency=False)
        stats = measure({k: (lambda om=om: om(*z.example_args, **z.example_kwargs))
                         for k, om in variants.items()}, min_runs=10, max_runs=200,
                        budget_s=budget)
        for name, om in variants.items():
            rows.append({"part": "decoder", "tokens": seq, "variant": name,
                         "median_ms": stats[name]["median_ms"],
                         "speedup": stats["fp32"]["median_ms"] / stats[name]["median_ms"],
                         "weight_mb": om.report["model"]["weight_bytes_after"] / 1e6})
        del variants
    return rows


def minilm(budget: float) -> list[dict]:
    z = zoo.load("minilm", batch=8, seq=128)
    pool = sentences(256 + 64)
    calib = sentence_batches(z.tokenizer, pool[256:], 8, 128)
    evals = sentence_batches(z.tokenizer, pool[:256], 8, 128)
    rows, models = [], {}
    for name, opts in (("int4 rtn g128", {"method": "rtn"}),
                       ("int4 gptq g128", {"method": "gptq"}),
                       ("int4 rtn g32", {"method": "rtn", "group_size": 32}),
                       ("int4 gptq g32", {"method": "gptq", "group_size": 32})):
        models[name] = optim.optimize(copy.deepcopy(z.model), "cpu", (),
                                      ["cleanup", "fuse_attention", {"quantize_int4": opts}],
                                      example_kwargs=evals[0][1], calibration=calib,
                                      backend="onnxruntime", measure_latency=False)
    for name, om in models.items():
        layers = om.report.pass_result("quantize_int4")["details"]["layers"]
        rows.append({"part": "minilm", "variant": name,
                     "sqnr_db_mean": sum(la["output_sqnr_db"] for la in layers) / len(layers),
                     **sentence_embedding_fidelity(evals)(z.model, om)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/quantize_int4.json")
    ap.add_argument("--budget", type=float, default=15.0)
    ap.add_argument("--part", choices=["all", "decoder", "minilm"], default="all")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    console = Console(width=150)
    dec = decoder(args.budget) if args.part != "minilm" else []
    t = Table(title=f"int4 weight-only on a Llama-shaped decoder (4 × 2048, batch 1), ONNX "
                    f"Runtime, one interleaved run per shape ({machine()['cpu']}, 2 threads)")
    for c in ("tokens", "variant", "median ms", "speedup vs fp32", "weights MB"):
        t.add_column(c)
    for r in dec:
        t.add_row(str(r["tokens"]), r["variant"], f"{r['median_ms']:.2f}",
                  f"{r['speedup']:.2f}x", f"{r['weight_mb']:.0f}")
    console.print(t)
    mini = minilm(args.budget) if args.part != "decoder" else []
    t = Table(title="int4 on all-MiniLM-L6-v2, 256 real sentences: RTN vs GPTQ")
    for c in ("variant", "mean layer SQNR dB", "emb. cosine mean / min", "NN agree"):
        t.add_column(c)
    for r in mini:
        t.add_row(r["variant"], f"{r['sqnr_db_mean']:.1f}",
                  f"{r['cosine_mean']:.4f} / {r['cosine_min']:.4f}",
                  f"{100 * r['neighbour_agreement']:.1f}%")
    console.print(t)
    Path(args.out).write_text(json.dumps({"machine": machine(), "rows": dec + mini}, indent=1))


if __name__ == "__main__":
    main()
