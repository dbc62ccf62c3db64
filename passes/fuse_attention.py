"""fuse_attention: softmax(q·kᵀ·s [+ mask])·v, or aten SDPA  ⇒  optim::attention(q, k, v, mask, s).

Finds every attention whatever form it was traced in: an existing
`aten.scaled_dot_product_attention`, or the explicit chain
`matmul(q, kᵀ) → [mul|div by a constant] → [add mask] → softmax(-1) → matmul(·, v)`
(GPT-2 eager, hand-written blocks), also written on 3-D [B·H, L, D] tensors (BLOOM's ALiBi
`baddbmm`, DeBERTa-v2's relative-position scores; lifted to 4-D first,
`passes.common.bmm_attention`). Several added terms and masked fills before the softmax
(padding mask, position bias) become one additive mask. The fused op carries heads, head size,
scale, mask and causality; each backend lowers it to a fused kernel. A mask that lets every
query see every key whatever the input (ViT passes an all-True one) is dropped, so kernels
take their unmasked path.
Requires: cleanup (no eval dropout or no-op casts between the steps). Numerics: exact, fp32 max
abs error <= 1e-4.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx
from torch.utils import _pytree as pytree

import optim.ops  # noqa: F401  (registers torch.ops.optim)
from optim.ir import depends_on_inputs, evaluate_nodes, get_constant, module_path, shape
from optim.pass_base import Exact, PassContext, register_pass
from passes.common.bmm_attention import lift_bmm_attention

aten = torch.ops.aten
_SOFTMAX = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
_MATMUL = {aten.matmul.default, aten.bmm.default}
_SDPA = {aten.scaled_dot_product_attention.default}


@dataclass(frozen=True)
class FuseAttentionConfig:
    """Options for fuse_attention."""

    min_seq_len: int = 0  # attentions with fewer key positions stay unfused


@register_pass("fuse_attention", config=FuseAttentionConfig, numerics=Exact(atol=1e-4),
               requires=("cleanup",), expects=("attention_fused",))
def fuse_attention(gm: torch.fx.GraphModule, cfg: FuseAttentionConfig, ctx: PassContext) -> None:
    """Fuse every attention (explicit matmul/softmax chains and SDPA) into optim::attention."""
    ctx.record("bmm_attention_lifted", lift_bmm_attention(gm))
    found = []
    for n in list(gm.graph.nodes):
        if n.op != "call_function":
            continue
        if n.target in _SDPA:
            match = _match_sdpa(n)
        elif n.target in _SOFTMAX:
            match = _match_explicit(gm, n)
        else:
            continue
        where = module_path(n)
        if isinstance(match, str):
            ctx.skip(where, match)
            continue
        q, k, v, mask, scale, causal, out = match
        qs, ks = shape(q), shape(k)
        if ks[-2] < cfg.min_seq_len:
            ctx.skip(where, f"{ks[-2]} key positions < min_seq_len {cfg.min_seq_len}")
            continue
        with gm.graph.inserting_before(out):
            fused = gm.graph.call_function(torch.ops.optim.attention.default,
                                           (q, k, v, mask, float(scale), bool(causal)))
        fused.meta = {**out.meta}
        out.replace_all_uses_with(fused)
        gm.graph.erase_node(out)  # SDPA is tagged nondeterministic_seeded, so DCE keeps it
        ctx.record("attention_fused")
        found.append({"where": where, "heads": qs[1], "kv_heads": ks[1], "head_dim": qs[-1],
                      "q_len": qs[-2], "k_len": ks[-2], "scale": round(float(scale), 6),
                      "mask": list(shape(mask)) if mask is not None else None,
                      "causal": bool(causal), "form": "sdpa" if n.target in _SDPA else "explicit"})
    ctx.details["attentions"] = found
    _drop_no_op_masks(gm, ctx)


def _drop_no_op_masks(gm: torch.fx.GraphModule, ctx: PassContext) -> None:
    fused = [n for n in gm.graph.nodes if n.target is torch.ops.optim.attention.default
             and isinstance(n.args[3], torch.fx.Node) and not depends_on_inputs(n.args[3])]
    tensors = [*gm.parameters(), *gm.buffers(), *pytree.tree_leaves(ctx.example_inputs)]
    if not fused or any(isinstance(t, torch.Tensor) and t.is_meta for t in tensors):
        return  # meta weights (estimate-only graphs) have no values to check
    gm.recompile()
    values = evaluate_nodes(gm, [n.args[3] for n in fused], *ctx.example_inputs)
    for n in fused:
        m = values[n.args[3]]
        if bool(m.all()) if m.dtype == torch.bool else bool((m == 0).all()):
            n.args = (*n.args[:3], None, *n.args[4:])
            ctx.record("no_op_mask_dropped")


def _match_sdpa(n: torch.fx.Node):
    names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]
    a = dict(zip(names, n.args))
    a.update(n.kwargs)
    q, k, v = a["query"], a["key"], a["value"]
    if a.get("dropout_p", 0.0):
        return f"attention dropout p={a['dropout_p']} (the model is in training mode?)"
    qs, ks = shape(q), shape(k)
    if qs is None or len(qs) != 4 or ks is None or len(ks) != 4:
        return f"attention inputs are not 4-D [B, H, L, D] (q shape {qs})"
    scale = a.get("scale") or 1.0 / math.sqrt(qs[-1])
    return q, k, v, a.get("attn_mask"), scale, bool(a.get("is_causal", False)), n


def _scalar(gm, x):
    """A Python number, or a 0-d / 1-element constant tensor, as float; else None."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x)
    t = get_constant(gm, x)
    if t is not None and t.numel() == 1:
        return float(t.item())
    return None


def _match_explicit(gm: torch.fx.GraphModule, sm: torch.fx.Node):
    dim = sm.args[1] if len(sm.args) > 1 else sm.kwargs.get("dim")
    s_in = sm.args[0]
    rank = len(shape(s_in) or ())
    if dim not in (-1, rank - 1):
        return f"softmax over dim {dim}, not the key axis"
    # downstream: softmax -> matmul(probs, v), probs used nowhere else
    users = list(sm.users)
    if len(users) != 1 or users[0].target not in _MATMUL or users[0].args[0] is not sm:
        seen = ", ".join(_seen(u) for u in users[:3]) or "nothing"
        return f"softmax output is not consumed only by matmul(probs, v): read by {seen}"
    out = users[0]
    v = out.args[1]
    # upstream: [add masks and biases | masked fill] <- [mul/div scale] <- matmul(q, kT)
    x, masks, scale = s_in, [], 1.0
    for _ in range(8):
        if not isinstance(x, torch.fx.Node) or x.op != "call_function":
            break
        if x.target in (aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar):
            c = _scalar(gm, x.args[1])
            if c is None:
                c, other = _scalar(gm, x.args[0]), x.args[1]
            else:
                other = x.args[0]
            if c is None or c == 0 or x.target in (aten.div.Tensor, aten.div.Scalar) and \
                    _scalar(gm, x.args[1]) is None:
                return "scores are scaled by a non-constant"
            scale *= c if x.target in (aten.mul.Tensor, aten.mul.Scalar) else 1.0 / c
            x = other
        elif x.target in (aten.add.Tensor,) and len(x.args) == 2 \
                and x.kwargs.get("alpha", 1) == 1:
            if scale != 1.0:  # (scores + mask)·c would scale the mask too
                return "mask is added before the scale"
            a, b = x.args
            if _leads_to_matmul(a):
                x, term = a, b
            elif _leads_to_matmul(b):
                x, term = b, a
            else:
                return (f"softmax input adds {_seen(a)} and {_seen(b)}; neither leads to a "
                        f"q·kᵀ matmul")
            if not isinstance(term, torch.fx.Node):
                return "mask is a constant scalar"
            masks.append(term)
        elif x.target in _MASKED_FILL:
            if scale != 1.0:
                return "mask is filled in before the scale"
            fill = _scalar(gm, x.args[2])
            if fill is None or fill > -1e4:  # only a fill that zeroes the softmax weight
                return f"scores are filled with {x.args[2]} where masked, not a large negative"
            with gm.graph.inserting_before(out):
                term = gm.graph.call_function(aten.where.Scalar, (x.args[1], fill, 0.0))
            term.meta["val"] = torch.where(x.args[1].meta["val"], fill, 0.0)
            masks.append(term)
            x = x.args[0]
        else:
            break
    if not isinstance(x, torch.fx.Node) or x.target not in _MATMUL:
        return f"softmax input is {_seen(x)}, not a q·kᵀ matmul"
    mask = _summed(gm, masks, out)
    q, kt = x.args
    qs, kts, vs = shape(q), shape(kt), shape(v)
    if qs is None or len(qs) != 4 or kts is None or len(kts) != 4 or vs is None or len(vs) != 4:
        return f"attention operands are not 4-D [B, H, L, D] (q shape {qs})"
    if isinstance(mask, torch.fx.Node):
        ms = shape(mask)
        try:
            torch.broadcast_shapes(ms, (qs[0], qs[1], qs[2], kts[-1]))
        except RuntimeError:
            return f"mask shape {ms} does not broadcast to the scores"
    k = _untranspose(gm, kt, out)
    return q, k, v, mask, scale, False, out


def _leads_to_matmul(x, depth: int = 6) -> bool:
    """Whether `x` is a matmul, through scalings, added terms and masked fills."""
    if depth == 0 or not isinstance(x, torch.fx.Node) or x.op != "call_function":
        return False
    if x.target in _MATMUL:
        return True
    if x.target in (aten.mul.Tensor, aten.div.Tensor, aten.mul.Scalar, aten.div.Scalar) \
            or x.target in _MASKED_FILL:
        return _leads_to_matmul(x.args[0], depth - 1)
    if x.target is aten.add.Tensor:
        return any(_leads_to_matmul(a, depth - 1) for a in x.args[:2])
    return False


_MASKED_FILL = {aten.masked_fill.Scalar, aten.masked_fill.Tensor}


def _seen(x) -> str:
    """What a matcher found where it wanted something else, for a skip reason."""
    if not isinstance(x, torch.fx.Node):
        return f"the constant {x!r}"
    what = x.target if x.op == "call_function" else x.op
    return f"{str(what).replace('aten.', '')} (node {x.name}, shape {list(shape(x) or [])})"


def _summed(gm, masks: list, before: torch.fx.Node):
    """One additive mask from several terms (padding mask, position bias, ...), or None."""
    if not masks:
        return None
    total = masks[0]
    for term in masks[1:]:
        with gm.graph.inserting_before(before):
            nxt = gm.graph.call_function(aten.add.Tensor, (total, term))
        nxt.meta["val"] = total.meta["val"] + term.meta["val"]
        total = nxt
    return total


def _untranspose(gm: torch.fx.GraphModule, kt: torch.fx.Node, before: torch.fx.Node):
    """k from kᵀ: reuse the input of transpose(k, -2, -1), else insert a transpose."""
    if kt.target is aten.transpose.int:
        d0, d1 = sorted(int(d) % 4 for d in kt.args[1:3])
        if (d0, d1) == (2, 3):
            return kt.args[0]
    with gm.graph.inserting_before(before):
        k = gm.graph.call_function(aten.transpose.int, (kt, -2, -1))
    k.meta["val"] = kt.meta["val"].transpose(-2, -1)
    return k


