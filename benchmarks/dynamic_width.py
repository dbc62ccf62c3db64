"""dynamic_width: latency and fidelity at each nested width, on real weights and real data.

- MiniLM (all-MiniLM-L6-v2) at batch 8 × 128 real sentences: heads and neurons ordered on
  calibration sentences, then each width's latency (interleaved with full width, one run),
  its FLOP fraction (cost model's count of the graph), speedup / FLOP reduction, and embedding
  fidelity on other sentences; plus one Mix'n'Match mix.
- The digits ViT (trained here): top-1 on the 360 held-out digits at each width.
- ViT-B/16 at 224² (random weights, so speed only): batch 8 × 197 tokens, ordered on random
  images; the shape where the issue's ViT latency matters (the digits ViT is 64 wide, where
  the residual stream's work, which does not narrow, sets the time at narrow widths).
- For every narrowed width, `fixed share` and `if narrowed ∝ FLOPs` (`fixed_cost`, from
  per-node profiles): the share of the call spent in nodes that do not narrow (layer norms,
  residual adds, embeddings, the head), and the speedup × FLOP fraction the width would reach
  if every other node took exactly its FLOP fraction of its full-width time.

Each model is optimized twice on the same calibration data: ordering alone, and ordering plus
`distill_widths` (width-aware distillation, `--distill-steps`, 0 to skip); the fidelity columns
give both (the distilled graph has the same ops and shapes, so the timing is shared).

Usage: python benchmarks/dynamic_width.py [--out benchmarks/results/dynamic_width.json]
       [--distill-steps N]
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
from hardware.opcost import graph_kernels
from optim import zoo
from optim.measure import machine, measure, node_times
from optim.zoo import digits_vit
from optim.zoo.data import digits, sentences
from optim.zoo.tasks import sentence_batches, sentence_embedding_fidelity
from passes.common.nested_width import at_width

WIDTHS = (1.0, 0.75, 0.5, 0.25)
MIX = (1.0, 1.0, 0.75, 0.75, 0.5, 0.5)  # Mix'n'Match: early layers wide, late layers narrow


def _flops(om, width) -> float:
    return sum(k.flops for k in graph_kernels(_graph(om, width)))


def _graph(om, width):
    plan = om.report.pass_result("dynamic_width")["details"]["plan"]
    return at_width(om.graph, plan, width, *om.example)


def fixed_cost(om, fractions: dict[float, float], runs: int) -> dict:
    """Per narrowed uniform width, the time of the nodes that do not narrow, and what it leaves.

    From per-node profiles of each width's graph (`optim.measure.node_times`, interpreted): a
    node is fixed when its input and output shapes are those it has at full width (the layer
    norms and residual adds of the residual stream, which MatFormer does not nest, embeddings,
    the head). If every narrowed node took exactly the FLOP fraction f of its full-width time,
    the speedup × FLOP fraction would be f·T₁ / (f·(T₁ − C₁) + C_w) (`proportional`): what
    the width reaches when its fixed nodes are its only loss. Narrowed nodes can beat that (a
    small GEMM or attention may run at a better rate than the full one), so it is a yardstick,
    not a hard ceiling."""
    full = node_times(_graph(om, 1.0), *om.example, runs=runs)
    total_full = sum(r["ms"] for r in full.values())
    out = {}
    for w, f in fractions.items():  # f: the width's FLOP fraction
        prof = node_times(_graph(om, w), *om.example, runs=runs)
        fixed = [k for k, r in prof.items() if k in full and
                 (r["inputs"], r["shape"]) == (full[k]["inputs"], full[k]["shape"])]
        c_full, c_w = sum(full[k]["ms"] for k in fixed), sum(prof[k]["ms"] for k in fixed)
        total = sum(r["ms"] for r in prof.values())
        out[str(w)] = {"fixed_ms": c_w, "interpreted_ms": total, "fixed_share": c_w / total,
                       "proportional": f * total_full / (f * (total_full - c_full) + c_w)}
    return out


PASSES = ["cleanup", "fuse_attention", "dynamic_width"]


# distill_widths' learning rate: fine-tuning a pretrained BERT wants a small one (1e-3 drove
# MiniLM's full width to 0.94 cosine in a trial); the 64-wide digits ViT trained here takes 1e-3
LR = {"minilm": 1e-4, "digits_vit": 1e-3}
MODELS = ("minilm", "digits_vit", "vit_b16")
VIT_B16 = dict(image_size=224, patch_size=16, num_hidden_layers=12, hidden_size=768,
               num_attention_heads=12, intermediate_size=3072)


def _distill(steps: int, model: str) -> list:
    return [{"distill_widths": {"widths": list(WIDTHS), "steps": steps, "lr": LR[model]}}] \
        if steps else []


def minilm(n_sentences: int, n_calib: int, budget: float, steps: int) -> list[dict]:
    z = zoo.load("minilm", batch=8, seq=128)
    pool = sentences(n_sentences + n_calib)
    calib = sentence_batches(z.tokenizer, pool[n_sentences:], 8, 128)
    evals = sentence_batches(z.tokenizer, pool[:n_sentences], 8, 128)
    om = optim.optimize(copy.deepcopy(z.model), "cpu", (), PASSES, example_kwargs=evals[0][1],
                        calibration=calib, backend="torch", measure_latency=False)
    trained = optim.optimize(copy.deepcopy(z.model), "cpu", (),
                             PASSES + _distill(steps, "minilm"), example_kwargs=evals[0][1],
                             calibration=calib, backend="torch",
                             measure_latency=False) if steps else None
    variants = {w: om.at_width(w) for w in (*WIDTHS, MIX)}
    kwargs = evals[0][1]
    stats = measure({str(w): (lambda f=f: f(**kwargs)) for w, f in variants.items()},
                    min_runs=10, max_runs=60, budget_s=budget)
    full_ms, full_flops = stats["1.0"]["median_ms"], _flops(om, 1.0)
    rows = []
    for w, f in variants.items():
        fid = sentence_embedding_fidelity(evals)(z.model, f)
        flop_frac = _flops(om, list(w) if isinstance(w, tuple) else w) / full_flops
        speedup = full_ms / stats[str(w)]["median_ms"]
        rows.append({"model": "minilm", "width": list(w) if isinstance(w, tuple) else w,
                     "median_ms": stats[str(w)]["median_ms"], "speedup": speedup,
                     "flops_fraction": flop_frac, "speedup_per_flop_reduction":
                         speedup * flop_frac, **fid})
        if trained is not None:
            fid = sentence_embedding_fidelity(evals)(z.model, trained.at_width(w))
            rows[-1]["distilled"] = fid
    if trained is not None:
        rows[0]["distill"] = _details(trained)
    return _with_bounds(om, rows)


def _with_bounds(om, rows: list[dict], runs: int = 5) -> list[dict]:
    # uniform narrowed widths only: a mix narrows each layer by its own share, so one FLOP
    # fraction does not stand for its narrowed nodes
    bounds = fixed_cost(om, {r["width"]: r["flops_fraction"] for r in rows
                             if isinstance(r["width"], float) and r["width"] < 1}, runs)
    for r in rows:
        r.update(bounds.get(str(r["width"]), {}))
    return rows


def _details(om) -> dict:
    d = om.report.pass_result("distill_widths")
    return {k: d["details"][k] for k in ("relative_error_before", "relative_error_after", "kept",
                                         "steps", "train_batches", "held_out_batches")} | {
        "seconds": d["seconds"]}


def vit(budget: float, steps: int) -> list[dict]:
    z = zoo.load("digits_vit", batch=360)
    x_train, _ = digits("train")  # 1437 images: four batches of 360 (the last two overlap)
    calib = [((x_train[i:i + 360],), {}) for i in (0, 360, 720, len(x_train) - 360)]
    om = optim.optimize(copy.deepcopy(z.model), "cpu", z.example_args, PASSES,
                        calibration=calib, backend="torch", measure_latency=False)
    trained = optim.optimize(copy.deepcopy(z.model), "cpu", z.example_args,
                             PASSES + _distill(steps, "digits_vit"), calibration=calib,
                             backend="torch", measure_latency=False) if steps else None
    variants = {w: om.at_width(w) for w in WIDTHS}
    x = z.example_args[0]
    stats = measure({str(w): (lambda f=f: f(x)) for w, f in variants.items()},
                    min_runs=10, max_runs=60, budget_s=budget)
    full_ms, full_flops = stats["1.0"]["median_ms"], _flops(om, 1.0)
    rows = []
    for w, f in variants.items():
        flop_frac = _flops(om, w) / full_flops
        speedup = full_ms / stats[str(w)]["median_ms"]
        rows.append({"model": "digits_vit", "width": w, "median_ms": stats[str(w)]["median_ms"],
                     "speedup": speedup, "flops_fraction": flop_frac,
                     "speedup_per_flop_reduction": speedup * flop_frac,
                     "top1": digits_vit.accuracy(f)})
        if trained is not None:
            rows[-1]["distilled"] = {"top1": digits_vit.accuracy(trained.at_width(w))}
    if trained is not None:
        rows[0]["distill"] = _details(trained)
    return _with_bounds(om, rows)


def vit_b16(budget: float) -> list[dict]:
    """Speed only: random weights, ordered on random images (the order is real, its meaning is
    not); the timing and FLOP columns are what this row is for."""
    z = zoo.load("vit", batch=8, **VIT_B16)
    g = torch.Generator().manual_seed(0)
    calib = [((torch.randn(z.example_args[0].shape, generator=g),), {}) for _ in range(2)]
    om = optim.optimize(copy.deepcopy(z.model), "cpu", z.example_args, PASSES,
                        calibration=calib, backend="torch", measure_latency=False)
    mix = tuple(w for w in MIX for _ in range(2))  # 12 layers: each of MIX's twice
    variants = {w: om.at_width(w) for w in (*WIDTHS, mix)}
    x = z.example_args[0]
    stats = measure({str(w): (lambda f=f: f(x)) for w, f in variants.items()},
                    min_runs=5, max_runs=60, budget_s=budget)
    full_ms, full_flops = stats["1.0"]["median_ms"], _flops(om, 1.0)
    rows = []
    for w in variants:
        flop_frac = _flops(om, list(w) if isinstance(w, tuple) else w) / full_flops
        speedup = full_ms / stats[str(w)]["median_ms"]
        rows.append({"model": "vit_b16", "width": list(w) if isinstance(w, tuple) else w,
                     "median_ms": stats[str(w)]["median_ms"], "speedup": speedup,
                     "flops_fraction": flop_frac, "speedup_per_flop_reduction":
                         speedup * flop_frac})
    return _with_bounds(om, rows, runs=3)


def _distilled(d: dict) -> list[str]:
    return [f"{d['cosine_mean']:.3f} / {d['cosine_min']:.3f}" if "cosine_mean" in d else "-",
            f"{100 * d['neighbour_agreement']:.0f}%" if "neighbour_agreement" in d else "-",
            f"{d['top1']:.1f}" if "top1" in d else "-"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/dynamic_width.json")
    ap.add_argument("--sentences", type=int, default=256)
    ap.add_argument("--calibration", type=int, default=510,
                    help="MiniLM calibration sentences (ordering and distillation)")
    ap.add_argument("--budget", type=float, default=20.0)
    ap.add_argument("--distill-steps", type=int, default=150)
    ap.add_argument("--models", default=",".join(MODELS),
                    help="models to run; the other models' rows in --out are kept")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    models = args.models.split(",")
    rows = []
    if "minilm" in models:
        rows += minilm(args.sentences, args.calibration, args.budget, args.distill_steps)
    if "digits_vit" in models:
        rows += vit(args.budget, args.distill_steps)
    if "vit_b16" in models:
        rows += vit_b16(args.budget)
    out = Path(args.out)
    if out.exists() and set(models) != set(MODELS):
        rows += [r for r in json.loads(out.read_text())["rows"] if r["model"] not in models]
        rows.sort(key=lambda r: MODELS.index(r["model"]))  # stable: widths keep their order
    t = Table(title=f"dynamic_width: nested widths, one interleaved run per model "
                    f"({machine()['cpu']}, 2 threads, torch backend)")
    for c in ("model", "width", "median ms", "speedup", "FLOPs", "speedup × FLOP frac.",
              "fixed share", "if narrowed ∝ FLOPs",
              "emb. cosine mean / min", "NN agree", "top-1 %", "distilled: emb. cosine",
              "distilled: NN agree", "distilled: top-1 %"):
        t.add_column(c)
    for r in rows:
        w = r["width"]
        t.add_row(r["model"], "mix " + "/".join(f"{x:g}" for x in w) if isinstance(w, list)
                  else f"{w:g}", f"{r['median_ms']:.1f}", f"{r['speedup']:.2f}x",
                  f"{r['flops_fraction']:.2f}", f"{r['speedup_per_flop_reduction']:.2f}",
                  f"{r['fixed_share']:.0%}" if "fixed_share" in r else "-",
                  f"{r['proportional']:.2f}" if "proportional" in r else "-",
                  f"{r['cosine_mean']:.3f} / {r['cosine_min']:.3f}" if "cosine_mean" in r else "-",
                  f"{100 * r['neighbour_agreement']:.0f}%" if "neighbour_agreement" in r else "-",
                  f"{r['top1']:.1f}" if "top1" in r else "-", *_distilled(r.get("distilled", {})))
    Console(width=200).print(t)
    out.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
