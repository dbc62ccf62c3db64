"""low_rank: linear(x, W[out, in]) ⇒ linear(linear(x, V[r, in]), U[out, r]) by truncated SVD.

Each linear (or addmm) with a constant weight is factorized at the smallest rank r that keeps
`energy` of its squared singular values, or at the rank that brings it to `flops` of its FLOPs.
With `activation_aware` (default), the SVD is of W·diag(s), s the RMS of each input channel on
calibration data, so the kept directions are those the layer's real inputs use (ASVD-style);
V absorbs diag(1/s). A layer is left dense, with the reason, when the rank that meets the target
would not make it cheaper (r·(in + out) ≥ in·out). Embeddings and the output head (layers
listed in `skip`, by module-path substring) stay dense. Numerics: lossy; per-layer rank and
relative weight error (of W·diag(s)) are reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from optim.ir import add_constant, get_constant, module_path
from optim.pass_base import Lossy, PassContext, register_pass
from passes.common.linears import (
    constant_linears,
    input_channel_energy,
    linear_input,
    weight_and_bias,
    weight_axis,
)

aten = torch.ops.aten


@dataclass(frozen=True)
class LowRankConfig:
    """Options for low_rank."""

    energy: float = 0.9  # keep this fraction of each layer's squared singular values
    flops: float = 0.0  # instead: keep this fraction of each layer's FLOPs (0: use energy)
    activation_aware: bool = True  # weight input channels by their RMS on calibration data
    skip: tuple[str, ...] = ("classifier", "lm_head", "pooler", "proj_out")
    min_features: int = 64  # layers with fewer inputs or outputs stay dense

    def validate(self) -> None:
        if not 0 < self.energy <= 1:
            raise ValueError("energy must be in (0, 1]")
        if self.flops and not 0 < self.flops < 1:
            raise ValueError("flops must be a fraction in (0, 1), or 0 to use energy")


@register_pass("low_rank", config=LowRankConfig, numerics=Lossy("cosine_min", 0.8),
               expects=("linears_factorized",))
def low_rank(gm: torch.fx.GraphModule, cfg: LowRankConfig, ctx: PassContext) -> None:
    """Factorize linear layers by truncated SVD (rank by retained energy or a FLOP budget)."""
    linears = constant_linears(gm)
    layers = []
    scales = {}
    if cfg.activation_aware and linears:
        sq, rows = input_channel_energy(gm, linears, ctx.calibration or [ctx.example_inputs])
        scales = {n: (sq[n] / rows[n]).sqrt().float().clamp_min(1e-6) for n in linears}
    for n in linears:
        where = module_path(n)
        w_node, b_node = weight_and_bias(n)
        w = get_constant(gm, w_node)
        w_oi = w if weight_axis(n, "in") == 1 else w.T  # [out, in]
        out_f, in_f = w_oi.shape
        if any(s in where for s in cfg.skip):
            ctx.skip(where, "in the skip list (output heads stay dense)")
            continue
        if min(out_f, in_f) < cfg.min_features:
            ctx.skip(where, f"{out_f}×{in_f} is below min_features {cfg.min_features}")
            continue
        s = scales.get(n, torch.ones(in_f))
        u, sig, vh = torch.linalg.svd(w_oi.double() * s.double(), full_matrices=False)
        r = _rank(sig, cfg, out_f, in_f)
        if r * (in_f + out_f) >= in_f * out_f:
            ctx.skip(where, f"rank {r} of {min(out_f, in_f)} keeps {cfg.energy:g} of the energy "
                            f"but would cost more than the dense {out_f}×{in_f} layer")
            continue
        up = (u[:, :r] * sig[:r]).float()  # [out, r]
        down = (vh[:r] / s.double()).float()  # [r, in]
        err = float((up.double() @ vh[:r] - w_oi.double() * s.double()).norm()
                    / (w_oi.double() * s.double()).norm())
        x = linear_input(n)
        with gm.graph.inserting_before(n):
            v_node = add_constant(gm, f"{w_node.target}_lr_down", down, n)
            u_node = add_constant(gm, f"{w_node.target}_lr_up", up, n)
            mid = gm.graph.call_function(aten.linear.default, (x, v_node))
            new = gm.graph.call_function(aten.linear.default, (mid, u_node, b_node))
        new.meta = dict(n.meta)
        mid.meta = {**n.meta, "val": n.meta["val"].new_empty((*n.meta["val"].shape[:-1], r))}
        n.replace_all_uses_with(new)
        gm.graph.erase_node(n)
        ctx.record("linears_factorized")
        layers.append({"where": where, "shape": f"{out_f}x{in_f}", "rank": r,
                       "flops_fraction": round(r * (in_f + out_f) / (in_f * out_f), 4),
                       "relative_weight_error": round(err, 5)})
    ctx.details["layers"] = layers


def _rank(sig: torch.Tensor, cfg: LowRankConfig, out_f: int, in_f: int) -> int:
    if cfg.flops:
        return max(1, int(cfg.flops * in_f * out_f / (in_f + out_f)))
    energy = torch.cumsum(sig ** 2, 0) / (sig ** 2).sum()
    return int((energy < cfg.energy).sum()) + 1
