"""sparsify (structured): the least important heads and MLP neurons ⇒ removed, tensors shrunk.

Heads and neurons are found and scored on calibration data as `passes.common.units` describes
(a head by what it adds to the residual stream, a neuron by mean |activation| × its
down-projection column norm), and each block keeps its most important ones: `sparsity` of them
are removed in every block, or, with `flops`, the uniform sparsity that brings the graph's FLOPs
down to that fraction. The weights really shrink (q/k/v/up rows, output/down columns) and every
reshape constant carrying a head or neuron count is rewritten, so dense kernels get faster on
every backend. With `reconstruct`, the output and down projections are refitted by least squares
so the kept units reproduce the full layer's output on the calibration data (the dropped units'
mean contribution moves into the bias). Grouped-query heads go with their key/value head; fused
q/k/v projections (GPT-2) keep their heads, with the reason. Requires: fuse_attention.
Numerics: lossy; per-layer reconstruction error is reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from hardware.opcost import graph_kernels
from optim.ir import get_constant, replace_constant
from optim.pass_base import Lossy, PassContext, register_pass
from passes.common.linears import input_rows, weight_and_bias, weight_axis
from passes.common.nested_width import at_width, counts_at, narrow
from passes.common.units import order_units


@dataclass(frozen=True)
class SparsifyConfig:
    """Options for sparsify."""

    sparsity: float = 0.3  # fraction of every block's heads and neurons removed
    flops: float = 0.0  # instead: keep this fraction of the graph's FLOPs (0: use sparsity)
    heads: bool = True  # prune attention heads
    mlp: bool = True  # prune MLP neurons
    reconstruct: bool = True  # least-squares refit of the output/down projections

    def validate(self) -> None:
        if not 0 <= self.sparsity < 1:
            raise ValueError("sparsity must be in [0, 1)")
        if self.flops and not 0 < self.flops < 1:
            raise ValueError("flops must be a fraction in (0, 1), or 0 to use sparsity")
        if not (self.heads or self.mlp):
            raise ValueError("nothing to prune: heads and mlp are both false")


@register_pass("sparsify", config=SparsifyConfig, numerics=Lossy("cosine_min", 0.8),
               requires=("fuse_attention",), expects=("layers_pruned",))
def sparsify(gm: torch.fx.GraphModule, cfg: SparsifyConfig, ctx: PassContext) -> None:
    """Remove the least important attention heads and MLP neurons (structured sparsity)."""

    batches = ctx.calibration or [ctx.example_inputs]
    plan = order_units(gm, cfg.heads, cfg.mlp, batches, ctx.skip)
    if plan is None:
        return
    flops_before = sum(k.flops for k in graph_kernels(gm))
    sparsity = cfg.sparsity if not cfg.flops else _sparsity_for_flops(gm, plan, cfg.flops, ctx)
    counts = counts_at(plan, 1.0 - sparsity)
    layers = []
    for i, (layer, row) in enumerate(zip(plan["layers"], counts)):
        rec = {"heads": f"{row['heads']}/{layer['heads']['heads']}" if "heads" in row else "-",
               "neurons": f"{row['neurons']}/{layer['mlp']['neurons']}" if "neurons" in row
               else "-"}
        h = layer.get("heads")
        if h and sparsity > 0 and row["heads"] == h["heads"]:
            ctx.skip(f"layer {i} heads", f"{h['heads']} heads in {h['kv_heads']} key/value "
                     f"groups are removed a whole group at a time ({1 / h['kv_heads']:.0%} of "
                     f"the heads); removing {sparsity:.0%} keeps every group")
        if cfg.reconstruct:
            rec.update(_reconstruct(gm, layer, row, batches))
        layers.append(rec)
    narrow(gm, plan, counts, *ctx.example_inputs, materialize=True)
    flops_after = sum(k.flops for k in graph_kernels(gm))
    ctx.record("layers_pruned", len(counts))
    ctx.record("heads_removed", sum(la["heads"]["heads"] - c["heads"]
                                    for la, c in zip(plan["layers"], counts) if "heads" in c))
    ctx.record("neurons_removed", sum(la["mlp"]["neurons"] - c["neurons"]
                                      for la, c in zip(plan["layers"], counts) if "neurons" in c))
    ctx.details.update(sparsity=round(sparsity, 4), flops_fraction=round(flops_after
                                                                         / flops_before, 4),
                       layers=layers)


def _sparsity_for_flops(gm, plan: dict, target: float, ctx: PassContext) -> float:
    """The uniform sparsity whose graph keeps `target` of the FLOPs (bisection)."""

    full = sum(k.flops for k in graph_kernels(gm))
    lo, hi = 0.0, 0.95
    for _ in range(10):
        mid = (lo + hi) / 2
        sub = at_width(gm, plan, 1.0 - mid, *ctx.example_inputs)
        if sum(k.flops for k in graph_kernels(sub)) / full > target:
            lo = mid
        else:
            hi = mid
    if hi > 0.94:
        sub = at_width(gm, plan, 1.0 - hi, *ctx.example_inputs)
        ctx.skip("graph", f"FLOP budget {target:g} is out of reach: removing 95% of the heads and "
                          f"neurons keeps {sum(k.flops for k in graph_kernels(sub)) / full:.2f} "
                          f"of the FLOPs (embeddings, output heads and unprunable attentions "
                          f"stay)")
    return hi


def _reconstruct(gm, layer: dict, row: dict, batches) -> dict:
    """Refit the output projection (heads) and down projection (neurons) so that the kept
    inputs reproduce the full output on calibration data; returns relative errors before/after,
    on held-out calibration rows.
    Layers are fitted in order, each on the inputs the already pruned layers before it give."""
    out = {}
    nodes = {n.name: n for n in gm.graph.nodes}
    jobs = []
    if "heads" in row:
        h = layer["heads"]
        jobs.append(("heads", nodes[h["o"]], row["heads"] * h["head_dim"]))
    if "neurons" in row:
        jobs.append(("neurons", nodes[layer["mlp"]["down"]], row["neurons"]))
    for kind, proj, keep in jobs:
        x = input_rows(gm, [proj], batches)[proj].double()
        w_node, b_node = weight_and_bias(proj)
        w = get_constant(gm, w_node)
        w_oi = (w if weight_axis(proj, "in") == 1 else w.T).double()  # [out, in]
        if len(x) * 3 // 4 < 2 * (keep + 1):
            out[f"{kind}_note"] = (f"not refitted: {len(x)} calibration rows for {keep + 1} "
                                   f"unknowns per output (give more calibration data)")
            continue
        y = x @ w_oi.T  # the full layer's output, bias aside
        has_bias = isinstance(b_node, torch.fx.Node)
        xk = x[:, :keep]
        if has_bias:  # a constant column: the dropped units' mean moves into the bias
            xk = torch.cat([xk, torch.ones(len(x), 1, dtype=x.dtype)], 1)
        # fit on the first 3/4 of the rows, judge on the last quarter (other samples): tokens
        # of one sample are alike, so a fit can look perfect on its own rows and not carry over
        cut = len(x) * 3 // 4
        gram = xk[:cut].T @ xk[:cut]
        gram += 1e-3 * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype)
        sol = torch.linalg.solve(gram, xk[:cut].T @ y[:cut])  # [keep (+1), out]
        before = _rel(x[cut:, :keep] @ w_oi[:, :keep].T, y[cut:])
        after = _rel(xk[cut:] @ sol, y[cut:])
        out[f"{kind}_relative_error_unfitted"] = round(before, 5)
        out[f"{kind}_relative_error"] = round(min(before, after), 5)
        full_w = w_oi.float().clone()
        full_w[:, keep:] = 0.0  # later layers are fitted on what this pruned layer outputs
        if after < before:  # else the refit does not help: keep the kept weights as they are
            full_w[:, :keep] = sol[:keep].T.float()
            if has_bias:
                replace_constant(gm, b_node, get_constant(gm, b_node) + sol[-1].float())
        replace_constant(gm, w_node, full_w if weight_axis(proj, "in") == 1
                         else full_w.T.contiguous())
    gm.recompile()
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).sum() / b.pow(2).sum().clamp_min(1e-30))
