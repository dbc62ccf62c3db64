"""remove_padding: token-wise ops on a padded [B, L, ...] batch ⇒ the same ops on [1, T, ...],
the T real tokens only, packed back to back; attention ⇒ optim::attention_trimmed.

The padding mask that reaches attention (an integer/bool [B, L] input, 1 = real token) gives the
packed positions once per call (`nonzero`); every token-wise op (embedding lookups, linears, float
or quantized, norms, activations, residual adds) then runs on the T real tokens instead of B·L.
Attention runs per sequence on the padded layout: its q, k, v are scattered back to [B, L, ...]
(zeros at padded positions) and `optim::attention_trimmed` runs it over the first n positions
only, n the longest sequence in the batch (the caller may pad every batch to 128 or 512), with
the caller's mask; its output is packed again. Neither torch nor ONNX Runtime has a fused
variable-length attention on CPU, so this is the length-grouped form with one group. Outputs
shaped [B, L, ...] come back in the caller's padded layout with zeros at padded positions, which
nothing reads (pooling weights them by the mask; CLS sits at position 0).

Before it is kept, the rewrite is checked on the example with very uneven lengths (a full row,
a one-token row and rows in between; again with the longest row at half the length, so attention
is trimmed): real tokens must match within `check_atol`. Refuses, with the reason: no attention
mask computed from a [B, L] input (ViT, DiT: nothing is padding), causal attention (decoders pad
on the left and cache keys), or a failed check. The cost model charges the packed token count
and the trimmed attention length of the example. Requires: fuse_attention. Numerics: exact at
real tokens, fp32 max abs error <= 1e-4.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

import optim.ops  # noqa: F401  (registers torch.ops.optim)
from optim import numerics
from optim.ir import (
    flatten_inputs,
    module_path,
    refresh_meta,
    shape,
    trial_copy,
    value_inputs,
)
from optim.pass_base import Exact, PassContext, register_pass

aten = torch.ops.aten
ATTENTION = torch.ops.optim.attention.default
TRIMMED = torch.ops.optim.attention_trimmed.default

# ops whose output row for token t reads only row t of argument 0 (the rest are weights/options)
_ROW_WISE = {
    aten.linear.default, aten.layer_norm.default, aten.gelu.default, aten.relu.default,
    aten.silu.default, aten.tanh.default, aten.sigmoid.default, aten.erf.default,
    aten.exp.default, aten.neg.default, aten.sqrt.default, aten.rsqrt.default,
    aten.pow.Tensor_Scalar, aten.clone.default, aten.contiguous.default, aten._to_copy.default,
    aten.to.dtype, aten.dropout.default, aten.alias.default, aten.detach.default,
    aten.add.Scalar, aten.sub.Scalar, aten.mul.Scalar, aten.div.Scalar,
    torch.ops.optim.linear_int8.default, torch.ops.optim.linear_int4.default,
    torch.ops.optim.linear_binary.default,
}
_LAST_DIMS = {aten.softmax.int, aten._softmax.default, aten.log_softmax.int, aten.mean.dim,
              aten.sum.dim_IntList, aten.amax.default}  # row-wise when reducing dims >= 2
_ELEMENTWISE = {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor,
                aten.where.self}
_EMBEDDING = aten.embedding.default


@dataclass(frozen=True)
class RemovePaddingConfig:
    """Options for remove_padding."""

    check_atol: float = 1e-4  # real tokens must match the padded graph within this (fp32)
    trim_attention: bool = True  # attention over the batch's longest sequence, not all of L


@register_pass("remove_padding", config=RemovePaddingConfig, numerics=Exact(atol=1e-4),
               requires=("fuse_attention",), expects=("ops_packed",))
def remove_padding(gm: torch.fx.GraphModule, cfg: RemovePaddingConfig, ctx: PassContext) -> None:
    """Run every token-wise op on the real tokens only; attention per sequence on the padded
    layout; outputs back in the caller's layout."""
    mask, why = _padding_mask(gm)
    if mask is None:
        ctx.skip("graph", why)
        return
    trial = trial_copy(gm)
    packer = _Packer(trial, trial.graph.find_nodes(op="placeholder", target=mask.target)[0])
    packed, unpacks = packer.run()
    trimmed = packer.trim_attention() if cfg.trim_attention else []
    args, kwargs = ctx.example_inputs
    full = shape(mask)[1]
    for longest in sorted({full, max(1, full // 2)}, reverse=True):  # untrimmed, then trimmed
        check, lengths = _uneven_lengths(trial, mask, args, kwargs, longest)
        err = _max_error_at_real_tokens(gm, trial, check, mask)
        ctx.details.setdefault("checks", []).append(
            {"lengths": lengths, "max_abs_error": float(f"{err:.3g}")})
        if not err <= cfg.check_atol:
            ctx.skip("graph", f"outputs at real tokens changed by {err:.3g} > "
                              f"{cfg.check_atol:g} on a batch of lengths {lengths}: a value "
                              f"computed at padded positions is read by real ones")
            return
    ctx.details["mask"] = mask.target
    gm.graph = trial.graph
    refresh_meta(gm, args, kwargs)  # packed sizes and trimmed lengths at the example
    ctx.record("ops_packed", packed)
    ctx.record("attention_trimmed", len(trimmed))
    ctx.details["example_tokens"] = {"real": int(shape(packer.flat)[0]),
                                     "padded": int(shape(mask)[0] * shape(mask)[1]),
                                     "attended_length": max((t.meta["attended"] for t in trimmed),
                                                            default=None)}
    ctx.details["unpacked_for"] = sorted({str(u.target).replace("aten.", "").split(".")[0]
                                          for u in unpacks})


def _padding_mask(gm: torch.fx.GraphModule):
    """The rank-2 integer/bool input that every attention's mask is computed from, or (None,
    the reason to refuse)."""
    attns = [n for n in gm.graph.nodes if n.target is ATTENTION]
    if not attns:
        return None, "no fused attention (run fuse_attention first)"
    if any(n.args[5] for n in attns):
        return None, "causal attention (a decoder): it pads on the left and caches keys"
    sources = set()
    for n in attns:
        m = n.args[3]
        found = value_inputs(m) if m is not None else set()
        found = {p for p in found if _is_mask_input(p)}
        if len(found) != 1:
            where = module_path(n)
            return None, f"attention {where} has no padding mask computed from a [batch, seq] " \
                         f"input (nothing is padding: every token is real)"
        sources |= found
    if len(sources) != 1:
        return None, f"attentions read different mask inputs: {sorted(p.target for p in sources)}"
    return sources.pop(), None


def _is_mask_input(p: torch.fx.Node) -> bool:
    val = p.meta.get("val")
    return isinstance(val, torch.Tensor) and val.dim() == 2 and \
        (val.dtype == torch.bool or not val.dtype.is_floating_point)


def _same(a, b) -> bool:
    """Two sizes (ints or SymInts) are the same size for every input, not by coincidence."""
    if isinstance(a, torch.SymInt) and isinstance(b, torch.SymInt):
        return a.node.expr == b.node.expr
    if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt):
        return False
    return a == b


class _Packer:
    """Rewrites `gm` in place: token-major values become packed [1, T, ...] versions."""

    def __init__(self, gm: torch.fx.GraphModule, mask: torch.fx.Node):
        self.gm, self.g, self.mask = gm, gm.graph, mask
        self.B, self.L = mask.meta["val"].shape
        self.packed: dict[torch.fx.Node, torch.fx.Node] = {}  # rewritten op -> its packed copy
        self._operands: dict[torch.fx.Node, torch.fx.Node] = {}  # padded value, gathered
        self._packed_values: set[torch.fx.Node] = set()
        self._scattered: dict[torch.fx.Node, torch.fx.Node] = {}  # packed -> padded again
        self.consumers: list[torch.fx.Node] = []  # non-token-wise ops that read packed values

    def run(self) -> tuple[int, list]:
        self._index_nodes()
        count = 0
        for n in list(self.g.nodes):
            if n.op == "call_function" and n not in self._own and self._pack_node(n):
                count += 1
            elif n.op in ("call_function", "output") and n not in self._own:
                self._unpack_inputs(n)
        return count, self.consumers

    def trim_attention(self) -> list[torch.fx.Node]:
        """Every attention over the token axis runs on the first max(position) + 1 positions
        only: beyond them every sequence of the batch is padding."""
        trimmed = []
        for n in list(self.g.find_nodes(op="call_function", target=ATTENTION)):
            q, k, v, mask, scale, _ = n.args
            if not (_same(shape(q)[2], self.L) and _same(shape(k)[2], self.L)):
                continue
            with self.g.inserting_before(n):
                t = self.g.call_function(TRIMMED, (q, k, v, mask, scale, self.cols))
            t.meta = dict(n.meta)
            n.replace_all_uses_with(t)
            self.g.erase_node(n)
            trimmed.append(t)
        return trimmed

    # -- index computation, once per call -------------------------------------------------
    def _index_nodes(self) -> None:
        g, m = self.g, self.mask
        last_input = list(g.find_nodes(op="placeholder"))[-1]
        with g.inserting_before(last_input.next):
            nodes = []

            def add(target, *args, **kwargs):
                node = g.call_function(target, args, kwargs)
                nodes.append(node)
                return node

            self.b_size, self.l_size = add(aten.sym_size.int, m, 0), add(aten.sym_size.int, m, 1)
            keep = add(aten.ne.Scalar, add(aten.reshape.default, m, [-1]), 0)
            self.flat = add(aten.squeeze.dim, add(aten.nonzero.default, keep), 1)
            # each token's sequence and position, from tensors only (the ONNX exporter cannot
            # divide a tensor by a symbolic size)
            ones = add(aten.ones_like.default, m)
            for dim, name in ((0, "rows"), (1, "cols")):
                grid = add(aten.sub.Scalar, add(aten.cumsum.default, ones, dim), 1)
                setattr(self, name, add(aten.index_select.default,
                                        add(aten.reshape.default, grid, [-1]), 0, self.flat))
        self._own = set(nodes)

    # -- rewriting ------------------------------------------------------------------------
    def _token_major(self, x) -> bool:
        s = shape(x)
        return s is not None and len(s) >= 2 and _same(s[0], self.B) and _same(s[1], self.L)

    def _pack_node(self, n: torch.fx.Node) -> bool:
        """Make `n` read packed inputs and produce a packed output, if it is token-wise."""
        if not self._token_major(n) or not self._row_wise(n):
            return False
        rank = len(shape(n))
        new_args = list(n.args)
        slots = [0] if n.target in _ROW_WISE or n.target in _LAST_DIMS else \
            [1] if n.target is _EMBEDDING else range(len(n.args))
        for i in slots:
            a = n.args[i]
            if not isinstance(a, torch.fx.Node):
                continue
            own = n.target in _ROW_WISE or n.target in _LAST_DIMS or n.target is _EMBEDDING
            got = self._packed_operand(a, len(shape(a) or ()) if own else rank, before=n)
            if got is None:
                return False
            new_args[i] = got
        if not any(new_args[i] in self._packed_values for i in slots):
            return False  # nothing token-major among its inputs (e.g. ones(B, L, D))
        with self.g.inserting_before(n):
            p = self.g.call_function(n.target, tuple(new_args), dict(n.kwargs))
        p.meta = dict(n.meta)
        self.packed[n] = p
        self._packed_values.add(p)
        return True

    def _row_wise(self, n: torch.fx.Node) -> bool:
        t = n.target
        if t in _ROW_WISE:
            return isinstance(n.args[0], torch.fx.Node) and self._float_token(n.args[0])
        if t is _EMBEDDING:
            return True
        if t in _LAST_DIMS:
            rank = len(shape(n.args[0]) or ())
            dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
            dims = [dims] if isinstance(dims, int) else list(dims or [])
            return bool(dims) and all(d % rank >= 2 for d in dims) and \
                self._float_token(n.args[0])
        if t in _ELEMENTWISE:
            return all(not isinstance(a, torch.fx.Node) or self._float_token(a)
                       or len(shape(a) or ()) < 3 and not self._token_major(a)
                       for a in n.args if isinstance(a, torch.fx.Node))
        return False

    def _float_token(self, x: torch.fx.Node) -> bool:
        """Hidden-state-like: floating and of rank >= 3 (masks stay padded: their values at
        padded positions matter)."""
        val = x.meta.get("val")
        return isinstance(val, torch.Tensor) and val.dtype.is_floating_point and val.dim() >= 3

    def _packed_operand(self, a: torch.fx.Node, rank: int, before: torch.fx.Node):
        """`a` as an operand of a packed op producing rank `rank`, or None if it cannot be."""
        if a in self.packed:
            return self.packed[a]
        if a in self._operands:
            return self._operands[a]
        s = shape(a)
        if s is None:
            return a  # a non-tensor argument (a SymInt)
        lead = (1,) * (rank - len(s)) + tuple(s)
        if len(s) <= rank - 2 or (lead[0] == 1 and lead[1] == 1):
            return a  # broadcasts over tokens: no token axis of its own
        b_major, l_major = _same(lead[0], self.B), _same(lead[1], self.L)
        index = self.flat if b_major and l_major else self.cols if l_major and lead[0] == 1 \
            else self.rows if b_major and lead[1] == 1 else None
        if index is None:
            return None
        g = self.g
        with g.inserting_before(before):
            x = g.call_function(aten.reshape.default, (a, list(lead))) if len(s) < rank else a
            flat = g.call_function(aten.flatten.using_ints, (x, 0, 1)) if index is self.flat \
                else g.call_function(aten.select.int, (x, 1 if index is self.rows else 0, 0))
            rows = g.call_function(aten.index_select.default, (flat, 0, index))
            p = g.call_function(aten.unsqueeze.default, (rows, 0))
        self._operands[a] = p
        self._packed_values.add(p)
        return p

    def _unpack_inputs(self, n: torch.fx.Node) -> None:
        """Give a non-token-wise op the padded layout of every packed value it reads."""
        def swap(x):
            if not isinstance(x, torch.fx.Node) or x not in self.packed:
                return x
            p = self.packed[x]
            if p not in self._scattered:
                self._scattered[p] = self._scatter(p, x, before=n)
                self.consumers.append(n)
            return self._scattered[p]

        n.args = torch.fx.node.map_aggregate(n.args, swap)
        n.kwargs = torch.fx.node.map_aggregate(n.kwargs, swap)

    def _scatter(self, p: torch.fx.Node, padded: torch.fx.Node, before: torch.fx.Node):
        """[1, T, *R] ⇒ [B, L, *R] with zeros at padded positions."""
        rest = list(shape(padded)[2:])
        g = self.g
        with g.inserting_before(before):
            rows = g.call_function(aten.squeeze.dim, (p, 0))
            zeros = g.call_function(aten.new_zeros.default,
                                    (rows, [self.b_size, self.l_size, *rest]))
            flat = g.call_function(aten.view.default, (zeros, [-1, *rest]))
            filled = g.call_function(aten.index_put.default, (flat, [self.flat], rows))
            out = g.call_function(aten.view.default, (filled, [self.b_size, self.l_size, *rest]))
        return out


def _uneven_lengths(gm, mask: torch.fx.Node, args: tuple, kwargs: dict, longest: int):
    """The example with its mask rewritten to very uneven lengths (right padding): one row of
    `longest` tokens, one of a single token, the rest in between."""
    names = [p.target for p in gm.graph.find_nodes(op="placeholder")]
    flat = flatten_inputs(gm, args, kwargs)
    i = names.index(mask.target)
    m = flat[i]
    b = m.shape[0]
    lengths = [longest if r == 0 else 1 if r == 1 else max(1, longest * r // (b + 1))
               for r in range(b)]
    new = torch.zeros_like(m)
    for r, n in enumerate(lengths):
        new[r, :n] = 1
    flat = [*flat[:i], new, *flat[i + 1:]]
    return flat, lengths


def _max_error_at_real_tokens(before, after, flat: list, mask: torch.fx.Node) -> float:
    names = [p.target for p in before.graph.find_nodes(op="placeholder")]
    keep = flat[names.index(mask.target)]
    with torch.no_grad():
        ref = torch.fx.Interpreter(before).run(*flat)
        got = torch.fx.Interpreter(after).run(*flat)
    return numerics.compare(ref, got, keep)["max_abs_error"]
