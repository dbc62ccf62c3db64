"""ONNX translations of optim's ops, used by `torch.onnx.export(custom_translation_table=...)`.

- optim::attention  ⇒  ONNX `Attention` (opset 23, one fused node): q, k, v stay [B, H, L, D];
  a mask that does not already span [Lq, Lk] is expanded first (ORT's kernel checks the shape).
- optim::linear_int8  ⇒  per-token quantization (Abs, ReduceMax, Div, QuantizeLinear to uint8
  with zero point 128), `MatMulInteger` (u8 × s8 → int32), then Cast · s_w · s_x + bias.
  The two scale multiplies are separate on purpose: ORT's MatMulIntegerToFloat fusion folds a
  [M, 1] per-row scale as if it were per-tensor and returns wrong numbers (seen with ORT 1.31).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import torch
from onnxscript import opset23 as op

OPSET = 23


def attention(q, k, v, mask, scale: float, causal: bool):
    if mask is None:  # Attention has 4 outputs (y, present k/v, qk); [0] keeps y
        return op.Attention(q, k, v, scale=scale, is_causal=int(causal))[0]
    target = op.Concat(op.Shape(mask, start=0, end=2), op.Shape(q, start=2, end=3),
                       op.Shape(k, start=2, end=3), axis=0)
    mask = op.Expand(mask, target)
    return op.Attention(q, k, v, mask, scale=scale, is_causal=int(causal))[0]


def linear_int8(x, w_q, w_scale, bias):
    amax = op.ReduceMax(op.Abs(x), op.Constant(value_ints=[-1]), keepdims=1)
    s_x = op.Max(op.Div(amax, op.Constant(value_float=127.0)), op.Constant(value_float=1e-8))
    q = op.QuantizeLinear(op.Div(x, s_x), op.Constant(value_float=1.0),
                          op.Constant(value=ir.tensor(np.array(128, dtype=np.uint8))))
    acc = op.MatMulInteger(q, op.Transpose(w_q, perm=[1, 0]),
                           op.Constant(value=ir.tensor(np.array(128, dtype=np.uint8))))
    y = op.Mul(op.Mul(op.Cast(acc, to=ir.DataType.FLOAT), w_scale), s_x)
    return y if bias is None else op.Add(y, bias)


def translation_table() -> dict:
    return {torch.ops.optim.attention.default: attention,
            torch.ops.optim.linear_int8.default: linear_int8}
