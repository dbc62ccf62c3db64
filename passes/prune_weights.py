"""prune_weights: linear weights ⇒ the same weights with a Wanda/magnitude mask
(unstructured or 2:4).

Every linear / addmm with a constant weight (output heads aside: `skip`) gets the weights with
the lowest scores zeroed: Wanda scores |W_ij|·‖X_j‖ (X the layer's calibration inputs; Sun et
al. 2024), `magnitude` scores |W_ij|. `pattern: unstructured` keeps the top (1 − sparsity) of
each output row; `pattern: "2:4"` keeps the 2 largest of every 4 consecutive inputs (NVIDIA
sparse tensor cores' layout). The mask is metadata for the cost model (`weight_format`,
density on the node); the weights stay dense tensors with zeros, so no backend here runs them
faster. The report says which targets could (2:4 tensor cores; sparse kernels below 10%
density) and that on this CPU the gain is none. Numerics: lossy; per-layer output SQNR.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx

from hardware.capability import UNSTRUCTURED_MAX_DENSITY
from optim.ir import get_constant, module_path, replace_constant
from optim.pass_base import Lossy, PassContext, register_pass
from passes.common.linears import (
    constant_linears,
    input_channel_energy,
    weight_and_bias,
    weight_axis,
)

aten = torch.ops.aten


@dataclass(frozen=True)
class PruneWeightsConfig:
    """Options for prune_weights."""

    pattern: Literal["unstructured", "2:4"] = "unstructured"
    sparsity: float = 0.5  # unstructured: fraction of each row zeroed (2:4 is always 0.5)
    score: Literal["wanda", "magnitude"] = "wanda"
    skip: tuple[str, ...] = ("classifier", "lm_head", "pooler", "proj_out")

    def validate(self) -> None:
        if not 0 < self.sparsity < 1:
            raise ValueError("sparsity must be in (0, 1)")


@register_pass("prune_weights", config=PruneWeightsConfig, numerics=Lossy("cosine_min", 0.8),
               requires=("cleanup",), expects=("linears_masked",))
def prune_weights(gm: torch.fx.GraphModule, cfg: PruneWeightsConfig, ctx: PassContext) -> None:
    """Zero the least important weights (Wanda or magnitude; unstructured or 2:4)."""
    linears = []
    for n in constant_linears(gm):
        k = get_constant(gm, weight_and_bias(n)[0]).shape[weight_axis(n, "in")]
        if any(s in module_path(n) for s in cfg.skip):
            ctx.skip(module_path(n), "in the skip list (output heads stay dense)")
        elif cfg.pattern == "2:4" and k % 4:
            ctx.skip(module_path(n), f"{k} inputs are not a multiple of 4 (2:4 groups)")
        else:
            linears.append(n)
    norms = {}
    if cfg.score == "wanda" and linears:  # ‖X_j‖ per input channel
        sq, _ = input_channel_energy(gm, linears, ctx.calibration or [ctx.example_inputs])
        norms = {n: s.sqrt().float() for n, s in sq.items()}
    layers = []
    for n in linears:
        w_node, _ = weight_and_bias(n)
        w = get_constant(gm, w_node)
        w_oi = (w if weight_axis(n, "in") == 1 else w.T).float()
        score = w_oi.abs() * norms.get(n, 1.0)
        keep = _mask(score, cfg)
        pruned = w_oi * keep
        replace_constant(gm, w_node, pruned if weight_axis(n, "in") == 1 else pruned.T)
        density = float(keep.float().mean())
        n.meta["weight_format"] = "2:4" if cfg.pattern == "2:4" else "unstructured"
        n.meta["weight_density"] = density
        ctx.record("linears_masked")
        rec = {"where": module_path(n), "shape": f"{w_oi.shape[0]}x{w_oi.shape[1]}",
               "density": round(density, 4)}
        if n in norms:  # output error on calibration data, per input energy
            e = (((w_oi - pruned) * norms[n]) ** 2).sum() / ((w_oi * norms[n]) ** 2).sum()
            rec["output_sqnr_db_est"] = round(-10 * math.log10(max(float(e), 1e-30)), 2)
        layers.append(rec)
    ctx.details.update(pattern=cfg.pattern, score=cfg.score, layers=layers,
                       speed=_speed_note(cfg, ctx))


def _mask(score: torch.Tensor, cfg: PruneWeightsConfig) -> torch.Tensor:
    if cfg.pattern == "2:4":
        g = score.reshape(score.shape[0], -1, 4)
        top = g.topk(2, dim=-1).indices
        return torch.zeros_like(g, dtype=torch.bool).scatter_(-1, top, True).reshape(score.shape)
    k = score.shape[1] - int(cfg.sparsity * score.shape[1])
    top = score.topk(k, dim=1).indices
    return torch.zeros_like(score, dtype=torch.bool).scatter_(1, top, True)


def _speed_note(cfg: PruneWeightsConfig, ctx: PassContext) -> str:
    name, spec = ctx.target.name, ctx.target.spec
    here = "the weights stay dense tensors with zeros: no backend here runs them faster"
    if cfg.pattern == "2:4":
        fast = [d for d in spec.sparse_2_4]
        x = spec.sparse_2_4_speedup.value if spec.sparse_2_4_speedup else 2.0
        return (f"{here}. {name}: " + (f"2:4 sparse tensor cores for {', '.join(fast)} "
                                       f"(the cost model counts {x:g}× GEMM speed there; the torch "
                                       f"backend on a CUDA GPU runs them sparse where measured "
                                       f"faster)" if fast else
                                       "no 2:4 sparse path; the cost model counts no gain"))
    dense = 1 - cfg.sparsity > UNSTRUCTURED_MAX_DENSITY
    return (f"{here}. Unstructured density {1 - cfg.sparsity:.0%}" +
            (f" is above {UNSTRUCTURED_MAX_DENSITY:.0%}: sparse kernels would lose to dense "
             f"GEMMs on any target; this saves nothing but may precede 2:4 or quantization"
             if dense else ": sparse kernels could pay where the target has them"))
