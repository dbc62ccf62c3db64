"""cleanup: inference no-ops ⇒ nothing; linears written out by hand ⇒ `aten.linear`.

Removes what export leaves for training or checking only: `dropout(x, p, train=False)`,
`_assert_tensor_metadata`, `to(x, dtype)` when x already has that dtype, `alias`, `clone`, and
`contiguous`-style copies of values nothing mutates. A linear written as `x @ W.T (+ b)` (a
matmul with a transposed constant weight, as Falcon writes them) becomes `linear(x, W, b)`,
so every weight-bearing pass sees it. Numerics: exact (float reordering at most).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from optim.ir import get_constant
from optim.pass_base import Exact, PassContext, register_pass

aten = torch.ops.aten

_ASSERTS = {aten._assert_tensor_metadata.default, aten._assert_scalar.default}
_IDENTITY = {aten.alias.default, aten.clone.default, aten.lift_fresh_copy.default}
_CASTS = {aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default}


@dataclass(frozen=True)
class CleanupConfig:
    """No options: every rule is exact."""


def _input_dtype(node: torch.fx.Node):
    val = node.args[0].meta.get("val") if isinstance(node.args[0], torch.fx.Node) else None
    return getattr(val, "dtype", None)


def _mutated(node: torch.fx.Node) -> bool:
    """Whether any user of `node` writes into it (then a copy of it is not a no-op)."""
    for u in node.users:
        schema = getattr(u.target, "_schema", None)
        if schema is not None and schema.is_mutable:
            return True
    return False


def _is_noop_cast(n: torch.fx.Node) -> bool:
    if n.target not in _CASTS:
        return False
    kwargs = dict(n.kwargs)
    if n.target is aten.to.dtype and len(n.args) > 1:
        kwargs["dtype"] = n.args[1]
    allowed = {"dtype", "layout", "device", "copy", "non_blocking", "memory_format"}
    if set(kwargs) - allowed or kwargs.get("device") not in (None, torch.device("cpu")):
        return False
    return kwargs.get("dtype", _input_dtype(n)) == _input_dtype(n)


# the check compares with the eager model, not the captured graph: the captured graph may already
# differ by float reordering (2e-8 seen on MiniLM at seq 32), so exact means "reordering only"
@register_pass("cleanup", config=CleanupConfig, numerics=Exact(atol=1e-6))
def cleanup(gm: torch.fx.GraphModule, cfg: CleanupConfig, ctx: PassContext) -> None:
    """Drop inference no-ops (eval dropout, metadata asserts, same-dtype casts, copies)."""
    for n in list(gm.graph.nodes):
        if n.op == "call_function" and n.target in _MATMULS:
            _as_linear(gm, n, ctx)
    for n in list(gm.graph.nodes):
        if n.op != "call_function":
            continue
        if n.target in _ASSERTS and not n.users:
            gm.graph.erase_node(n)
            ctx.record("assert_removed")
        elif n.target is aten.dropout.default and (n.args[2] if len(n.args) > 2 else
                                                   n.kwargs.get("train")) is False:
            n.replace_all_uses_with(n.args[0])
            gm.graph.erase_node(n)
            ctx.record("dropout_removed")
        elif (n.target in _IDENTITY and len(n.args) == 1 and not n.kwargs.get("memory_format")
              and not _mutated(n) and not _mutated(n.args[0])):
            n.replace_all_uses_with(n.args[0])
            gm.graph.erase_node(n)
            ctx.record("copy_removed")
        elif _is_noop_cast(n) and not _mutated(n) and not _mutated(n.args[0]):
            n.replace_all_uses_with(n.args[0])
            gm.graph.erase_node(n)
            ctx.record("cast_removed")


_MATMULS = {aten.matmul.default, aten.mm.default}


def _transposed_weight(gm, t) -> torch.fx.Node | None:
    """W when `t` is W.T for a 2-D constant W (`numpy_T`, `t`, `transpose(0, 1)`,
    `permute([1, 0])`)."""
    if not isinstance(t, torch.fx.Node) or t.op != "call_function":
        return None
    w = t.args[0]
    c = get_constant(gm, w)
    if c is None or c.dim() != 2:
        return None
    if t.target in (aten.numpy_T.default, aten.t.default):
        return w
    if t.target is aten.transpose.int and sorted(d % 2 for d in t.args[1:3]) == [0, 1]:
        return w
    if t.target is aten.permute.default and [d % 2 for d in t.args[1]] == [1, 0]:
        return w
    return None


def _as_linear(gm, n: torch.fx.Node, ctx: PassContext) -> None:
    """`matmul(x, W.T)` ⇒ `linear(x, W)`, taking in the `+ b` that follows when b is a constant
    vector of the output width and the product has no other reader."""
    x, t = n.args[0], n.args[1]
    w = _transposed_weight(gm, t)
    xv = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
    if w is None or xv is None or xv.dim() < 1 or (n.target is aten.mm.default
                                                   and xv.dim() != 2):
        return
    out = get_constant(gm, w).shape[0]
    bias, tail = None, n
    add = next(iter(n.users)) if len(n.users) == 1 else None
    if add is not None and add.target is aten.add.Tensor and len(add.args) == 2 \
            and not add.kwargs:
        other = add.args[1] if add.args[0] is n else add.args[0]
        b = get_constant(gm, other)
        if b is not None and b.dim() == 1 and b.shape[0] == out and b.dtype == xv.dtype:
            bias, tail = other, add
    with gm.graph.inserting_before(tail):
        lin = gm.graph.call_function(aten.linear.default, (x, w, bias))
    lin.meta = {**tail.meta}
    tail.replace_all_uses_with(lin)
    for dead in (tail, n) if tail is not n else (n,):
        gm.graph.erase_node(dead)
    ctx.record("linear_canonicalized")
