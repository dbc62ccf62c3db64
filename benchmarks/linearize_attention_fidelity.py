"""linearize_attention's quality on real weights and real data, for every method.

- MiniLM (all-MiniLM-L6-v2, real weights) on real sentences: learned maps are fitted on
  calibration sentences, fidelity is measured on other sentences (mean-pooled embedding cosine,
  nearest-neighbour agreement), plus the mean per-layer attention-output cosine.
- The digits ViT (trained here): maps fitted on training images, top-1 on the 360 held-out.

The gate is off (`gate: false`): at these lengths (128 and 65 tokens) linear attention is not
faster, and the point is the quality each method keeps.

Usage: python benchmarks/linearize_attention_fidelity.py [--out ...json] [--sentences 256]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import warnings
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import optim
from optim import zoo
from optim.measure import machine
from optim.zoo import digits_vit
from optim.zoo.data import digits, sentences
from optim.zoo.tasks import sentence_batches, sentence_embedding_fidelity

METHODS = ["hedgehog", "elu", "performer", "flow", "ecoformer"]


def _pipeline(method: str, steps: int, head_dim: int) -> list:
    """`method`, `method+ftN` (the same with N steps of LoLCATs stage 2, `finetune_steps`), or
    `method@xK` (K × head_dim features, e.g. `performer@x2`)."""
    method, _, mult = method.partition("@x")
    name, _, ft = method.partition("+ft")
    opts = {"method": name, "gate": False, "fit_steps": steps, "finetune_steps": int(ft or 0)}
    if mult:
        opts["features"] = int(mult) * head_dim
    return ["cleanup", "fuse_attention", {"linearize_attention": opts}]


def _head_dim(model) -> int:
    c = model.config
    return c.hidden_size // c.num_attention_heads


def _layer_summary(om) -> dict:
    layers = om.report.pass_result("linearize_attention")["details"]["layers"]
    cos = [la["attention_cosine_mean"] for la in layers]
    fit = [la["fit"]["relative_mse_fitted"] for la in layers if "fit" in la]
    return {"attention_cosine_mean": sum(cos) / len(cos),
            "attention_cosine_worst_layer": min(cos),
            "fit_relative_mse_mean": sum(fit) / len(fit) if fit else None}


def minilm(n_sentences: int, steps: int) -> list[dict]:
    z = zoo.load("minilm", batch=8, seq=128)
    tok = z.tokenizer
    pool = sentences(2 * n_sentences)
    calib = sentence_batches(tok, pool[n_sentences:n_sentences + 64], 8, 128)
    evals = sentence_batches(tok, pool[:n_sentences], 8, 128)
    rows = []
    for method in METHODS:
        t0 = time.perf_counter()
        pipeline = _pipeline(method, steps, _head_dim(z.model))
        om = optim.optimize(copy.deepcopy(z.model), "cpu", evals[0][0], pipeline,
                            example_kwargs=evals[0][1], backend="torch", calibration=calib,
                            eval_data=evals[:2], measure_latency=False)
        pass_s = om.report.pass_result("linearize_attention")["seconds"]
        task = sentence_embedding_fidelity(evals)(z.model, om)
        rows.append({"model": "minilm", "method": method, "pass_seconds": pass_s,
                     "total_seconds": time.perf_counter() - t0, **task, **_layer_summary(om)})
    return rows


def vit(steps: int) -> list[dict]:
    z = zoo.load("digits_vit", batch=360)
    x_train, _ = digits("train")
    calib = [((x_train[:360],), {})]  # static graph: batches have the example's shape
    base = digits_vit.accuracy(z.model)
    rows = [{"model": "digits_vit", "method": "softmax (original)", "top1": base}]
    for method in METHODS:
        pipeline = _pipeline(method, steps, _head_dim(z.model))
        om = optim.optimize(copy.deepcopy(z.model), "cpu", z.example_args, pipeline,
                            backend="torch", calibration=calib, measure_latency=False)
        rows.append({"model": "digits_vit", "method": method, "top1": digits_vit.accuracy(om),
                     "pass_seconds": om.report.pass_result("linearize_attention")["seconds"],
                     **_layer_summary(om)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/linearize_attention_fidelity.json")
    ap.add_argument("--sentences", type=int, default=256)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--methods", default=",".join(METHODS),
                    help="comma-separated subset; `hedgehog+ft60` adds 60 stage-2 steps, "
                         "`performer@x2` uses 2 × head_dim features")
    args = ap.parse_args()
    METHODS[:] = args.methods.split(",")
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    console = Console(width=160)
    rows = minilm(args.sentences, args.steps) + vit(args.steps)
    t = Table(title=f"linearize_attention fidelity (gate off; {args.steps} fit steps per layer; "
                    f"{machine()['cpu']})")
    for c in ("model", "method", "attn cos (mean / worst layer)", "fit rel. MSE",
              "emb. cosine mean / min", "NN agree", "top-1 %", "pass s"):
        t.add_column(c)
    for r in rows:
        attn = f"{r['attention_cosine_mean']:.3f} / {r['attention_cosine_worst_layer']:.3f}" \
            if "attention_cosine_mean" in r else "-"
        fit = f"{r['fit_relative_mse_mean']:.3f}" if r.get("fit_relative_mse_mean") else "-"
        emb = f"{r['cosine_mean']:.3f} / {r['cosine_min']:.3f}" if "cosine_mean" in r else "-"
        nn = f"{100 * r['neighbour_agreement']:.0f}%" if "neighbour_agreement" in r else "-"
        top1 = f"{r['top1']:.1f}" if "top1" in r else "-"
        t.add_row(r["model"], r["method"], attn, fit, emb, nn, top1,
                  f"{r['pass_seconds']:.1f}" if "pass_seconds" in r else "-")
    console.print(t)
    Path(args.out).write_text(json.dumps({"machine": machine(), "steps": args.steps,
                                          "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
