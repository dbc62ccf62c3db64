"""Causal sums in chunks: the two scans every causal linear attention form is built from.

- `causal_product`: out[i] = Σ_{j ≤ i} (a[i]·b[j]) v[j], as masked products within chunks of
  positions and a running [d′, d] state across them (never an [L, d′, d] tensor);
- `prefix_sum`: a running sum along positions, as lower-triangular GEMMs within blocks.

Both are plain torch on [B, H, L, D] tensors, so they train, trace and splice like any op.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

CHUNK = 0  # causal form: positions per chunk; 0 = DEFAULT_CHUNK
# 64 positions per chunk, for every feature size: with 1024-position segments, interleaved at
# 8192 and 16384 tokens on this CPU (2026-12-01), 64 beat 128 by 6–7% for hedgehog (d′ = 128),
# 1–6% for performer at d′ = 128, and −1.5…+3% at d′ = 256; 32 lost everywhere (the sweep of
# the earlier 2048-position segments had favoured 128 for d′ > 64).
DEFAULT_CHUNK = 64


def causal_product(a: Tensor, b: Tensor, v: Tensor, chunk: int, state: Tensor | None = None,
                   with_state: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """out[i] = Σ_{j ≤ i} (a[i]·b[j]) v[j] (+ a[i]·state), in chunks of `chunk` positions.

    `state` [B, H, D′, Dv] is what earlier positions contributed (a segment's carried keys);
    `with_state` also returns the state after the last position (for the next segment)."""
    bsz, h, n, _ = a.shape
    chunk = min(chunk or DEFAULT_CHUNK, n)
    pad = (-n) % chunk
    if pad:
        a, b, v = (F.pad(t, (0, 0, 0, pad)) for t in (a, b, v))
    c = (n + pad) // chunk
    a, b, v = (t.reshape(bsz * h * c, chunk, t.shape[-1]) for t in (a, b, v))
    intra = (a @ b.transpose(-2, -1)).tril_() @ v  # in place: no mask, no second [c, c] tensor
    states = (b.transpose(-2, -1) @ v).view(bsz, h, c, -1)  # one [D′, Dv] state per chunk
    last = states[:, :, -1].clone() if with_state else None
    if state is not None:
        # the carried state enters every chunk: add it to the first chunk's state before the
        # (exclusive) prefix sum, which carries it to all later chunks, then give chunk 0 the
        # state itself. An add over every chunk's entering state (12 MB per 1024 positions
        # for d′ = 256) cost more than the exp of the features.
        states[:, :, 0] += state.reshape(bsz, h, -1)
    before = prefix_sum(states, exclusive=True)  # the state entering each chunk
    if state is not None:
        before[:, :, 0] = state.reshape(bsz, h, -1)
    out = torch.baddbmm(intra, a, before.reshape(bsz * h * c, a.shape[-1], -1))
    out = out.view(bsz, h, c * chunk, -1)[:, :, :n]
    if not with_state:
        return out
    return out, (before[:, :, -1] + last).view(bsz, h, a.shape[-1], -1)


def prefix_sum(x: Tensor, exclusive: bool = False, block: int = 64,
               initial: Tensor | None = None) -> Tensor:
    """Running sum of x [..., L, D] along L (exclusive: of the positions before each), plus
    `initial` [..., 1, D] (what came before x) when given.

    torch.cumsum over a non-innermost axis runs a strided scalar scan (10× slower than a pass
    over the data here); this is a lower-triangular GEMM within blocks of `block` positions
    that starts from the cumsum of the small [..., L/block, D] block totals."""
    n = x.shape[-2]
    if x.shape[-1] == 1 or n == 1:  # one column: cumsum scans contiguous memory already
        out = torch.cumsum(x, -2) - x if exclusive else torch.cumsum(x, -2)
        return out if initial is None else out + initial
    if n <= block:
        tri = torch.ones(n, n, dtype=x.dtype, device=x.device).tril(-1 if exclusive else 0)
        # an explicit bmm: `tri @ x` broadcasts by transposing x into a copy (3.6 against
        # 0.97 ms for x [1, 12, 16, 16640] timed alone here; 1–2 ms of a 180 ms causal
        # performer call at 8192 tokens)
        flat = x.reshape(-1, n, x.shape[-1])
        out = torch.bmm(tri.expand(flat.shape[0], n, n), flat).view(x.shape)
        return out if initial is None else out + initial
    pad = (-n) % block
    xb = F.pad(x, (0, 0, 0, pad)) if pad else x
    xb = xb.unflatten(-2, (-1, block))  # [..., nb, block, D]
    tri = torch.ones(block, block, dtype=x.dtype, device=x.device).tril(-1 if exclusive else 0)
    totals = xb.sum(-2)  # [..., nb, D]
    entering = torch.cumsum(totals, -2) - totals
    if initial is not None:
        entering = entering + initial
    # the block's start value is the GEMM's initial value: one pass over the data, not two
    flat = xb.reshape(-1, block, x.shape[-1])
    out = torch.baddbmm(entering.reshape(-1, 1, x.shape[-1]),
                        tri.expand(flat.shape[0], block, block), flat).reshape(xb.shape)
    out = out.flatten(-3, -2)
    return out[..., :n, :] if pad else out
