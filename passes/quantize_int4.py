"""quantize_int4: linear(x, W) ⇒ optim::linear_int4(x, packed 4-bit W, block scales) (weight-only).

Every linear / addmm with a constant weight whose input size is a multiple of 16 gets 4-bit
weights with one scale per `group_size` inputs of each output (or the largest power of 2 that
divides a layer's input size, reported per layer; symmetric, codes −8…7
stored with zero point 8: ONNX Runtime's MatMulNBits layout), by round-to-nearest or by GPTQ:
columns are quantized one at a time and each one's rounding error is spread over the columns
not yet quantized, weighted by the inverse Hessian 2·XᵀX of the layer's calibration inputs
(Frantar et al. 2023; lazy batches of 128 columns, 1% dampening). Activations stay fp32. ONNX
Runtime runs MatMulNBits (a real 4-bit kernel); the torch backend unpacks to fp32 (a memory
saving, not a speedup). Output heads stay float (`skip`). Numerics: lossy; per-layer SQNR of
the layer output on calibration data is reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx

import optim.ops  # noqa: F401  (registers torch.ops.optim)
from optim.ir import add_constant, get_constant, module_path
from optim.ops import pack_int4, unpack_int4
from optim.pass_base import Lossy, PassContext, register_pass
from passes.common.linears import (
    constant_linears,
    input_rows,
    linear_input,
    weight_and_bias,
    weight_axis,
)

aten = torch.ops.aten


@dataclass(frozen=True)
class QuantizeInt4Config:
    """Options for quantize_int4."""

    method: Literal["gptq", "rtn"] = "gptq"
    group_size: int = 128  # inputs sharing one scale (MatMulNBits block_size: a power of 2 ≥ 16)
    damp: float = 0.01  # GPTQ: added to the Hessian diagonal, as a fraction of its mean
    skip: tuple[str, ...] = ("classifier", "lm_head", "pooler", "proj_out")

    def validate(self) -> None:
        if self.group_size < 16 or self.group_size & (self.group_size - 1):
            raise ValueError("group_size must be a power of 2, at least 16")
        if not 0 < self.damp < 1:
            raise ValueError("damp must be in (0, 1): GPTQ inverts the dampened Hessian")


@register_pass("quantize_int4", config=QuantizeInt4Config, numerics=Lossy("cosine_min", 0.9),
               requires=("cleanup",), expects=("linear_int4",))
def quantize_int4(gm: torch.fx.GraphModule, cfg: QuantizeInt4Config, ctx: PassContext) -> None:
    """Quantize linear weights to 4 bits with block scales (GPTQ or round-to-nearest)."""
    chosen = []
    for n in constant_linears(gm):
        where = module_path(n)
        w = get_constant(gm, weight_and_bias(n)[0])
        k = w.shape[weight_axis(n, "in")]
        if any(s in where for s in cfg.skip):
            ctx.skip(where, "in the skip list (output heads stay float)")
        elif k % MIN_GROUP:
            ctx.skip(where, f"{k} inputs are not a multiple of {MIN_GROUP} (the smallest group "
                            f"of 4-bit weights sharing a scale)")
        else:
            chosen.append(n)
    inputs = input_rows(gm, chosen, ctx.calibration or [ctx.example_inputs], limit=4096)
    layers = []
    for n in chosen:
        w_node, b_node = weight_and_bias(n)
        group = _group_for(get_constant(gm, w_node).shape[weight_axis(n, "in")], cfg.group_size)
        if group != cfg.group_size:
            ctx.record("group_reduced")
        w = get_constant(gm, w_node)
        w_oi = (w if weight_axis(n, "in") == 1 else w.T).float()  # [out, in]
        x = inputs[n]
        method, codes = cfg.method, None
        damp = cfg.damp
        while method == "gptq" and codes is None:
            try:
                codes, scales = gptq(w_oi, x, group, damp)
            except torch.linalg.LinAlgError:  # a Hessian too singular for this dampening
                damp *= 10
                if damp >= 1:
                    method = "rtn"
        if codes is None:
            codes, scales = rtn(w_oi, group)
        packed = pack_int4(codes, group)
        w_hat = unpack_int4(packed, scales)
        ref, got = x @ w_oi.T, x @ w_hat.T
        sqnr = 10 * math.log10(float(ref.pow(2).sum() / (ref - got).pow(2).sum().clamp_min(1e-30)))
        xin = linear_input(n)
        p_node = add_constant(gm, f"{w_node.target}_int4", packed, n)
        s_node = add_constant(gm, f"{w_node.target}_int4_scales", scales, n)
        with gm.graph.inserting_before(n):
            q = gm.graph.call_function(torch.ops.optim.linear_int4.default,
                                       (xin, p_node, s_node, b_node, group))
        q.meta = dict(n.meta)
        n.replace_all_uses_with(q)
        gm.graph.erase_node(n)
        ctx.record("linear_int4")
        layers.append({"where": module_path(q), "shape": f"{w_oi.shape[0]}x{w_oi.shape[1]}",
                       "group_size": group, "output_sqnr_db": round(sqnr, 2),
                       **({"method": method, "damp": damp} if (method, damp) != (cfg.method,
                                                                               cfg.damp) else {})})
    ctx.details.update(method=cfg.method, group_size=cfg.group_size, layers=layers)


MIN_GROUP = 16  # MatMulNBits' smallest block


def _group_for(k: int, asked: int) -> int:
    """`asked` when it divides the `k` inputs, else the largest power of 2 that does (at least
    `MIN_GROUP`): a smaller group costs a few more scales, not the layer."""
    group = asked
    while k % group:
        group //= 2
    return group


def rtn(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest: codes [N, K] in 0..15 and scales [N, K / group]."""
    g = w.reshape(w.shape[0], -1, group)
    scales = (g.abs().amax(-1) / 7.0).clamp_min(1e-12)
    codes = (g / scales.unsqueeze(-1)).round().clamp(-8, 7) + 8
    return codes.reshape(w.shape).to(torch.uint8), scales


def gptq(w: torch.Tensor, x: torch.Tensor, group: int, damp: float
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ on one layer: w [N, K], calibration inputs x [rows, K]; same outputs as `rtn`.

    Columns go in lazy batches of max(128, group) (a multiple of the group size, so a group's
    scale is taken from its weights after every earlier column's error has reached them)."""
    w = w.double().clone()
    n, k = w.shape
    h = 2.0 * x.double().T @ x.double() / max(len(x), 1)
    dead = h.diagonal() == 0  # inputs that never fire: their weights do not matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * h.diagonal().mean() * torch.eye(k, dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.zeros(n, k, dtype=torch.uint8)
    scales = torch.zeros(n, k // group, dtype=torch.double)
    block = max(128, group)
    for i0 in range(0, k, block):
        i1 = min(i0 + block, k)
        wb, errs = w[:, i0:i1].clone(), torch.zeros(n, i1 - i0, dtype=w.dtype)
        for j in range(i1 - i0):
            col = i0 + j
            if col % group == 0:
                scales[:, col // group] = (wb[:, j:j + group].abs().amax(1) / 7.0).clamp_min(1e-12)
            sc = scales[:, col // group]
            c = (wb[:, j] / sc).round().clamp(-8, 7)
            codes[:, col] = (c + 8).to(torch.uint8)
            err = (wb[:, j] - c * sc) / hinv[col, col]
            wb[:, j:] -= err.unsqueeze(1) * hinv[col, col:i1].unsqueeze(0)
            errs[:, j] = err
        w[:, i1:] -= errs @ hinv[i0:i1, i1:]
    return codes, scales.float()
