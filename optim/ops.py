"""optim's own operators, the targets passes rewrite into.

Each is a `torch.library` custom op with a real CPU kernel (the torch backend runs it) and a fake
implementation (so graphs holding it can be re-exported); the ONNX Runtime backend lowers each to
ONNX nodes (`backends/onnx_lowering.py`).

- `optim::attention(q, k, v, mask, scale, causal)`: softmax(q·kᵀ·scale + mask)·v in one kernel.
  q: [B, H, Lq, D]; k, v: [B, Hkv, Lk, D] with H % Hkv == 0 (grouped-query attention);
  mask: additive float or boolean (True = attend), broadcastable to [B, H, Lq, Lk].
"""

from __future__ import annotations

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
