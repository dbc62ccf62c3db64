"""quantize: linear(x, W, b) / addmm(b, x, Wᵀ) with constant W
⇒  optim::linear_int8(x, W_q, s_w, b).

Weights become int8 (7-bit range by default, see `weight_bits`) with one symmetric scale per
output channel; activations are quantized per token (one symmetric scale per row) at run time,
and the GEMM runs on real int8 kernels (oneDNN in the torch backend, MatMulIntegerToFloat in
ONNX Runtime). Embeddings are not linears and stay
float; output heads (names matching `skip`) stay float. With calibration data, every layer's
SQNR (int8 output vs fp32 output on the calibration activations) is measured, and layers below
`min_sqnr_db` stay float, with the reason. Activation outliers are migrated into the weights
first (SmoothQuant, `smooth_alpha`): x / s feeds the int8 GEMM and W · s is quantized, which is
exact in real arithmetic. x / s is folded into the LayerNorm before it when that norm feeds
only these linears (pre-norm blocks: GPT-2, Llama, ViT); otherwise the per-token quantization
kernel applies it on the fly. `activations: static` replaces the per-token scales by one
calibrated scale per layer input (min-max or a percentile of |x| on the calibration data), so
the run-time |x|max pass disappears; it is lossier on models with outlier tokens. Numerics:
lossy, reported as per-layer SQNR.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx

import optim.ops  # noqa: F401  (registers torch.ops.optim)
from optim.errors import ConfigError
from optim.ir import add_constant, flatten_inputs, get_constant, module_path
from optim.numerics import sqnr_db
from optim.pass_base import Lossy, PassContext, register_pass

aten = torch.ops.aten


@dataclass(frozen=True)
class QuantizeConfig:
    """Options for quantize (int8 weights per channel, dynamic per-token int8 activations)."""

    skip: tuple[str, ...] = ("lm_head", "classifier", "pooler", "score", "proj_out", "head")
    min_sqnr_db: float = 0.0  # layers whose calibrated SQNR is below this stay float (0 = keep all)
    min_features: int = 16  # linears with fewer input features stay float (nothing to gain)
    calibration_batches: int = 4
    # 7-bit weights (±63) by default: x86 without VNNI multiplies u8×s8 pairs with vpmaddubsw,
    # whose int16 sums saturate for 8-bit weights (ORT calls this reduce_range); 8 for VNNI/AMX.
    weight_bits: int = 7
    # SmoothQuant migration strength: per input channel j, x_j /= s_j and W[:, j] *= s_j with
    # s_j = max|x_j|^α / max|W[:, j]|^(1-α) from calibration data (0 = off; 0.5 is
    # SmoothQuant's default). One s per input tensor, shared by the linears reading it (q, k, v).
    smooth_alpha: float = 0.5
    # dynamic: one scale per token, measured at run time; static: one scale per layer input,
    # calibrated (`calibration_method` over the calibration activations, after smoothing)
    activations: Literal["dynamic", "static"] = "dynamic"
    calibration_method: Literal["minmax", "percentile"] = "percentile"
    percentile: float = 99.99

    def validate(self) -> None:
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError("percentile must be in (50, 100]")
        if not 0.0 <= self.smooth_alpha <= 1.0:
            raise ValueError("smooth_alpha must be in [0, 1]")
        if self.weight_bits not in (7, 8):
            raise ValueError("weight_bits must be 7 or 8")
        if self.min_features < 1:
            raise ValueError("min_features must be >= 1")
        for pattern in self.skip:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"skip pattern {pattern!r} is not a regular expression ({e}); "
                                 f"escape special characters, e.g. 'classifier\\.dense'"
                                 ) from None


def _linear_parts(gm, n: torch.fx.Node):
    """(x, W [N, K] tensor, bias node) for a linear-like node with a constant weight, else a
    reason."""
    if n.target is aten.linear.default:
        x, w = n.args[0], n.args[1]
        b = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
        weight = get_constant(gm, w)
        return (x, weight, b) if weight is not None else "weight is not a constant"
    if n.target is aten.addmm.default:  # GPT-2 Conv1D: addmm(bias, x, W[K, N])
        if n.kwargs.get("beta", 1) != 1 or n.kwargs.get("alpha", 1) != 1:
            return "addmm with alpha/beta"
        b, x, w = n.args[:3]
        weight = get_constant(gm, w)
        return (x, weight.t(), b) if weight is not None else "weight is not a constant"
    return None


def _matches_skip(path: str, patterns: tuple[str, ...]) -> str | None:
    for p in patterns:
        if re.search(rf"(^|\.){p}(\.|$)", path) or re.fullmatch(p, path):
            return p
    return None


@register_pass("quantize", config=QuantizeConfig, numerics=Lossy("sqnr_db", 15.0),
               requires=("cleanup",), expects=("linear_quantized",))
def quantize(gm: torch.fx.GraphModule, cfg: QuantizeConfig, ctx: PassContext) -> None:
    """int8 per-channel weights with dynamic per-token int8 activations on real int8 kernels."""
    candidates = []
    for n in list(gm.graph.nodes):
        if n.op != "call_function":
            continue
        parts = _linear_parts(gm, n)
        if parts is None:
            continue
        where = module_path(n)
        if isinstance(parts, str):
            ctx.skip(where, parts)
            continue
        x, weight, bias = parts
        hit = _matches_skip(where, cfg.skip)
        if hit:
            ctx.skip(where, f"output head / excluded layer (matches skip pattern {hit!r})")
        elif weight.shape[1] < cfg.min_features:
            ctx.skip(where, f"{weight.shape[1]} input features < min_features {cfg.min_features}")
        else:
            candidates.append((n, where, x, weight, bias))
    inputs = _calibration_inputs(gm, [c[0] for c in candidates], ctx, cfg.calibration_batches)
    smooth = _smoothing_factors(candidates, inputs, cfg.smooth_alpha)
    readers: dict = {}
    for c in candidates:
        readers.setdefault(c[2], set()).add(c[0])
    smoothed_inputs: dict = {}
    layers = []
    replaced: dict = {}  # linear -> its int8 node: a linear may read another's output directly
    for n, where, x_key, weight, bias in candidates:
        x = replaced.get(x_key, x_key)
        w_ref = w = weight.detach().float()
        calib = inputs.get(n)
        in_scale = None
        if x_key in smooth:
            s_j = smooth[x_key]
            if x_key not in smoothed_inputs:  # one x / s per input tensor, shared by readers
                smoothed_inputs[x_key] = _migrate(gm, x, s_j, where, n, readers[x_key], ctx)
            x, in_scale = smoothed_inputs[x_key]
            w = w * s_j[None, :]
            calib = None if calib is None else calib / s_j
        qmax = 2 ** (cfg.weight_bits - 1) - 1
        w_scale = (w.abs().amax(1) / qmax).clamp(min=1e-12)
        w_q = torch.round(w / w_scale[:, None]).clamp(-qmax, qmax).to(torch.int8).contiguous()
        b = get_constant(gm, bias) if isinstance(bias, torch.fx.Node) else None
        act_scale = None
        if cfg.activations == "static":
            if calib is None:
                raise ConfigError("quantize activations='static' needs calibration data "
                                  "(pass calibration=... or eval_data to optimize()); none "
                                  f"reached {where}")
            act_scale = _static_scale(calib, cfg)
        sq = _layer_sqnr(inputs.get(n), w_ref, calib, w_q, w_scale, b, act_scale)
        layer = {"layer": where, "shape": list(w.shape),
                 "sqnr_db": None if sq is None else round(sq, 2)}
        if sq is not None and sq < cfg.min_sqnr_db:
            ctx.skip(where, f"calibrated SQNR {sq:.1f} dB < min_sqnr_db {cfg.min_sqnr_db:g}")
            layer["kept_float"] = True
            layers.append(layer)
            continue
        wq_node = add_constant(gm, f"{where}.weight_int8", w_q, n)
        ws_node = add_constant(gm, f"{where}.weight_scale", w_scale.float(), n)
        with gm.graph.inserting_before(n):
            q = gm.graph.call_function(torch.ops.optim.linear_int8.default,
                                       (x, wq_node, ws_node, bias, in_scale,
                                        None if act_scale is None else
                                        add_constant(gm, f"{where}.act_scale", act_scale, n)))
        q.meta = {**n.meta}
        n.replace_all_uses_with(q)
        gm.graph.erase_node(n)
        replaced[n] = q
        ctx.record("linear_quantized")
        layers.append(layer)
    ctx.details["layers"] = layers
    sq = [x["sqnr_db"] for x in layers if x["sqnr_db"] is not None and not x.get("kept_float")]
    if sq:
        ctx.details["sqnr_db_min"], ctx.details["sqnr_db_mean"] = min(sq), sum(sq) / len(sq)


def _calibration_inputs(gm, nodes, ctx: PassContext, max_batches: int) -> dict:
    """The activation each candidate linear sees on the calibration batches (concatenated rows)."""
    if not nodes or not ctx.calibration:
        return {}
    seen: dict = {n: [] for n in nodes}
    pairs = [(n.args[0] if n.target is aten.linear.default else n.args[1], n) for n in nodes]

    class Tap(torch.fx.Interpreter):
        def run_node(self, node):
            out = super().run_node(node)
            for src, lin in pairs:
                if src is node:
                    seen[lin].append(out.detach().reshape(-1, out.shape[-1]))
            return out

    with torch.no_grad():
        for args, kwargs in ctx.calibration[:max_batches]:
            Tap(gm).run(*flatten_inputs(gm, args, kwargs))
    return {n: torch.cat(v) for n, v in seen.items() if v}


def _static_scale(x: torch.Tensor, cfg: QuantizeConfig) -> torch.Tensor:
    """One activation scale from calibration rows: max |x| or its `percentile`, over 127."""
    a = x.abs().flatten().float()
    if cfg.calibration_method == "minmax" or cfg.percentile >= 100.0:
        top = a.max()
    else:
        top = a.kthvalue(max(1, min(len(a), round(len(a) * cfg.percentile / 100.0)))).values
    return (top.clamp(min=1e-8) / 127.0).reshape(())


def _layer_sqnr(x, w, x_in, w_q, w_scale, b, act_scale=None) -> float | None:
    """SQNR of the int8 layer (fed `x_in`, the possibly smoothed input) vs fp32 on `x`."""
    if x is None:
        return None
    ref = torch.nn.functional.linear(x.float(), w, b)
    got = torch.ops.optim.linear_int8(x_in.float(), w_q, w_scale, b, None, act_scale)
    return sqnr_db(ref, got)


def _migrate(gm, x, s, where: str, first, readers: set, ctx: PassContext):
    """Make the int8 linears reading `x` see x / s: (their input node, in_scale node or None).

    When x comes (through views) from a norm whose output feeds only these linears (pre-norm
    blocks), s is folded into the norm's affine constants: LayerNorm γ/s and β/s, or the
    RMSNorm weight vector / s (exact, free at run time). Otherwise (a norm output that also
    feeds a residual, or no norm) the quantization kernel multiplies by 1/s on its way through
    x, in the same pass."""
    norm = _foldable_norm(gm, x, readers)
    if norm is not None:
        node, slots = norm
        args = list(node.args)
        for i in slots:
            args[i] = add_constant(gm, f"{where}.norm_smoothed",
                                   get_constant(gm, args[i]).float() / s, node)
        node.args = tuple(args)
        ctx.record("smoothing_folded_into_norm")
        return x, None
    ctx.record("input_smoothed")
    return x, add_constant(gm, f"{where}.smooth_inv", (1.0 / s).float(), first)


VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def _foldable_norm(gm, x, readers: set):
    """(norm node, indices of its args to divide by s), or None. The chain from the norm to x
    must be views with one reader each, so nothing else sees the rescaled values."""
    users = readers
    while x.op == "call_function" and x.target in VIEWS and set(x.users) == users:
        users, x = {x}, x.args[0]
    if x.op != "call_function" or set(x.users) != users:
        return None
    k = x.meta["val"].shape[-1] if "val" in x.meta else None
    if x.target is aten.layer_norm.default and len(x.args) >= 3:
        slots = [i for i in (2, 3) if i < len(x.args) and x.args[i] is not None]
        if slots and all(get_constant(gm, x.args[i]) is not None for i in slots):
            return x, slots
    if x.target is aten.mul.Tensor:  # RMSNorm: weight [K] · normalized x
        for i, a in enumerate(x.args):
            c = get_constant(gm, a) if isinstance(a, torch.fx.Node) else None
            if c is not None and c.dim() == 1 and c.shape[0] == k:
                return x, [i]
    return None


def _smoothing_factors(candidates, inputs: dict, alpha: float) -> dict:
    """{input node: s [K]} for inputs all of whose candidate readers have calibration data."""
    if alpha <= 0:
        return {}
    groups: dict = {}
    for n, _, x, weight, _ in candidates:
        groups.setdefault(x, []).append((n, weight))
    out = {}
    for x, readers in groups.items():
        if any(inputs.get(n) is None for n, _ in readers):
            continue
        act = inputs[readers[0][0]].abs().amax(0).float()
        wmax = torch.stack([w.detach().float().abs().amax(0) for _, w in readers]).amax(0)
        s = act.clamp(min=1e-5).pow(alpha) / wmax.clamp(min=1e-5).pow(1 - alpha)
        out[x] = s.clamp(min=1e-5)
    return out
