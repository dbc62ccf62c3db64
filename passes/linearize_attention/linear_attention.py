"""Linear-complexity attention: feature maps, the kernelized forms, and `attend` (any method).

    softmax(q·kᵀ·s)·v  ≈  φ(q)·(φ(k)ᵀ·v) / φ(q)·(φ(k)ᵀ·1)

costs O(L·d′·d) instead of O(L²·d). Everything here is plain torch on [B, H, L, D] tensors, so
the same functions train the learned maps, check the graph rewrite, and (traced by
`optim.ir.trace_function` and `splice`) become the rewritten graph's aten ops.

Feature maps (`feature_map(method, x, params, role)`):
- `elu`: elu(x) + 1 (Katharopoulos et al. 2020).
- `performer`: FAVOR+ positive random features exp(w·x − ‖x‖²/2) (up to factors that cancel),
  orthogonal Gaussian w (Choromanski et al. 2021), on x·s^½ so that φ(q)·φ(k) estimates
  exp(q·k·s).
- `hedgehog`: [softmax(x·W + b), softmax(−(x·W + b))] per head, W and b fitted to the layer's
  softmax attention output on calibration data (`passes.linearize_attention.feature_map_fit`,
  LoLCATs stage 1).
- `ecoformer`: binary hash codes h(x) = [ (κ(x, anchors) − μ)·A ≥ 0 ] ∈ {0, 1}^b per head
  (EcoFormer's kernelized hashing, 2022: RBF features to anchors drawn from the calibration
  keys, a projection A), shared by queries and keys, so φ(q)·φ(k) counts shared bits and the
  attention is accumulations of v. A is fitted by attention transfer with a straight-through
  sign (`passes.linearize_attention.feature_map_fit`), where EcoFormer fits it by supervised
  hashing on attention pairs.
`flow` is Flowformer's flow attention (`passes.linearize_attention.flow_attention`).

Forms: bidirectional; causal, computed in chunks (`passes.linearize_attention.causal_scan`:
within a chunk a masked L_c×L_c product, across chunks a running [d′, d] state: no [L, d′, d]
tensor is ever built); and the recurrent step a decoder runs instead of appending to a KV cache
(`recurrent_step`).
Padding is handled by zeroing the features (and flow weights) of masked keys.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

import passes.linearize_attention.flow_attention as flowformer
from optim.host_memory import MMAP_THRESHOLD_MAX
from passes.linearize_attention.causal_scan import CHUNK, causal_product

METHODS = ("elu", "performer", "flow", "hedgehog", "ecoformer")
ECO_ANCHORS = 20  # EcoFormer's defaults: 20 RBF anchors, 16-bit codes
LOG2E = math.log2(math.e)  # performer's logits are in bits: exp(z) = 2^(z·log₂e)
TINY = 1e-30  # normalizer floor: performer features are tiny by design (a shared shift)
SEGMENT = 1024  # longer sequences run a segment at a time (`_segmented`; see its docstring)


# ---- feature maps ----

def performer_projection(head_dim: int, features: int, seed: int) -> Tensor:
    """[features, head_dim] orthogonal Gaussian rows (blocks of a QR), norms chi-distributed."""
    g = torch.Generator().manual_seed(seed)
    blocks = []
    for _ in range(math.ceil(features / head_dim)):
        q, _ = torch.linalg.qr(torch.randn(head_dim, head_dim, generator=g))
        blocks.append(q.T)
    w = torch.cat(blocks)[:features]
    norms = torch.randn(features, head_dim, generator=g).norm(dim=1, keepdim=True)
    return w * norms


def feature_map(method: str, x: Tensor, params: dict[str, Tensor], role: str,
                scale: float) -> Tensor:
    """φ(x) for queries (`role="q"`) or keys (`"k"`); x: [B, H, L, D] -> [B, H, L, D′]."""
    if method == "elu":
        return F.elu(x).add_(1.0)  # in place: a fresh [L, D] tensor costs more than the add
    if method == "flow":
        return torch.sigmoid(x)
    if method == "performer":
        return performer_features(x, params, role, scale)[0]
    if method == "hedgehog":
        # [softmax(z), softmax(−z)] for z = x·W + b, as one softmax over [z, −z] viewed as two
        # rows: one GEMM with [W, −W], no negation or concatenation of the big features
        w, b = signed_hedgehog(params, role)  # [H, D, 2·D′], [H, 1, 2·D′]
        z = (x @ w).add_(b)
        return torch.softmax(z.unflatten(-1, (2, -1)), -1).flatten(-2)
    if method == "ecoformer":
        return hash_codes(x, params)
    raise ValueError(f"unknown linear attention method {method!r}; valid: {METHODS}")


def signed_hedgehog(params: dict[str, Tensor], role: str) -> tuple[Tensor, Tensor]:
    """Hedgehog's [W, −W] and [b, −b] for `role`: from the `signed_*` entries that `attend`
    adds once per call for a segmented sequence (3% faster at 8192 tokens than rebuilding
    them for every segment), else built here."""
    if f"signed_w_{role}" in params:
        return params[f"signed_w_{role}"], params[f"signed_b_{role}"]
    w, b = params[f"w_{role}"], params[f"b_{role}"]
    return torch.cat([w, -w], -1), torch.cat([b, -b], -1)[:, None]


def performer_features(x: Tensor, params: dict[str, Tensor], role: str, scale: float,
                       carried: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """FAVOR+ features φ(x)_r ∝ exp(w_r·x·s^½ − ‖x‖²·s/2) of x [B, H, L, D], and the shift
    that was subtracted from their logits before exp.

    Factors shared by all of a query's features, or by all keys of a head, cancel in the
    normalization, so FAVOR+'s 1/√m goes, and so does the queries' ‖q‖² term; each query is
    shifted by its largest logit. Keys share one shift per head: their largest logit, or
    `carried` (the shift of earlier segments) if larger. The shift is a constant (no gradient:
    it cancels). The [L, m] logits are written once by the GEMM and then shifted and
    exponentiated in place: fresh tensors of that size cost more than the arithmetic here.
    The logits are in bits (log₂e is folded into w) and exponentiated by exp2: on this CPU
    torch's exp2 took a third of exp's time over a [12, 1024, 256] tensor (0.5 against
    1.35 ms). The shift is in bits too."""
    w = params["w"] * (math.sqrt(scale) * LOG2E)  # [m, D]
    z = x @ w.transpose(0, 1)  # [B, H, L, m], logits in bits: φ = 2^z
    row_max = z.detach().amax(-1, keepdim=True)
    if role == "q":
        return z.sub_(row_max).exp2_(), row_max
    sq = (x * x).sum(-1, keepdim=True) * (-scale / 2 * LOG2E)  # [B, H, L, 1]
    shift = (row_max + sq.detach()).amax(-2, keepdim=True)  # [B, H, 1, 1]
    if carried is not None:
        shift = torch.maximum(shift, carried)
    return z.add_(sq - shift).exp2_(), shift


def hash_codes(x: Tensor, params: dict[str, Tensor]) -> Tensor:
    """EcoFormer codes {0, 1}^b of x [B, H, L, D]; differentiable (straight-through sigmoid)
    when the projection requires grad, exactly binary otherwise."""
    anchors, proj, mu, gamma = (params[k] for k in ("anchors", "proj", "mu", "gamma"))
    d2 = (x * x).sum(-1, keepdim=True) - 2 * x @ anchors.transpose(-1, -2) \
        + (anchors * anchors).sum(-1)[:, None, :]  # [B, H, L, m]
    kappa = torch.exp(-d2.clamp_min(0) * gamma[:, None, None])
    z = (kappa - mu[:, None, :]) @ proj  # [B, H, L, b]
    hard = (z >= 0).to(x.dtype)
    if not (torch.is_grad_enabled() and z.requires_grad):
        return hard
    soft = torch.sigmoid(4 * z / (z.detach().abs().mean() + 1e-12))
    return soft + (hard - soft).detach()


# ---- kernelized attention ----

def linear_attention(fq: Tensor, fk: Tensor, v: Tensor, causal: bool, chunk: int = CHUNK) -> Tensor:
    """φ(q)·(φ(k)ᵀ·v) / φ(q)·(φ(k)ᵀ·1). Causal: numerator and normalizer in one chunked
    product (v gets a column of ones); bidirectional: a [d′, d] and a [d′] summary of the keys."""
    if causal:
        va = with_ones(v)
        out = causal_product(fq, fk, va, chunk)
        return normalized(out)
    num = fq @ (fk.transpose(-2, -1) @ v)
    den = fq @ fk.sum(-2).unsqueeze(-1)
    return num / den.clamp_min(TINY)


def with_ones(v: Tensor) -> Tensor:
    """v with a column of ones: one product then carries numerator and normalizer."""
    return torch.cat([v, torch.ones_like(v[..., :1])], -1)


def normalized(out: Tensor) -> Tensor:
    """Numerator columns over the normalizer column (from a `with_ones` product)."""
    return out[..., :-1] / out[..., -1:].clamp_min(TINY)


def recurrent_step(state: Tensor | None, fq: Tensor, fk: Tensor, v: Tensor
                   ) -> tuple[Tensor, Tensor]:
    """One decoding step: fq, fk [B, H, 1, D′], v [B, H, 1, Dv] -> (out, new state).

    The state is [B, H, D′, Dv + 1] whatever the length so far; a KV cache grows by
    2·H·D values per token."""
    va = with_ones(v)
    update = fk.transpose(-2, -1) @ va
    state = update if state is None else state + update
    out = fq @ state
    return normalized(out), state


# ---- one attention, any method ----

def attend(method: str, q: Tensor, k: Tensor, v: Tensor, valid: Tensor | None, causal: bool,
           scale: float, params: dict[str, Tensor], chunk: int = CHUNK) -> Tensor:
    """Linear attention replacing softmax(q·kᵀ·scale)·v; q [B, H, Lq, D], k/v [B, Hkv, Lk, D]
    (grouped-query heads are repeated); `valid` [B, 1, Lk, 1] marks real (unpadded) keys."""
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    if method == "flow" and causal and q.shape[-2] > flowformer.FLOW_SEGMENT:
        return flowformer.flow_segmented(q, k, v, valid, chunk)
    if method == "flow" and not causal and \
            max(q.numel(), k.numel()) * q.element_size() > MMAP_THRESHOLD_MAX:
        # whole features would be fresh pages on every call; below that, keeping them beats
        # recomputing them (A/B at 2048 / 4096 / 8192 / 16384 tokens: 0.76 / 0.88 / 1.07 /
        # 1.17× for the segmented form)
        return flowformer.flow_bidirectional_segmented(q, k, v, valid)
    if method != "flow" and max(q.shape[-2], k.shape[-2]) > SEGMENT:
        if method == "hedgehog":  # every segment's feature maps share them
            params = params | {f"signed_{n}_{role}": t for role in ("q", "k")
                               for n, t in zip("wb", signed_hedgehog(params, role))}
        return _segmented(method, q, k, v, valid, causal, scale, params, chunk)
    fq = feature_map(method, q, params, "q", scale)
    fk = feature_map(method, k, params, "k", scale)
    if method == "flow":
        return flowformer.flow_attention(fq, fk, v, valid, causal, chunk)
    if valid is not None:
        fk = fk * valid
    return linear_attention(fq, fk, v, causal, chunk)


def _segmented(method: str, q: Tensor, k: Tensor, v: Tensor, valid: Tensor | None,
               causal: bool, scale: float, params: dict[str, Tensor], chunk: int) -> Tensor:
    """`attend` over SEGMENT positions at a time, carrying the keys' [d′, d+1] summary from
    segment to segment, so that no op makes an [L, d′] tensor larger than one segment's: at
    16384 tokens such a tensor is 50–200 MB, over glibc's 32 MB mmap threshold, and is faulted
    in page by page on every call (`optim.host_memory`).

    1024 positions: against 512 and 2048, interleaved at 8192 and 16384 tokens on this CPU
    (2026-12-01), it was 9–22% faster than 2048 for performer, 2–9% for causal hedgehog, and
    within 2% elsewhere.

    Performer's key features share one shift over the whole sequence: each segment's keys take
    the largest logit so far, and the carried summary is rescaled when it grows (as online
    softmax does)."""
    segments = [(i, min(i + SEGMENT, k.shape[-2])) for i in range(0, k.shape[-2], SEGMENT)]
    # each segment's output goes straight into its rows: a final cat would read every segment
    # back from memory, long after it left the cache
    out = v.new_empty(*q.shape[:-1], v.shape[-1])
    state, shift = None, None
    for i, j in segments:
        if method == "performer":  # keys share one shift: keep the largest so far, rescale
            fk, top = performer_features(k[..., i:j, :], params, "k", scale, shift)
            if shift is not None:
                state = state * torch.exp2(shift - top)
            shift = top
        else:
            fk = feature_map(method, k[..., i:j, :], params, "k", scale)
        if valid is not None:
            fk = fk * valid[..., i:j, :]
        va = with_ones(v[..., i:j, :])
        if causal:  # self-attention: query segment = key segment
            fq = feature_map(method, q[..., i:j, :], params, "q", scale)
            num, state = causal_product(fq, fk, va, chunk, state, with_state=True)
            out[..., i:j, :] = normalized(num)
        else:
            update = fk.transpose(-2, -1) @ va  # [B, H, d′, d+1]
            state = update if state is None else state + update
    if not causal:
        for i in range(0, q.shape[-2], SEGMENT):
            fq = feature_map(method, q[..., i:i + SEGMENT, :], params, "q", scale)
            out[..., i:i + SEGMENT, :] = normalized(fq @ state)
    return out


def softmax_reference(q: Tensor, k: Tensor, v: Tensor, valid: Tensor | None, causal: bool,
                      scale: float) -> Tensor:
    """The softmax attention the linear forms stand in for (padding as `valid`)."""
    mask = None
    if valid is not None:
        mask = valid.transpose(-2, -1).bool()  # [B, 1, 1, Lk]
        if causal:
            mask = mask & torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
            causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                          enable_gqa=k.shape[1] != q.shape[1])
