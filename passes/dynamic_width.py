"""dynamic_width: heads and MLP neurons reordered by importance ⇒ one graph, any nested width.

Every attention's heads and every MLP's hidden neurons (`passes.common.units`: found in the graph,
scored on calibration data) are permuted, most important first, by reordering weight rows and
columns: the function is unchanged (checked on the example: max abs error, and max error
relative to each output's largest value, reported; in float64 it is rounding, ~1e-13).
Grouped-query heads move with their key/value head.

The result runs at full width; `OptimizedModel.at_width(w)` (w in (0, 1], or one per layer for
Mix'n'Match) runs the nested prefix of every layer (`passes.common.nested_width`), and
`OptimizedModel.timestep_widths(...)` picks a width per diffusion timestep (DyDiT style). The
report gives FLOPs and fidelity at each width in `widths`. Fused q/k/v projections (GPT-2's
c_attn) keep their heads, with the reason; their MLPs still nest. Requires: fuse_attention.
Numerics: exact at full width (a permutation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F

from hardware.opcost import graph_kernels
from optim.pass_base import Exact, PassContext, register_pass
from passes.common.nested_width import at_width
from passes.common.units import leaves, order_units


@dataclass(frozen=True)
class DynamicWidthConfig:
    """Options for dynamic_width."""

    widths: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25)  # widths the report measures
    heads: bool = True  # nest attention heads
    mlp: bool = True  # nest MLP neurons

    def validate(self) -> None:
        if not self.widths or any(not (0 < w <= 1) for w in self.widths):
            raise ValueError("widths must be numbers in (0, 1]")
        if not (self.heads or self.mlp):
            raise ValueError("nothing to nest: heads and mlp are both false")


@register_pass("dynamic_width", config=DynamicWidthConfig, numerics=Exact(atol=1e-4),
               requires=("fuse_attention",), expects=("layers_nested",))
def dynamic_width(gm: torch.fx.GraphModule, cfg: DynamicWidthConfig, ctx: PassContext) -> None:
    """Order heads and MLP neurons by importance so that any prefix width runs (MatFormer)."""
    before = gm(*ctx.example_inputs[0], **ctx.example_inputs[1])
    plan = order_units(gm, cfg.heads, cfg.mlp, ctx.calibration or [ctx.example_inputs], ctx.skip)
    if plan is None:
        return
    ctx.record("attention_heads_ordered", sum("heads" in la for la in plan["layers"]))
    ctx.record("mlp_neurons_ordered", sum("mlp" in la for la in plan["layers"]))
    after = gm(*ctx.example_inputs[0], **ctx.example_inputs[1])
    diffs = [((a - b).abs().max(), a.abs().max()) for a, b in zip(leaves(before), leaves(after))]
    err = max(float(d) for d, _ in diffs)
    # relative to each output's largest value: what fp32 reordering leaves scales with it
    rel = max(float(d / top.clamp_min(1e-30)) for d, top in diffs)
    ctx.record("layers_nested", len(plan["layers"]))
    gm.meta["width_plan"] = plan  # for distill_widths
    ctx.details.update(plan=plan, permutation_max_abs_error=err, permutation_max_rel_error=rel,
                       widths=_measure_widths(gm, plan, cfg.widths, after, ctx))


# ---- what each width costs and keeps ----

def _measure_widths(gm, plan: dict, widths, full_out, ctx: PassContext) -> list[dict]:

    args, kwargs = ctx.example_inputs
    full_flops = sum(k.flops for k in graph_kernels(gm))
    ref = torch.cat([t.flatten() for t in leaves(full_out)])
    rows = []
    for w in widths:
        sub = at_width(gm, plan, w, args, kwargs)
        got = torch.cat([t.flatten() for t in leaves(sub(*args, **kwargs))])
        rows.append({"width": w, "flops_fraction": round(sum(k.flops for k in graph_kernels(sub))
                                                         / full_flops, 4),
                     "cosine": round(float(F.cosine_similarity(got, ref, 0)), 5),
                     "kept": sub.meta["width_counts"]})
    return rows
