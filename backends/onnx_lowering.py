"""ONNX translations of optim's ops, used by `torch.onnx.export(custom_translation_table=...)`.

- optim::attention  ⇒  ONNX `Attention` (opset 23, one fused node): q, k, v stay [B, H, L, D];
  a mask that does not already span [Lq, Lk] is expanded first (ORT's kernel checks the shape).
- optim::attention_trimmed  ⇒  Slice q, k, v and the mask to the first max(positions) + 1
  positions, `Attention` there, Pad with zeros back to the full length.
- optim::attention_decode  ⇒  MatMul against the cache (Transpose folded by ORT), the step's
  cache bias added, the same for the new tokens with theirs, one Softmax, two MatMuls, and a
  ReduceSum for the attention mass: the cache is never concatenated or copied.
- optim::linear_int4  ⇒  `com.microsoft.MatMulNBits` (bits 4, the packed weight as it is).
- optim::linear_int8  ⇒  per-token quantization (Abs, ReduceMax, QuantizeLinear along the token
  axis to uint8, zero point 128), `com.microsoft.MatMulIntegerToFloat` (u8 × s8 GEMM, int32
  accumulation, × per-channel weight scale; a-scale 1), then × the per-token scale, + bias.
  The per-token scale is applied after the op on purpose: handing MatMulIntegerToFloat an [M, 1]
  a-scale (which ORT's own MatMulInteger→Cast→Mul fusion does) returns wrong numbers (ORT 1.31),
  and MatMulIntegerToFloat with prepacked weights is faster than MatMulInteger + Cast.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import torch
from onnxscript import opset23 as op
from onnxscript.values import Op, Opset


def _contrib_schema(name: str, inputs: list[tuple[str, str, bool]], outputs: list[tuple[str, str]],
                    types: dict[str, list[str]], int_attributes: tuple[str, ...] = ()) -> Op:
    """Declare one of ORT's com.microsoft ops to onnx.defs (it ships no schema for them)."""
    from onnx.defs import OpSchema

    opt = OpSchema.FormalParameterOption
    if not onnx.defs.has(name, "com.microsoft"):
        onnx.defs.register_schema(OpSchema(
            name, "com.microsoft", 1,
            inputs=[OpSchema.FormalParameter(n, t, param_option=opt.Optional if o else opt.Single)
                    for n, t, o in inputs],
            outputs=[OpSchema.FormalParameter(n, t) for n, t in outputs],
            type_constraints=[(k, v, "") for k, v in types.items()],
            attributes=[OpSchema.Attribute(a, OpSchema.AttrType.INT, "") for a in int_attributes]))
    return Op(Opset("com.microsoft", 1), name, onnx.defs.get_schema(name, 1, "com.microsoft"))


_MatMulIntegerToFloat = _contrib_schema(
    "MatMulIntegerToFloat",
    [("A", "T1", False), ("B", "T2", False), ("a_scale", "T3", False), ("b_scale", "T3", False),
     ("a_zero_point", "T1", True), ("b_zero_point", "T2", True), ("bias", "T3", True)],
    [("Y", "T3")],
    {"T1": ["tensor(int8)", "tensor(uint8)"], "T2": ["tensor(int8)", "tensor(uint8)"],
     "T3": ["tensor(float)"]})

_MatMulNBits = _contrib_schema(
    "MatMulNBits",
    [("A", "T1", False), ("B", "T2", False), ("scales", "T1", False),
     ("zero_points", "T3", True), ("g_idx", "T4", True), ("bias", "T1", True)],
    [("Y", "T1")],
    {"T1": ["tensor(float)"], "T2": ["tensor(uint8)"], "T3": ["tensor(uint8)", "tensor(float)"],
     "T4": ["tensor(int32)"]}, int_attributes=("K", "N", "bits", "block_size", "accuracy_level"))

OPSET = 23


def attention(q, k, v, mask, scale: float, causal: bool):
    if mask is None:  # Attention has 4 outputs (y, present k/v, qk); [0] keeps y
        return op.Attention(q, k, v, scale=scale, is_causal=int(causal))[0]
    target = op.Concat(op.Shape(mask, start=0, end=2), op.Shape(q, start=2, end=3),
                       op.Shape(k, start=2, end=3), axis=0)
    mask = op.Expand(mask, target)
    return op.Attention(q, k, v, mask, scale=scale, is_causal=int(causal))[0]


def attention_trimmed(q, k, v, mask, scale: float, positions):
    """Attention over the first n = max(positions) + 1 positions, zeros after (padding)."""
    zero, two = op.Constant(value_ints=[0]), op.Constant(value_ints=[2])
    n = op.Add(op.ReduceMax(positions, keepdims=1), op.Constant(value_ints=[1]))
    qn, kn, vn = (op.Slice(t, zero, n, two) for t in (q, k, v))
    if mask is None:
        y = op.Attention(qn, kn, vn, scale=scale)[0]
    else:
        target = op.Concat(op.Shape(mask, start=0, end=2), op.Shape(q, start=2, end=3),
                           op.Shape(k, start=2, end=3), axis=0)
        mask = op.Slice(op.Expand(mask, target), op.Concat(zero, zero, axis=0),
                        op.Concat(n, n, axis=0), op.Constant(value_ints=[2, 3]))
        y = op.Attention(qn, kn, vn, mask, scale=scale)[0]
    rest = op.Sub(op.Shape(q, start=2, end=3), n)
    pads = op.Concat(op.Constant(value_ints=[0, 0, 0, 0, 0, 0]), rest, zero, axis=0)
    return op.Pad(y, pads)


def linear_int8(x, w_q, w_scale, bias, in_scale=None, act_scale=None):
    k = op.Shape(x, start=-1)
    x2 = op.Reshape(x, op.Concat(op.Constant(value_ints=[-1]), k, axis=0))  # [M, K]
    if in_scale is not None:
        x2 = op.Mul(x2, in_scale)
    if act_scale is None:  # dynamic: one scale per token
        amax = op.ReduceMax(op.Abs(x2), op.Constant(value_ints=[1]), keepdims=0)  # [M]
        s_x = op.Max(op.Div(amax, op.Constant(value_float=127.0)), op.Constant(value_float=1e-8))
    else:  # static: the calibrated scale for every token
        s_x = op.Expand(act_scale, op.Shape(x2, start=0, end=1))
    zp = op.ConstantOfShape(op.Shape(s_x), value=ir.tensor(np.array([128], dtype=np.uint8)))
    q = op.QuantizeLinear(x2, s_x, zp, axis=0)  # one scale per token (row)
    one = op.Constant(value_float=1.0)
    zp0 = op.Constant(value=ir.tensor(np.array(128, dtype=np.uint8)))
    acc = _MatMulIntegerToFloat(q, op.Transpose(w_q, perm=[1, 0]), one, w_scale, zp0)
    y = op.Mul(acc, op.Unsqueeze(s_x, op.Constant(value_ints=[1])))
    if bias is not None:
        y = op.Add(y, bias)
    out_shape = op.Concat(op.Shape(x, start=0, end=-1), op.Shape(w_q, start=0, end=1), axis=0)
    return op.Reshape(y, out_shape)


def linear_int4(x, w_packed, scales, bias, block: int, accuracy_level: int = 0):
    """ONNX Runtime's 4-bit MatMulNBits (zero point 8 by default, as the packing assumes).
    `accuracy_level` 4 lets ORT quantize activations to int8 per block and run an integer
    kernel (what onnxruntime-genai uses on CPUs); 0 dequantizes to fp32."""
    n, k = w_packed.shape[0], w_packed.shape[1] * block
    flat = op.Reshape(scales, op.Constant(value_ints=[-1]))
    attrs = {"K": k, "N": n, "bits": 4, "block_size": block, "accuracy_level": accuracy_level}
    if bias is None:
        return _MatMulNBits(x, w_packed, flat, **attrs)
    return _MatMulNBits(x, w_packed, flat, None, None, bias, **attrs)


def attention_decode(q, k, v, k_cache, v_cache, cache_bias, new_bias, scale: float):
    """New tokens over the cache and each other: two MatMuls against the cache (its Transpose
    folds into ORT's FusedMatMul, so the cache is not copied), the step's biases added, one
    Softmax over both blocks, and the attention mass per key."""
    b, h, t = (op.Shape(q, start=i, end=i + 1) for i in range(3))
    n = op.Shape(k_cache, start=2, end=3)
    qg = op.Reshape(q, op.Concat(b, op.Shape(k, start=1, end=2), op.Constant(value_ints=[-1]),
                                 op.Shape(q, start=3, end=4), axis=0))
    qg = op.Mul(qg, op.Constant(value_float=scale))  # scale the queries, not the scores
    past = op.Add(op.MatMul(qg, op.Transpose(k_cache, perm=[0, 1, 3, 2])),
                  op.Unsqueeze(cache_bias, op.Constant(value_ints=[1, 2])))
    new = op.Add(op.MatMul(qg, op.Transpose(k, perm=[0, 1, 3, 2])), new_bias)
    p = op.Softmax(op.Concat(past, new, axis=-1), axis=-1)
    three, big = op.Constant(value_ints=[3]), op.Constant(value_ints=[2 ** 62])
    out = op.Add(op.MatMul(op.Slice(p, op.Constant(value_ints=[0]), n, three), v_cache),
                 op.MatMul(op.Slice(p, n, big, three), v))
    # the mass as a row of ones times p (one pass over p, where ReduceSum over the row axes
    # strides through it: 3x the time at 1,024-token prompts), then summed over kv heads
    ones = op.ConstantOfShape(op.Concat(op.Constant(value_ints=[1]),
                                        op.Shape(qg, start=2, end=3), axis=0),
                              value=ir.tensor(np.ones(1, np.float32)))
    mass = op.ReduceSum(op.MatMul(ones, p), op.Constant(value_ints=[1, 2]), keepdims=0)
    return op.Reshape(out, op.Concat(b, h, t, op.Shape(v, start=3, end=4), axis=0)), mass


def translation_table(int4_accuracy_level: int = 0) -> dict:
    def int4(x, w_packed, scales, bias, block: int):
        return linear_int4(x, w_packed, scales, bias, block, int4_accuracy_level)

    return {torch.ops.optim.attention.default: attention,
            torch.ops.optim.attention_trimmed.default: attention_trimmed,
            torch.ops.optim.attention_decode.default: attention_decode,
            torch.ops.optim.linear_int8.default: linear_int8,
            torch.ops.optim.linear_int4.default: int4}
