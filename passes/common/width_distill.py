"""Width-aware distillation of a nested-width graph (DynaBERT / MatFormer style).

`dynamic_width` orders a model trained at one width, so its narrow prefixes lose a lot. Here
every linear's weight and bias is trained so that several nested widths at once match the
original (full-width) model's outputs on calibration data: each step runs the widest and the
narrowest width plus one other drawn at random (the "sandwich rule" of slimmable networks) on
one batch, and the loss is the sum of their relative output errors. The width graphs read
views of the same full weights (`passes.common.nested_width` records which constant is which
prefix), so one set of weights serves every width, as at run time.
"""

from __future__ import annotations

import random

import torch
import torch.fx

from optim.ir import get_constant, replace_constant
from passes.common.graph_runner import output_error, output_loss, run, swap_constant
from passes.common.linears import constant_linears, weight_and_bias
from passes.common.nested_width import at_width


def distill(gm: torch.fx.GraphModule, plan: dict | None, widths: list[float], batches: list,
            held_out: list, steps: int, lr: float, seed: int = 0,
            teacher: dict[int, list] | None = None) -> dict:
    """Train `gm`'s linear weights in place so that every width in `widths` matches the
    `teacher` outputs (per batch, keyed by `id(batch)`; default: `gm`'s current full-width
    outputs). Weights that are mostly exact zeros (a sparsity mask) keep their zeros. Returns
    the relative output error per width on `held_out` before and after; the trained weights are
    kept only if their summed error is lower."""
    args, kwargs = batches[0]
    teacher = teacher or {id(b): [t.detach().clone() for t in run(gm, b)]
                          for b in (*batches, *held_out)}
    nodes = {w.target: w for n in constant_linears(gm) for w in weight_and_bias(n)
             if w is not None}
    full = {t: get_constant(gm, node).detach().float().clone() for t, node in nodes.items()}
    masks = {t: w != 0 for t, w in full.items() if w.dim() == 2 and (w == 0).float().mean() > 0.2}
    graphs = {w: gm if w == 1.0 else at_width(gm, plan, w, args, kwargs) for w in widths}

    def install(weights: dict) -> None:
        weights = {t: w * masks[t] if t in masks else w for t, w in weights.items()}
        for g in graphs.values():
            names = g.meta.get("narrowed_constants", {})
            for name in _get_attrs(g):
                if name in weights:
                    swap_constant(g, name, weights[name])
                elif name in names:
                    src, dim, keep = names[name]
                    swap_constant(g, name, weights[src].narrow(dim, 0, keep))

    def errors() -> dict[float, float]:
        return {w: output_error(g, held_out, [teacher[id(b)] for b in held_out])
                for w, g in graphs.items()}

    install(full)
    before = errors()
    rng = random.Random(seed)
    wide, narrow = max(widths), min(widths)
    middle = [w for w in widths if w not in (wide, narrow)]
    with torch.inference_mode(False), torch.enable_grad():
        params = {t: v.clone().requires_grad_(True) for t, v in full.items()}
        opt = torch.optim.Adam(params.values(), lr=lr)
        for step in range(steps):
            batch = batches[step % len(batches)]
            install(params)
            opt.zero_grad()
            for w in dict.fromkeys([wide, narrow, *([rng.choice(middle)] if middle else [])]):
                output_loss(run(graphs[w], batch), teacher[id(batch)]).backward()
            opt.step()
        trained = {t: (p * masks[t] if t in masks else p).detach().clone()
                   for t, p in params.items()}
    install(trained)
    after = errors()
    kept = sum(after.values()) < sum(before.values())
    install(full)
    for node in gm.graph.nodes:  # the graph owns its constants again, trained or not
        if node.op == "get_attr" and node.target in full:
            replace_constant(gm, node, trained[node.target] if kept else full[node.target])
    return {"relative_error_before": before, "relative_error_after": after, "kept": kept,
            "steps": steps, "weights_trained": len(full)}


def _get_attrs(gm: torch.fx.GraphModule) -> list[str]:
    return [n.target for n in gm.graph.nodes if n.op == "get_attr"]
