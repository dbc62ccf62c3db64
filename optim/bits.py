"""Sign bits packed 64 to an int64 word, and per-group scales: the storage format of
`optim::linear_binary` weights and activations (see `passes/binarize/binary.py` for the
arithmetic), shared by the op, its TVM kernel and the `binarize` pass."""

from __future__ import annotations

import numpy as np
import torch

WORD = 64


def signs(x: torch.Tensor) -> torch.Tensor:
    """±1 with sign(0) = +1 (what the packed bit `x >= 0` stands for)."""
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def pack_bits(x: torch.Tensor) -> torch.Tensor:
    """Rows of `x` [R, K] as sign bits (1 = x >= 0), 64 per int64 word, little-endian within
    each word, padding bits 0: int64 [R, ceil(K / 64)]."""
    rows, k = x.shape
    words = -(-k // WORD)
    bits = torch.zeros((rows, words * WORD), dtype=torch.bool)
    bits[:, :k] = x >= 0
    packed = np.packbits(bits.numpy(), axis=1, bitorder="little")
    return torch.from_numpy(np.ascontiguousarray(packed).view(np.int64))


def unpack_bits(bits: torch.Tensor, k: int) -> torch.Tensor:
    """±1 fp32 [R, K] from `pack_bits` words."""
    raw = np.unpackbits(bits.contiguous().numpy().view(np.uint8), axis=1, bitorder="little")
    return torch.from_numpy(raw[:, :k].astype(np.float32)) * 2 - 1


def group_mean_abs(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Mean |x| over each of `groups` equal slices of the last axis (the last may be shorter
    when K is not a multiple of 64 and there is one group): [..., groups]."""
    k = x.shape[-1]
    if groups == 1:
        return x.abs().mean(-1, keepdim=True)
    return x.abs().reshape(*x.shape[:-1], groups, k // groups).mean(-1)


def expand_groups(scale: torch.Tensor, k: int) -> torch.Tensor:
    """[..., groups] scales repeated over their inputs: [..., K]."""
    return scale.repeat_interleave(k // scale.shape[-1], dim=-1)
