"""optim's own operators, the targets passes rewrite into.

Each is a `torch.library` custom op with a real CPU kernel (the torch backend runs it) and a fake
implementation (so graphs holding it can be re-exported); the ONNX Runtime backend lowers each to
ONNX nodes (`backends/onnx_lowering.py`).

- `optim::attention(q, k, v, mask, scale, causal)`: softmax(q·kᵀ·scale + mask)·v in one kernel.
  q: [B, H, Lq, D]; k, v: [B, Hkv, Lk, D] with H % Hkv == 0 (grouped-query attention);
  mask: additive float or boolean (True = attend), broadcastable to [B, H, Lq, Lk].
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.library.custom_op("optim::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float,
              causal: bool) -> Tensor:
    gqa = k.shape[1] != q.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, is_causal=causal,
                                          enable_gqa=gqa)


@attention.register_fake
def _(q, k, v, mask, scale, causal):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


# ---- optim::linear_int8: int8 weights, dynamic per-token int8 activations ----
#
# y = s_x[m] · w_scale[n] · Σ_k q_x[m, k] · w_q[n, k] + bias[n]
#   q_x = round(x / s_x), s_x = max|x[m, :]| / 127 (one scale per token), w_q int8 per-channel.
# The torch kernel runs the integer GEMM in oneDNN (u8 activations with zero point 128, s8
# weights, int32 accumulation); prepacked weights are cached per weight tensor.

_PACKED: dict[int, tuple] = {}  # id(w_q) -> (weakref to w_q, version, packed weight)


def _packed(w_q: Tensor) -> Tensor:
    # keyed on the tensor object itself (weakref-checked): a data_ptr key can be reused by a new
    # weight after the old one is freed, which would silently run with stale packed weights
    entry = _PACKED.get(id(w_q))
    if entry is not None and entry[0]() is w_q and entry[1] == w_q._version:
        return entry[2]
    packed = torch.ops.onednn.qlinear_prepack(w_q, None)
    _PACKED[id(w_q)] = (weakref.ref(w_q, lambda _, k=id(w_q): _PACKED.pop(k, None)),
                        w_q._version, packed)
    return packed


@torch.library.custom_op("optim::linear_int8", mutates_args=())
def linear_int8(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None) -> Tensor:
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k).float()
    s = x2.abs().amax(-1, keepdim=True).clamp(min=1e-8) / 127.0
    q = torch.round(x2 / s).add_(128.0).clamp_(1, 255).to(torch.uint8)
    zp = torch.zeros(w_q.shape[0], dtype=torch.int64)
    acc = torch.ops.onednn.qlinear_pointwise(q, 1.0, 128, _packed(w_q), w_scale, zp, None,
                                             1.0, 0, torch.float32, "none", [], "")
    y = acc.mul_(s)
    if bias is not None:
        y.add_(bias)
    return y.reshape(*lead, w_q.shape[0]).to(x.dtype)


@linear_int8.register_fake
def _(x, w_q, w_scale, bias):
    return x.new_empty((*x.shape[:-1], w_q.shape[0]))
