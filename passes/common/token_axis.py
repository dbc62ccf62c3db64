"""Follow the token axis through a traced graph and rewrite the token count it carries.

A pass that changes how many tokens flow through part of a graph (token merging) must fix every
shape constant downstream: `view(B, 197, 12, 64)` becomes `view(B, 184, 12, 64)`. Traced graphs
carry these as plain integers, and the same integer may also be a hidden size, so the axis is
followed op by op instead of searching for numbers: each tensor is tagged with the dimension
that holds the tokens, and a `view`/`reshape` maps it through row-major flattening (a token axis
folded into `B·N` for a matmul and split back out is followed too).

`retarget(gm, start, old, new, stop=...)` walks the graph in order from `start` (a node whose
output has `new` tokens on dimension 1 where the graph expected `old`), rewrites the integer
arguments that carry the count, and stops at nodes in `stop` and where the axis is consumed
(reductions over it, attention over keys, selecting one token). Anything it does not understand
raises `TokenAxisError` naming the op, so the caller can refuse the rewrite with that reason.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx

from optim.ir import module_path, shape

aten = torch.ops.aten


class TokenAxisError(Exception):
    """The token axis reached an op whose treatment of it is unknown or unsupported."""


@dataclass(frozen=True)
class Axis:
    """Dimension `dim` holds the tokens: its size is `outer · old · inner` (1, 1 unless folded)."""

    dim: int
    old: int
    new: int
    inner: int = 1

    def moved(self, dim: int) -> Axis:
        return Axis(dim, self.old, self.new, self.inner)


_SAME_SHAPE = {
    aten.gelu.default, aten.relu.default, aten.silu.default, aten.tanh.default,
    aten.sigmoid.default,
    aten.clone.default, aten.contiguous.default, aten._to_copy.default, aten.to.dtype,
    aten.dropout.default, aten.alias.default, aten.detach.default, aten.neg.default,
    aten.exp.default, aten.erf.default, aten.sqrt.default, aten.rsqrt.default,
    aten.pow.Tensor_Scalar,
    aten.softmax.int, aten._softmax.default, aten._safe_softmax.default, aten.log_softmax.int,
    aten.layer_norm.default, aten.linear.default, aten.type_as.default,
}
_BINARY = {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.where.self,
           aten.add.Scalar, aten.mul.Scalar, aten.div.Scalar, aten.sub.Scalar}
_VIEW = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_MATMUL = {aten.matmul.default, aten.bmm.default, aten.mm.default}


def retarget(gm: torch.fx.GraphModule, start: torch.fx.Node, old: int, new: int,
             stop: frozenset = frozenset(), dim: int = 1) -> None:
    """Rewrite shape arguments downstream of `start` for `new` tokens instead of `old` on `dim`,
    up to `stop` nodes and ops that consume the axis. `meta["val"]` is left stale; refresh it
    afterwards (`optim.ir.refresh_meta`)."""
    retarget_axes(gm, {start: Axis(dim, old, new)}, stop)


def retarget_axes(gm: torch.fx.GraphModule, starts: dict, stop: frozenset = frozenset()) -> None:
    """`retarget` from several nodes at once, each with its `Axis` (e.g. both inputs of a gated
    MLP's product, or a head axis: `Axis(2, heads, kept, inner=head_dim)` on [B, L, H·D])."""
    axes: dict[torch.fx.Node, Axis] = dict(starts)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    first = min(order[n] for n in starts)
    for n in list(gm.graph.nodes):
        if n in starts or order[n] <= first or n.op == "output":
            if n.op == "output" and any(a in axes for a in n.all_input_nodes):
                raise TokenAxisError("a graph output carries the changed token count")
            continue
        if n in stop or not any(a in axes for a in n.all_input_nodes):
            continue
        ax = _step(n, axes)
        if ax is not None:
            axes[n] = ax


def _where(n: torch.fx.Node) -> str:
    return f"{n.target} at {module_path(n) or n.name}"


def _step(n: torch.fx.Node, axes: dict) -> Axis | None:
    t = n.target
    x = n.args[0] if n.args else None
    ax = axes.get(x) if isinstance(x, torch.fx.Node) else None
    out_shape = shape(n)
    if t is operator.getitem:
        return ax if ax is not None and shape(n) is not None and \
            len(shape(n)) > ax.dim and shape(n)[ax.dim] == shape(x)[ax.dim] else None
    if t is torch.ops.optim.attention.default:
        q, k, v, mask = n.args[:4]
        if mask is not None and mask in axes:
            raise TokenAxisError(f"{_where(n)}: its mask depends on the merged tokens")
        if mask is not None and (k in axes or v in axes):
            raise TokenAxisError(f"{_where(n)}: has an attention mask over the old token count")
        if q in axes:
            return axes[q]  # [B, H, Lq, D] -> output [B, H, Lq, Dv]
        return None  # keys/values only: the token axis is contracted away
    if ax is None and t not in _BINARY and t not in _MATMUL and t is not aten.cat.default \
            and t is not aten.addmm.default:
        raise TokenAxisError(f"{_where(n)}: the token axis reaches it through a secondary input")
    if t in _SAME_SHAPE:  # (softmax over tokens too: the shape is unchanged)
        if t is aten.layer_norm.default and ax.dim >= len(shape(x)) - len(n.args[1]):
            raise TokenAxisError(f"{_where(n)}: normalizes over the token axis")
        if t is aten.linear.default and ax.dim == len(shape(x)) - 1:
            raise TokenAxisError(f"{_where(n)}: a linear layer mixes tokens")
        return ax
    if t in _BINARY:
        return _broadcast(n, axes)
    if t in _VIEW:
        return _view(n, ax)
    if t is aten.permute.default:
        perm = [d % len(shape(x)) for d in n.args[1]]
        return ax.moved(perm.index(ax.dim))
    if t is aten.transpose.int:
        d0, d1 = (d % len(shape(x)) for d in n.args[1:3])
        return ax.moved(d1 if ax.dim == d0 else d0 if ax.dim == d1 else ax.dim)
    if t is aten.t.default:
        return ax.moved(1 - ax.dim)
    if t is aten.unsqueeze.default:
        d = n.args[1] % (len(shape(x)) + 1)
        return ax.moved(ax.dim + (d <= ax.dim))
    if t in (aten.squeeze.dim, aten.squeeze.dims):
        dims = n.args[1] if isinstance(n.args[1], (list, tuple)) else [n.args[1]]
        dims = [d % len(shape(x)) for d in dims if shape(x)[d % len(shape(x))] == 1]
        return ax.moved(ax.dim - sum(d < ax.dim for d in dims))
    if t is aten.expand.default:
        sizes = list(n.args[1])
        lead = len(sizes) - len(shape(x))
        if sizes[ax.dim + lead] != -1:
            sizes[ax.dim + lead] = _resize(sizes[ax.dim + lead], ax, n)
        n.args = (x, sizes, *n.args[2:])
        return ax.moved(ax.dim + lead)
    if t in (aten.mean.dim, aten.sum.dim_IntList, aten.amax.default):
        rank = len(shape(x))
        dims = [d % rank for d in (n.args[1] if len(n.args) > 1 else range(rank))]
        keep = n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False)
        if ax.dim in dims:
            return None  # pooled over tokens
        return ax if keep else ax.moved(ax.dim - sum(d < ax.dim for d in dims))
    if t is aten.select.int:
        d = n.args[1] % len(shape(x))
        if d == ax.dim:
            return None  # one token picked (the caller checks it is a protected one)
        return ax.moved(ax.dim - (d < ax.dim))
    if t is aten.slice.Tensor:
        d = n.args[1] % len(shape(x)) if len(n.args) > 1 else 0
        if d != ax.dim:
            return ax
        start = n.args[2] if len(n.args) > 2 and n.args[2] is not None else 0
        end = n.args[3] if len(n.args) > 3 and n.args[3] is not None else math.inf
        step = n.args[4] if len(n.args) > 4 else 1
        if ax.inner != 1 or step != 1 or end < ax.old:
            raise TokenAxisError(f"{_where(n)}: slices tokens [{start}:{end}:{step}]")
        return Axis(ax.dim, ax.old - start, ax.new - start)
    if t is aten.cat.default:
        dim = (n.args[1] if len(n.args) > 1 else 0) % len(out_shape)
        parts = [axes.get(a) for a in n.args[0]]
        ax = parts[0]
        if ax is None or any(p != ax for p in parts) or dim == ax.dim:
            raise TokenAxisError(f"{_where(n)}: concatenates along, or with tensors without, "
                                 f"the changed axis")
        return ax
    if t in (aten.native_layer_norm.default,):
        if ax.dim >= len(shape(x)) - len(n.args[1]):
            raise TokenAxisError(f"{_where(n)}: normalizes over the token axis")
        return ax
    if t in _MATMUL or t is aten.addmm.default:
        return _matmul(n, axes)
    raise TokenAxisError(f"{_where(n)}: no rule for how this op treats the token axis "
                         f"(output shape {out_shape})")


def _resize(size: int, ax: Axis, n) -> int:
    if not isinstance(size, int):  # read from an input at run time (a dynamic axis)
        raise TokenAxisError(f"{_where(n)}: the size to rewrite is computed from a dynamic input "
                             f"shape, not a constant")
    if size % (ax.old * ax.inner):
        raise TokenAxisError(f"{_where(n)}: size {size} does not hold {ax.old} whole tokens")
    return size // ax.old * ax.new


def _broadcast(n: torch.fx.Node, axes: dict) -> Axis:
    rank = len(shape(n))
    found = None
    for a in n.args:
        if not isinstance(a, torch.fx.Node):
            continue
        s = shape(a) or ()
        if a in axes:
            ax = axes[a].moved(axes[a].dim + rank - len(s))
            if found is not None and found != ax:
                raise TokenAxisError(f"{_where(n)}: combines tensors whose tokens differ")
            found = ax
    for a in n.args:
        if isinstance(a, torch.fx.Node) and a not in axes:
            s = shape(a) or ()
            d = found.dim - (rank - len(s))
            if d >= 0 and s[d] != 1:
                raise TokenAxisError(f"{_where(n)}: adds or multiplies a tensor that has the "
                                     f"old token count ({a.name}, shape {tuple(s)})")
    return found


def _view(n: torch.fx.Node, ax: Axis) -> Axis:
    x = n.args[0]
    src, dst = shape(x), list(shape(n))
    q = math.prod(src[ax.dim + 1:]) * ax.inner  # elements per token, row-major
    for j in range(len(dst)):
        after = math.prod(dst[j + 1:])
        if q % after == 0 and math.prod(dst[j:]) % (q * ax.old) == 0 and after <= q:
            sizes = list(n.args[1])
            if sizes[j] == -1:  # inferred: follows the token count by itself
                return Axis(j, ax.old, ax.new, q // after)
            # other sizes stay as traced: a -1 or a size read from an input (dynamic shapes)
            sizes[j] = _resize(sizes[j], Axis(j, ax.old, ax.new, q // after), n)
            n.args = (x, sizes, *n.args[2:])
            return Axis(j, ax.old, ax.new, q // after)
    raise TokenAxisError(f"{_where(n)}: splits the token axis ({tuple(src)} -> {tuple(dst)})")


def _matmul(n: torch.fx.Node, axes: dict) -> Axis | None:
    if n.target is aten.addmm.default:
        bias, a, b = n.args[:3]
        if bias in axes:
            raise TokenAxisError(f"{_where(n)}: the bias carries tokens")
    else:
        a, b = n.args[:2]
    rank = len(shape(n))
    out = None
    if a in axes:
        d = axes[a].dim - len(shape(a)) + rank
        if axes[a].dim == len(shape(a)) - 1:
            out = None if b in axes else "contracted"
        else:
            out = axes[a].moved(d)
    if b in axes:
        db = axes[b].dim
        if db == len(shape(b)) - 2:
            if not (a in axes and axes[a].dim == len(shape(a)) - 1):
                raise TokenAxisError(f"{_where(n)}: contracts tokens against a non-token axis")
            return None  # scores @ values over keys: consumed
        if db == len(shape(b)) - 1:
            if isinstance(out, Axis):
                raise TokenAxisError(f"{_where(n)}: tokens on both sides (q·kᵀ unfused)")
            return axes[b].moved(rank - 1)
        out = axes[b].moved(db - len(shape(b)) + rank) if out is None else out
    if out == "contracted":
        raise TokenAxisError(f"{_where(n)}: contracts the token axis against weights")
    return out
