"""Attention written on 3-D [B·H, L, D] tensors (BLOOM, DeBERTa) ⇒ the same attention on 4-D
[B, H, L, D] tensors, so `fuse_attention`'s matcher reads it like any other.

    scores4 = view(baddbmm(bias3, q3, kᵀ3, alpha=s) | bmm(q3, kᵀ3), [B, H, Lq, Lk])
    out4    = view(bmm(view(softmax(f(scores4)), [B·H, Lq, Lk]), v3), [B, H, Lq, D])
  ⇒
    scores4 = matmul(q4, kᵀ4) [· s] [+ bias4]
    out4    = matmul(softmax(f(scores4)), v4)

with x4 = view(x3, [-1, H, x3.size(1), x3.size(2)]). Exact: the same products and sums.
"""

from __future__ import annotations

import torch
import torch.fx

from optim.ir import shape

aten = torch.ops.aten
VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
SOFTMAX = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
_SCORE_OPS = {aten.add.Tensor, aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor,
              aten.div.Scalar, aten.masked_fill.Scalar, aten.masked_fill.Tensor}


def lift_bmm_attention(gm: torch.fx.GraphModule) -> int:
    """Rewrite every 3-D attention around a softmax into 4-D ops; returns how many."""
    lifted = 0
    for sm in [n for n in gm.graph.nodes if n.op == "call_function" and n.target in SOFTMAX]:
        output, scores = _output(sm), _scores(sm)
        if output is None or scores is None:
            continue
        heads = scores[0].args[1][1]
        _lift_scores(gm, heads, *scores)
        _lift_output(gm, sm, heads, *output)
        lifted += 1
    return lifted


def _rank(n, r: int) -> bool:
    s = shape(n)
    return s is not None and len(s) == r


def _output(sm: torch.fx.Node):
    """(view to 3-D, bmm, view back to 4-D) after the softmax, each with one reader."""
    if len(sm.users) != 1 or not _rank(sm, 4):
        return None
    v3d = next(iter(sm.users))
    if v3d.target not in VIEWS or len(v3d.users) != 1 or not _rank(v3d, 3):
        return None
    bmm = next(iter(v3d.users))
    if bmm.target is not aten.bmm.default or bmm.args[0] is not v3d or len(bmm.users) != 1:
        return None
    out4 = next(iter(bmm.users))
    if out4.target not in VIEWS or not _rank(out4, 4):
        return None
    return v3d, bmm, out4


def _scores(sm: torch.fx.Node):
    """(the 4-D view of the 3-D score product, the product) upstream of the softmax, through
    adds, scalings and masked fills only; None unless the heads are a fixed number."""
    frontier, seen = [sm.args[0]], set()
    for _ in range(8):
        nxt = []
        for x in frontier:
            if not isinstance(x, torch.fx.Node) or x in seen or x.op != "call_function":
                continue
            seen.add(x)
            if x.target in VIEWS and _rank(x, 4) and _product_3d(x.args[0]):
                dims = x.args[1]
                if isinstance(dims, (list, tuple)) and len(dims) == 4 \
                        and isinstance(dims[1], int) and dims[1] > 0:
                    return x, x.args[0]
                return None
            if x.target in _SCORE_OPS:
                nxt += [a for a in x.args[:2] if isinstance(a, torch.fx.Node)]
        frontier = nxt
    return None


def _product_3d(x, depth: int = 4) -> bool:
    """`x` is a 3-D q·kᵀ product (bmm, baddbmm), or one plus terms of its shape (DeBERTa's
    relative-position scores), each read only on the way to the softmax."""
    if depth == 0 or not isinstance(x, torch.fx.Node) or len(x.users) != 1 or not _rank(x, 3):
        return False
    if x.target in (aten.bmm.default, aten.baddbmm.default):
        return _bias_fits(x)
    if x.target is aten.add.Tensor and len(x.args) == 2 and not x.kwargs:
        a, b = x.args
        return (_product_3d(a, depth - 1) and _rank(b, 3) and shape(b) == shape(x)) or \
            (_product_3d(b, depth - 1) and _rank(a, 3) and shape(a) == shape(x))
    return False


def _bias_fits(prod: torch.fx.Node) -> bool:
    """baddbmm's added term has a row per batch·head (ALiBi's [B·H, 1, Lk]), so it splits into
    heads like q and k."""
    if prod.target is not aten.baddbmm.default:
        return True
    bias, out = shape(prod.args[0]), shape(prod)
    return bias is not None and len(bias) == 3 and out is not None and bias[0] == out[0]


def _four_d(gm, x3: torch.fx.Node, heads: int, before: torch.fx.Node) -> torch.fx.Node:
    """view(x3, [-1, heads, x3.size(1), x3.size(2)]), inserted before `before` (sizes read at
    run time: a graph's meta may hold the traced sizes of axes that are dynamic)."""
    val = x3.meta["val"]
    with gm.graph.inserting_before(before):
        sizes = [gm.graph.call_function(aten.sym_size.int, (x3, i)) for i in (1, 2)]
        for i, s in zip((1, 2), sizes):
            s.meta["val"] = val.shape[i]
        x4 = gm.graph.call_function(aten.view.default, (x3, [-1, heads, *sizes]))
    x4.meta["val"] = val.reshape(-1, heads, *val.shape[1:])
    return x4


def _call(gm, target, args, before, val) -> torch.fx.Node:
    with gm.graph.inserting_before(before):
        n = gm.graph.call_function(target, args)
    n.meta["val"] = val
    return n


def _lift_scores(gm, heads: int, view4: torch.fx.Node, prod: torch.fx.Node) -> None:
    s = _lifted(gm, heads, prod, view4)
    view4.replace_all_uses_with(s)
    gm.graph.erase_node(view4)  # the 3-D product is left for dead-code elimination


def _lifted(gm, heads: int, prod: torch.fx.Node, view4: torch.fx.Node) -> torch.fx.Node:
    """The 4-D form of the 3-D scores `prod` (see `_product_3d`)."""
    if prod.target is aten.add.Tensor:
        a, b = prod.args
        main, term = (a, b) if _product_3d(a) else (b, a)
        return _call(gm, aten.add.Tensor, (_lifted(gm, heads, main, view4),
                                           _four_d(gm, term, heads, view4)),
                     view4, view4.meta["val"])
    if prod.target is aten.baddbmm.default:
        bias3, q3, kt3 = prod.args[:3]
        beta, alpha = prod.kwargs.get("beta", 1), prod.kwargs.get("alpha", 1)
    else:
        (q3, kt3), bias3, beta, alpha = prod.args[:2], None, 1, 1
    q4, kt4 = _four_d(gm, q3, heads, view4), _four_d(gm, kt3, heads, view4)
    s = _call(gm, aten.matmul.default, (q4, kt4), view4, view4.meta["val"])
    if alpha != 1:
        s = _call(gm, aten.mul.Tensor, (s, alpha), view4, view4.meta["val"])
    if bias3 is not None:
        bias4 = _four_d(gm, bias3, heads, view4)
        if beta != 1:
            bias4 = _call(gm, aten.mul.Tensor, (bias4, beta), view4, bias4.meta["val"])
        s = _call(gm, aten.add.Tensor, (s, bias4), view4, view4.meta["val"])
    return s


def _lift_output(gm, sm, heads: int, v3d, bmm, out4) -> None:
    v4 = _four_d(gm, bmm.args[1], heads, out4)
    out = _call(gm, aten.matmul.default, (sm, v4), out4, out4.meta["val"])
    out4.replace_all_uses_with(out)
    for dead in (out4, bmm, v3d):
        gm.graph.erase_node(dead)
