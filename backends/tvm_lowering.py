"""Relax lowerings of optim's custom ops, for TVM's `from_exported_program(custom_convert_map=)`.

- `optim::attention(q, k, v, mask, scale, causal)` ⇒ softmax(q·kᵀ·scale + mask)·v in Relax ops
  (grouped-query heads repeated, boolean masks turned additive, causal as a lower-triangular
  mask).
- `aten.cumsum` of a bool tensor ⇒ cast to the output integer type first (TVM would add bools).
- `aten.gelu` ⇒ its erf (or tanh) formula in elementwise Relax ops, so that the fast-math pass
  can swap in vectorizable erf/tanh and the whole GELU fuses into the matmul before it (TVM's own
  gelu op legalizes to a scalar libm `erff` call per element).
- `optim::attention_trimmed` ⇒ the inputs sliced to the longest sequence (a shape variable
  taken from the positions' max), attention, zeros padded back; `aten.nonzero` ⇒ Relax's,
  its count bound to a new shape variable; `aten.index_put` with one index over the leading
  axis ⇒ a row scatter (remove_padding's packed graphs).
- `aten.slice` ⇒ TVM's, on a non-negative axis (decomposed `torch.diff` slices axis -1,
  which TVM's slice rejects under symbolic shapes), with a length TVM cannot simplify
  (`min(s, 512)` where s ≤ 512) restated as torch's symbol.
- `aten.amax` ⇒ Relax `max` over the same axes; `aten.exp2` ⇒ exp(x·ln 2) (TVM's torch importer
  knows neither; linear attention's performer features use both).
- `optim::linear_int8(x, w_q, w_scale, bias, in_scale, act_scale)` ⇒ x · in_scale (if given),
  symmetric int8 quantization per token (or with the static `act_scale`),
  an int8 × int8 → int32 matmul, and the fp32 rescale plus bias. Same integers as the torch
  kernel (its u8 activations are these int8 values + 128).
"""

from __future__ import annotations

import math

import torch
import tvm
from tvm import relax, tirx
from tvm.relax import op as R


def _arg(importer, node, i):
    a = node.args[i] if i < len(node.args) else None
    return importer.env[a] if hasattr(a, "op") else a


def _meta(node, i):
    """Shape and dtype of argument i, from the FX node's fake-tensor metadata (a symbolic size
    stays a torch SymInt: use `_dims` where sizes may be symbolic)."""
    val = node.args[i].meta["val"]
    return [d if isinstance(d, torch.SymInt) else int(d) for d in val.shape], val.dtype


def _dims(x: relax.Expr) -> list:
    """The Relax shape of `x`: ints and symbolic TIR expressions."""
    return list(x.ty.shape.values)


def convert_slice(node, importer) -> relax.Var:
    """TVM's slice, with the result's shape restated where TVM cannot simplify it:
    `position_ids[:, :seq]` of a 512-long buffer has length min(seq, 512), which TVM keeps as
    `T.min(s, 512)` although s ≤ 512; the broadcasts after it then lose their shapes. torch
    knows the length is `s` (its range bounds it): the result is reshaped to torch's shape
    (a Relax `match_cast` here made TVM's FuseTIR crash)."""
    if len(node.args) > 1 and isinstance(node.args[1], int) and node.args[1] < 0:
        # the node belongs to the program `to_relax` exported for this import alone
        node.args = (node.args[0], node.args[1] % node.args[0].meta["val"].dim(),
                     *node.args[2:])
    out = importer._slice(node)
    sinfo = out.ty
    if not isinstance(sinfo, relax.TensorType) or sinfo.shape is None:
        return out
    names = {v.name: v for d in _dims(importer.env[node.args[0]]) + _dims(out)
             for v in _vars(d)}
    want, changed = [], False
    for got, size in zip(_dims(out), node.meta["val"].shape):
        expr = size.node.expr if isinstance(size, torch.SymInt) else None
        if expr is not None and expr.is_Symbol and str(expr) in names and \
                not _same(got, names[str(expr)]):
            want.append(names[str(expr)])
            changed = True
        else:
            want.append(got)
    if not changed:
        return out
    return importer.block_builder.emit(R.reshape(out, want))


def _vars(d) -> list:
    return tirx.analysis.undefined_vars(d) if tvm.ir.is_prim_expr(d) else []


def _same(a, b) -> bool:
    return tvm.ir.is_prim_expr(a) and a.same_as(b)


def convert_attention(node, importer) -> relax.Var:
    q, k, v, mask = (_arg(importer, node, i) for i in range(4))
    return _attend(importer.block_builder, q, k, v, mask, _meta(node, 3)[1] == torch.bool
                   if mask is not None else False, node.args[4], node.args[5])


def _attend(bb, q, k, v, mask, bool_mask: bool, scale: float, causal: bool) -> relax.Var:
    """softmax(q·kᵀ·scale + mask)·v on [B, H, L, D] Relax tensors (kv heads repeated for GQA)."""
    heads, kv_heads = int(_dims(q)[1]), int(_dims(k)[1])
    if kv_heads != heads:  # grouped-query attention: each kv head serves heads/kv_heads queries
        k = bb.emit(R.repeat(k, heads // kv_heads, axis=1))
        v = bb.emit(R.repeat(v, heads // kv_heads, axis=1))
    scores = bb.emit(R.matmul(q, R.permute_dims(k, [0, 1, 3, 2])))
    scores = bb.emit(R.multiply(scores, relax.const(float(scale), "float32")))
    if mask is not None:
        if bool_mask:
            neg = relax.const(float("-inf"), "float32")
            mask = bb.emit(R.where(mask, relax.const(0.0, "float32"), neg))
        scores = bb.emit(R.add(scores, mask))
    if causal:  # query i (of the last lq positions) sees keys up to its own position
        lq, lk = _dims(q)[2], _dims(k)[2]
        rows = R.expand_dims(R.arange(lk - lq, lk, dtype="int64"), 1)
        cols = R.expand_dims(R.arange(0, lk, dtype="int64"), 0)
        additive = bb.emit(R.where(R.less_equal(cols, rows), relax.const(0.0, "float32"),
                                   relax.const(-1e30, "float32")))
        scores = bb.emit(R.add(scores, additive))
    probs = bb.emit(R.nn.softmax(scores, axis=-1))
    return bb.emit(R.matmul(probs, v))


def convert_attention_trimmed(node, importer) -> relax.Var:
    """`optim::attention_trimmed`: attention over the first n = max(positions) + 1 positions,
    zeros after. n is data: it becomes a shape variable (the positions' max as a Relax shape,
    match-cast), the inputs are sliced to it and the output is padded back with zeros."""
    bb = importer.block_builder
    q, k, v, mask = (_arg(importer, node, i) for i in range(4))
    positions = _arg(importer, node, 5)
    n = tirx.Var(f"seq_{node.name}", "int64")  # named for its axis: tuned at the seq buckets
    longest = bb.emit(R.reshape(R.add(R.max(positions), relax.const(1, "int64")), [1]))
    bb.match_cast(bb.emit(R.tensor_to_shape(longest)), relax.ShapeType([n]))

    def first_n(x, axis):  # restated as n: TVM types the slice as min(n, L), which fusion
        want = _dims(x)     # cannot handle (n ≤ L: it is a position plus one)
        want[axis] = n
        return bb.emit(R.reshape(R.strided_slice(x, axes=[axis], begin=[0], end=[n]), want))

    q, k, v = (first_n(x, 2) for x in (q, k, v))
    if mask is not None:
        for axis in (2, 3):
            if not (isinstance(_dims(mask)[axis], tirx.IntImm) and int(_dims(mask)[axis]) == 1):
                mask = first_n(mask, axis)
    out = _attend(bb, q, k, v, mask, mask is not None and _meta(node, 3)[1] == torch.bool,
                  node.args[4], False)
    b, h, length, d = _dims(_arg(importer, node, 0))
    rest = bb.emit(R.zeros([b, h, length - n, _dims(v)[3]], "float32"))
    return bb.emit(R.concat([out, rest], axis=2))


def convert_linear_int8(node, importer) -> relax.Var:
    bb = importer.block_builder
    x, w_q, w_scale, bias = (_arg(importer, node, i) for i in range(4))
    shape = _dims(x)
    k, n = int(shape[-1]), _meta(node, 1)[0][0]
    x2 = bb.emit(R.reshape(x, (-1, k)))
    if len(node.args) > 4 and node.args[4] is not None:
        x2 = bb.emit(R.multiply(x2, _arg(importer, node, 4)))
    if len(node.args) > 5 and node.args[5] is not None:  # static: one calibrated scale
        s = _arg(importer, node, 5)
    else:
        amax = bb.emit(R.max(R.abs(x2), axis=-1, keepdims=True))
        s = bb.emit(R.divide(R.maximum(amax, relax.const(1e-8, "float32")),
                             relax.const(127.0, "float32")))
    q = bb.emit(R.astype(R.clip(R.round(R.divide(x2, s)), -127, 127), "int8"))
    acc = bb.emit(R.matmul(q, R.permute_dims(w_q, [1, 0]), out_dtype="int32"))
    y = bb.emit(R.multiply(R.multiply(R.astype(acc, "float32"), s), w_scale))
    if bias is not None:
        y = bb.emit(R.add(y, bias))
    return bb.emit(R.reshape(y, (*shape[:-1], n)))


def convert_gelu(node, importer) -> relax.Var:
    bb = importer.block_builder
    x = _arg(importer, node, 0)
    dtype = str(node.meta["val"].dtype).replace("torch.", "")

    def c(v):
        return relax.const(v, dtype)

    if node.kwargs.get("approximate", "none") == "tanh":
        inner = R.multiply(c(math.sqrt(2.0 / math.pi)),
                           R.add(x, R.multiply(c(0.044715), R.multiply(x, R.multiply(x, x)))))
        gate = R.tanh(inner)
    else:
        gate = R.erf(R.multiply(x, c(1.0 / math.sqrt(2.0))))
    return bb.emit(R.multiply(R.multiply(x, c(0.5)), R.add(c(1.0), gate)))


def convert_cumsum(node, importer) -> relax.Var:
    """torch sums booleans as int64 (HF builds position ids this way); TVM's cumsum would add in
    the input's bool type, which LLVM cannot codegen, so cast first."""
    bb = importer.block_builder
    x = _arg(importer, node, 0)
    out = str(node.meta["val"].dtype).replace("torch.", "")
    if _meta(node, 0)[1] == torch.bool:
        x = bb.emit(R.astype(x, out))
    return bb.emit(R.cumsum(x, axis=node.args[1], dtype=out))


def convert_nonzero(node, importer) -> relax.Var:
    """`torch.nonzero(x)` ([count, ndim] int64): Relax's nonzero ([ndim, count], run by TVM's
    runtime), its count bound to a new shape variable so later shapes stay known, transposed."""
    bb = importer.block_builder
    x = _arg(importer, node, 0)
    ndim = len(node.args[0].meta["val"].shape)
    count = tirx.Var(f"tokens_{node.name}", "int64")
    found = bb.match_cast(bb.emit(R.nonzero(x)), relax.TensorType([ndim, count], "int64"))
    return bb.emit(R.permute_dims(found, [1, 0]))


def convert_index_put(node, importer) -> relax.Var:
    """`x.index_put([rows], values)` with one index tensor over the leading axis of a tensor of
    more axes (remove_padding's scatter back to the padded layout) as a scatter of whole rows;
    TVM's importer wants one index per axis. Other forms: TVM's own conversion."""
    indices = node.args[1]
    x = _arg(importer, node, 0)
    accumulate = len(node.args) > 3 and node.args[3]
    if len(indices) != 1 or len(_dims(x)) < 2 or accumulate:
        return importer._index_put(node)
    bb = importer.block_builder
    rows, values = importer.env[indices[0]], _arg(importer, node, 2)
    width = _dims(values)[1:]
    index = R.reshape(rows, [_dims(rows)[0]] + [1] * len(width))
    index = bb.emit(R.broadcast_to(index, [_dims(rows)[0], *width]))
    return bb.emit(R.scatter_elements(x, index, values, axis=0))


def convert_amax(node, importer) -> relax.Var:
    x = _arg(importer, node, 0)
    dims = _arg(importer, node, 1)
    axes = None if dims in (None, [], ()) else [int(d) for d in dims]
    keep = bool(_arg(importer, node, 2)) if len(node.args) > 2 else False
    return importer.block_builder.emit(R.max(x, axis=axes, keepdims=keep))


def convert_exp2(node, importer) -> relax.Var:
    dtype = str(node.meta["val"].dtype).replace("torch.", "")
    x = _arg(importer, node, 0)
    return importer.block_builder.emit(R.exp(R.multiply(x, relax.const(math.log(2.0), dtype))))


CONVERT_MAP = {"amax.default": convert_amax,
               "nonzero.default": convert_nonzero,
               "index_put.default": convert_index_put,
               "slice.Tensor": convert_slice,
               "exp2.default": convert_exp2,
               "attention.default": convert_attention,
               "attention_trimmed.default": convert_attention_trimmed,
               "linear_int8.default": convert_linear_int8,
               "cumsum.default": convert_cumsum,
               "gelu.default": convert_gelu}
