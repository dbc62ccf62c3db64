"""optim's own operators, the targets passes rewrite into.

Each is a `torch.library` custom op with a real CPU kernel (the torch backend runs it) and a fake
implementation (so graphs holding it can be re-exported); the ONNX Runtime backend lowers each to
ONNX nodes (`backends/onnx_lowering.py`).

- `optim::attention(q, k, v, mask, scale, causal)`: softmax(q·kᵀ·scale + mask)·v in one kernel.
  q: [B, H, Lq, D]; k, v: [B, Hkv, Lk, D] with H % Hkv == 0 (grouped-query attention);
  mask: additive float or boolean (True = attend), broadcastable to [B, H, Lq, Lk].
- `optim::attention_trimmed(q, k, v, mask, scale, positions)`: the same (non-causal) attention
  over the first n = max(positions) + 1 positions only; later positions, padding in every
  sequence of the batch, output zeros. `positions`: each real token's position in its sequence.
- `optim::attention_decode(q, k, v, k_cache, v_cache, cache_bias, new_bias, scale)`: new tokens
  (q, k, v: [B, H or Hkv, T, D]) attending to a KV cache (k_cache, v_cache: [B, Hkv, S, D];
  `cache_bias` [B, S]: 0 where a slot holds a token, -inf elsewhere) and to the new tokens
  (`new_bias` [B, 1, group * T, T]: causal, padding masked), in two blocks with one softmax: the
  cache is read where it lies, never concatenated (`optim.decoder_steps`). The biases are made
  once per step (`cache_bias`, `new_bias`) and shared by every layer. A prompt is T tokens over
  an empty cache; a decode step, T = 1.
- `optim::merge_tokens(x, metric, size, r, protect)`: ToMe bipartite soft matching; returns the
  merged tokens, their sizes and where every input token went (for `optim::unmerge_tokens`).
- `optim::linear_int4(x, w_packed, scales, bias, block)`: weight-only 4-bit linear, ONNX
  Runtime's MatMulNBits layout (codes 0..15 with zero point 8, two per byte, low nibble first,
  one fp32 scale per `block` inputs of each output row). ONNX Runtime runs it as MatMulNBits;
  the torch kernel unpacks to fp32 and runs a dense GEMM (memory saved on disk, not time).
- `optim::linear_binary(x, w_bits, w_scale, bias, threshold, in_features)`: sign weights packed
  64 per int64 word, K-major ([words, N]), with a scale per output channel (or group of inputs).
  With a `threshold`, activations are binarized too (x − τ → sign and a per-row scale) and the
  layer runs on the packed XNOR/popcount kernel (`optim.kernels.binary_linear`); without, the
  weights are unpacked to fp32 for a dense GEMM.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

from optim.bits import expand_groups, unpack_bits
from optim.ir import VALUE_META
from optim.kernels import binary_linear, pack_rows, quantize_rows, quantize_static


@torch.library.custom_op("optim::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float,
              causal: bool) -> Tensor:
    gqa = k.shape[1] != q.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, is_causal=causal,
                                          enable_gqa=gqa)


@attention.register_fake
def _(q, k, v, mask, scale, causal):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _attention_setup(ctx, inputs, output):
    q, k, v, mask, scale, causal = inputs
    ctx.save_for_backward(q, k, v, mask)
    ctx.scale, ctx.causal = scale, causal


def _attention_backward(ctx, grad):
    """Gradients by recomputing SDPA under autograd (passes that train through attention:
    distill_widths); the mask is a constant and gets none."""
    q, k, v, mask = ctx.saved_tensors
    with torch.enable_grad():
        q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=ctx.scale,
                                             is_causal=ctx.causal,
                                             enable_gqa=k.shape[1] != q.shape[1])
        gq, gk, gv = torch.autograd.grad(out, (q, k, v), grad)
    return gq, gk, gv, None, None, None


attention.register_autograd(_attention_backward, setup_context=_attention_setup)


@torch.library.custom_op("optim::attention_trimmed", mutates_args=())
def attention_trimmed(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float,
                      positions: Tensor) -> Tensor:
    n = int(positions.max()) + 1 if positions.numel() else 0
    if n >= q.shape[-2]:
        return attention(q, k, v, mask, scale, False)
    out = q.new_zeros((*q.shape[:-1], v.shape[-1]))
    if mask is not None:
        mask = mask[..., :n, :] if mask.shape[-2] > 1 else mask
        mask = mask[..., :n] if mask.shape[-1] > 1 else mask
    out[..., :n, :] = attention(q[..., :n, :], k[..., :n, :], v[..., :n, :], mask, scale, False)
    return out


@attention_trimmed.register_fake
def _(q, k, v, mask, scale, positions):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


VALUE_META[torch.ops.optim.attention_trimmed.default] = lambda q, k, v, mask, scale, positions: {
    "attended": int(positions.max()) + 1 if positions.numel() else 0}


@torch.library.custom_op("optim::attention_decode", mutates_args=())
def attention_decode(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
                     cache_bias: Tensor, new_bias: Tensor, scale: float
                     ) -> tuple[Tensor, Tensor]:
    """New tokens attending to a KV cache and to each other, without concatenating them; also
    the attention each key received, summed over heads and queries ([B, S + T]: cache slots,
    then new tokens), which KV-cache eviction scores tokens by."""
    b, h, t, d = q.shape
    hkv, s = k.shape[1], k_cache.shape[2]
    n = _used_slots(cache_bias)  # slots after the last one any sequence holds are skipped
    qg = q.reshape(b, hkv, (h // hkv) * t, d)  # a group's query heads share one kv head
    splits = split_k(b * hkv, n) if t == 1 else 1
    if splits > 1:
        return _attention_split(qg, k, v, k_cache, v_cache, cache_bias, scale, n, splits,
                                (b, h, t))
    if t > CHUNK_ROWS:
        return _attention_chunked(q, k, v, k_cache, v_cache, cache_bias, new_bias, scale, n)
    past = torch.matmul(qg, k_cache[:, :, :n].transpose(-1, -2)).mul_(scale)
    past += cache_bias[:, None, None, :n]
    new = torch.matmul(qg, k.transpose(-1, -2)).mul_(scale)
    if t > 1:
        new += new_bias
    p = torch.softmax(torch.cat([past, new], -1), -1)
    out = torch.matmul(p[..., :n], v_cache[:, :, :n]) + torch.matmul(p[..., n:], v)
    mass = p.new_zeros(b, s + t)
    summed = p.sum((1, 2))
    mass[:, :n], mass[:, s:] = summed[:, :n], summed[:, n:]
    return out.reshape(b, h, t, v.shape[-1]), mass


CHUNK_ROWS = 128  # longer blocks of new tokens (prompts) are attended in chunks of queries


def _attention_chunked(q, k, v, k_cache, v_cache, cache_bias, new_bias, scale, n):
    """A long block of new tokens (a prompt) in chunks of CHUNK_ROWS queries: each chunk's
    scores stay in cache instead of one [H, T, n + T] tensor in memory, and chunk i reads only
    the new keys up to its own last query (causal: about half the work of the one-shot path).
    Same arithmetic per row as the one-shot path (one softmax over cache + new keys)."""
    b, h, t, d = q.shape
    hkv, s, dv = k.shape[1], k_cache.shape[2], v.shape[-1]
    g = h // hkv
    qg = q.reshape(b, hkv, g, t, d)
    kt, vn = k.transpose(-1, -2).unsqueeze(2), v.unsqueeze(2)  # shared by a group's heads
    kc = k_cache[:, :, :n].transpose(-1, -2).unsqueeze(2)
    vc = v_cache[:, :, :n].unsqueeze(2)
    bias = new_bias.reshape(b, 1, g, t, t)
    out = q.new_empty(b, hkv, g, t, dv)
    mass = q.new_zeros(b, s + t)
    for c0 in range(0, t, CHUNK_ROWS):
        c1 = min(t, c0 + CHUNK_ROWS)
        new = torch.matmul(qg[:, :, :, c0:c1], kt[..., :c1]).mul_(scale)
        new += bias[:, :, :, c0:c1, :c1]
        if n:
            past = torch.matmul(qg[:, :, :, c0:c1], kc).mul_(scale)
            past += cache_bias[:, None, None, None, :n]
            p = torch.softmax(torch.cat([past, new], -1), -1)
            o = torch.matmul(p[..., :n], vc)
            o += torch.matmul(p[..., n:], vn[:, :, :, :c1])
            mass[:, :n] += p[..., :n].sum((1, 2, 3))
            p = p[..., n:]
        else:
            p = torch.softmax(new, -1)
            o = torch.matmul(p, vn[:, :, :, :c1])
        out[:, :, :, c0:c1] = o
        mass[:, s:s + c1] += p.sum((1, 2, 3))
    return out.reshape(b, h, t, dv), mass


def cache_bias(cache_mask: Tensor) -> Tensor:
    """[B, S] bool (True: the slot holds a token) -> the additive bias attention_decode takes."""
    return torch.zeros(cache_mask.shape, dtype=torch.float32).masked_fill(~cache_mask,
                                                                           float("-inf"))


def new_bias(new_mask: Tensor, group: int) -> Tensor:
    """[B, T] (1: a real new token) -> [B, 1, group * T, T] additive bias: causal among the new
    tokens, padding keys masked, and every token sees itself (a padding row stays finite)."""
    allowed = _new_block_mask(new_mask, group)
    return torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(~allowed, float("-inf"))


SPLIT_K_MIN_SLOTS = 1024  # shorter caches are read fast enough by one batched matmul


def split_k(rows: int, slots: int) -> int:
    """How many pieces to split a cache of `slots` into, for `rows` (batch x kv heads) attention
    rows: enough that every thread has a piece when there are fewer rows than threads
    (LeanAttention's observation: one sequence's decode attention leaves cores idle)."""
    threads = torch.get_num_threads()
    if rows >= threads or slots < SPLIT_K_MIN_SLOTS or not SPLIT_K_ENABLED[0]:
        return 1
    return max(1, threads // rows) * 2


# off by default: measured on a 2-core Xeon (benchmarks/RESULTS.md section 24), one MQA sequence
# over 1k-16k slots ran 0.77-0.84x as fast split, because the one batched matmul already runs
# on every core (oneDNN/MKL split the GEMM themselves); a CPU with more cores than batch x kv
# heads rows per GEMM, or a GPU lowering, is where the split pays. `SPLIT_K_ENABLED[0] = True`
SPLIT_K_ENABLED = [False]


def _attention_split(qg, k, v, k_cache, v_cache, cache_bias, scale, n, splits, shape):
    """One new token (t = 1) over the cache split into `splits` pieces along the slots, each
    piece's softmax kept as (max, sum, weighted values) and the pieces combined exactly (the
    rescaling is associative): one batched matmul with `splits` times more rows to share out."""
    b, h, t = shape
    hkv, d = qg.shape[1], qg.shape[3]
    c = -(-n // splits)  # slots per piece; the last piece is padded and masked
    pad = c * splits - n
    kc, vc, bias = k_cache[:, :, :n], v_cache[:, :, :n], cache_bias[:, :n]
    if pad:
        kc = torch.nn.functional.pad(kc, (0, 0, 0, pad))
        vc = torch.nn.functional.pad(vc, (0, 0, 0, pad))
        bias = torch.nn.functional.pad(bias, (0, pad), value=float("-inf"))
    kp = kc.reshape(b, hkv, splits, c, d)
    vp = vc.reshape(b, hkv, splits, c, vc.shape[-1])
    scores = torch.matmul(qg.unsqueeze(2), kp.transpose(-1, -2)).mul_(scale)  # [b,hkv,P,r,c]
    scores += bias.reshape(b, 1, splits, 1, c)
    top = scores.amax(-1, keepdim=True).clamp(min=torch.finfo(scores.dtype).min)
    w = torch.exp(scores - top)
    part_sum, part_out = w.sum(-1, keepdim=True), torch.matmul(w, vp)
    new = torch.matmul(qg, k.transpose(-1, -2)).mul_(scale)  # [b, hkv, r, 1]
    best = torch.maximum(top.amax(2), new)
    rescale = torch.exp(top - best.unsqueeze(2))
    e_new = torch.exp(new - best)
    total = (part_sum * rescale).sum(2) + e_new
    out = ((part_out * rescale).sum(2) + e_new * v) / total
    mass = qg.new_zeros(b, k_cache.shape[2] + t)
    mass[:, :n] = (w * rescale / total.unsqueeze(2)).sum((1, 3)).reshape(b, -1)[:, :n]
    mass[:, -t:] = (e_new / total).sum((1, 2))[:, None]
    return out.reshape(b, h, t, v.shape[-1]), mass


def _new_block_mask(new_mask: Tensor, group: int) -> Tensor:
    """[B, 1, group * T, T] bool: causal among the new tokens, padding keys masked, and every
    token sees itself (a padding row stays finite)."""
    t = new_mask.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    allowed = (causal & new_mask.bool()[:, None, :]) | torch.eye(t, dtype=torch.bool)
    return allowed.repeat(1, group, 1)[:, None]


def _used_slots(cache_bias: Tensor) -> int:
    used = (cache_bias == 0).any(0).nonzero()
    return int(used[-1]) + 1 if used.numel() else 0


@attention_decode.register_fake
def _(q, k, v, k_cache, v_cache, cache_bias, new_bias, scale):
    return (q.new_empty((*q.shape[:-1], v.shape[-1])),
            q.new_empty((q.shape[0], k_cache.shape[2] + q.shape[2])))


# ---- optim::linear_int8: int8 weights, dynamic per-token int8 activations ----
#
# y = s_x[m] · w_scale[n] · Σ_k q_x[m, k] · w_q[n, k] + bias[n]
#   q_x = round(x / s_x), s_x = max|x[m, :]| / 127 (one scale per token), w_q int8 per-channel.
# `in_scale` [K] (optional) multiplies x per input channel first (SmoothQuant's x / s), inside
# the same fused quantization pass (`optim.kernels.quantize_rows`). With `act_scale` (a
# calibrated scalar, static int8) s_x is that constant for every token.
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
def linear_int8(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None,
                in_scale: Tensor | None = None, act_scale: Tensor | None = None) -> Tensor:
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k).float().contiguous()
    zp = torch.zeros(w_q.shape[0], dtype=torch.int64)
    if act_scale is not None:  # static: oneDNN applies the scales and bias itself
        y = torch.ops.onednn.qlinear_pointwise(
            quantize_static(x2, act_scale, in_scale), float(act_scale), 128, _packed(w_q),
            w_scale, zp, bias, 1.0, 0, torch.float32, "none", [], "")
        return y.reshape(*lead, w_q.shape[0]).to(x.dtype)
    q, s = quantize_rows(x2, in_scale)
    acc = torch.ops.onednn.qlinear_pointwise(q, 1.0, 128, _packed(w_q), w_scale, zp, None,
                                             1.0, 0, torch.float32, "none", [], "")
    # written over oneDNN's fresh output: 1.2x faster than a new tensor at 800 x 1536, and the
    # same rounding as addcmul's (mul_ then add_ rounds twice and moved near-tie neighbours)
    y = acc.mul_(s) if bias is None else torch.addcmul(bias, acc, s, out=acc)
    return y.reshape(*lead, w_q.shape[0]).to(x.dtype)


@linear_int8.register_fake
def _(x, w_q, w_scale, bias, in_scale=None, act_scale=None):
    return x.new_empty((*x.shape[:-1], w_q.shape[0]))


# ---- optim::merge_tokens / optim::unmerge_tokens (ToMe bipartite soft matching) ----
#
# The first `protect` tokens (CLS, registers) are never merged and stay first, in order. The rest
# alternate between set A (even) and set B (odd); each A token finds its most similar B token
# (cosine of `metric`), and the r A tokens with the best matches are averaged into their B
# partners, weighted by how many original tokens each already stands for (`size`). Output order:
# protected, kept A tokens (original order), B tokens. `dest[b, i]` is the output row of token i.


def merged_count(n: int, r: int, protect: int) -> int:
    """Tokens left after merging r of n (at most half of the unprotected ones can go)."""
    return n - min(r, (n - protect + 1) // 2)


@torch.library.custom_op("optim::merge_tokens", mutates_args=())
def merge_tokens(x: Tensor, metric: Tensor, size: Tensor | None, r: int,
                 protect: int) -> tuple[Tensor, Tensor, Tensor]:
    b, n, c = x.shape
    if metric.dim() == 4:  # keys [B, H, N, D]: ToMe averages them over heads
        metric = metric.mean(1)
    p = protect
    r = n - merged_count(n, r, p)
    m = metric[:, p:].float()
    m = m / m.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    a, bb = m[:, ::2], m[:, 1::2]
    na, nb = a.shape[1], bb.shape[1]
    best, partner = (a @ bb.transpose(1, 2)).max(-1)  # [B, na]
    order = best.argsort(-1, descending=True)
    src, kept = order[:, :r], order[:, r:].sort(-1).values
    a_pos = torch.empty(b, na, dtype=torch.long)
    a_pos.scatter_(1, kept, (p + torch.arange(na - r)).expand(b, -1))
    a_pos.scatter_(1, src, p + (na - r) + partner.gather(1, src))
    dest = torch.empty(b, n, dtype=torch.long)
    dest[:, :p] = torch.arange(p)
    dest[:, p::2] = a_pos
    dest[:, p + 1::2] = p + (na - r) + torch.arange(nb)
    w = torch.ones(b, n, 1, dtype=x.dtype) if size is None else size
    # only the r merged tokens move through a scatter; kept ones are gathered, B ones reused
    xa, xb, wa, wb = x[:, p::2], x[:, p + 1::2], w[:, p::2], w[:, p + 1::2]
    src_w = wa.gather(1, src.unsqueeze(-1))
    src_x = xa.gather(1, src.unsqueeze(-1).expand(b, r, c)) * src_w
    dst = partner.gather(1, src).unsqueeze(-1)
    b_size = wb.scatter_add(1, dst, src_w)
    b_x = (xb * wb).scatter_add_(1, dst.expand(b, r, c), src_x) / b_size
    kept_x = xa.gather(1, kept.unsqueeze(-1).expand(b, na - r, c))
    merged = torch.cat([x[:, :p], kept_x, b_x], 1)
    new_size = torch.cat([w[:, :p], wa.gather(1, kept.unsqueeze(-1)), b_size], 1)
    return merged, new_size, dest


@merge_tokens.register_fake
def _(x, metric, size, r, protect):
    b, n, c = x.shape
    k = merged_count(n, r, protect)
    return x.new_empty((b, k, c)), x.new_empty((b, k, 1)), x.new_empty((b, n), dtype=torch.long)


@torch.library.custom_op("optim::unmerge_tokens", mutates_args=())
def unmerge_tokens(x: Tensor, dest: Tensor) -> Tensor:
    """Every original token takes the value of the merged token it went into."""
    return x.gather(1, dest.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


@unmerge_tokens.register_fake
def _(x, dest):
    return x.new_empty((x.shape[0], dest.shape[1], x.shape[2]))


# ---- optim::linear_int4: weight-only int4, blockwise scales (ONNX Runtime MatMulNBits layout) ----

def pack_int4(codes: Tensor, block: int) -> Tensor:
    """[N, K] codes in 0..15 (K a multiple of `block`) -> uint8 [N, K / block, block / 2]."""
    n, k = codes.shape
    c = codes.to(torch.uint8).reshape(n, k // block, block // 2, 2)
    return c[..., 0] | (c[..., 1] << 4)


def unpack_int4(packed: Tensor, scales: Tensor) -> Tensor:
    """The fp32 weight [N, K] that `packed` and `scales` [N, K / block] stand for."""
    lo, hi = packed & 0xF, packed >> 4
    codes = torch.stack([lo, hi], -1).reshape(packed.shape[0], packed.shape[1], -1)
    return ((codes.float() - 8.0) * scales.unsqueeze(-1)).reshape(packed.shape[0], -1)


@torch.library.custom_op("optim::linear_int4", mutates_args=())
def linear_int4(x: Tensor, w_packed: Tensor, scales: Tensor, bias: Tensor | None,
                block: int) -> Tensor:
    return F.linear(x, unpack_int4(w_packed, scales).to(x.dtype), bias)


@linear_int4.register_fake
def _(x, w_packed, scales, bias, block):
    return x.new_empty((*x.shape[:-1], w_packed.shape[0]))


# ---- optim::linear_binary: 1-bit weights (sign × per-channel/group scale), optional 1-bit
# activations on the packed XNOR/popcount kernel (see optim/binary.py for the arithmetic) ----

@torch.library.custom_op("optim::linear_binary", mutates_args=())
def linear_binary(x: Tensor, w_bits: Tensor, w_scale: Tensor, bias: Tensor | None,
                  threshold: Tensor | None, in_features: int) -> Tensor:
    lead, k = x.shape[:-1], in_features
    if threshold is None:  # weights only: unpack, then a float GEMM (no kernel beats fp32 here)
        w = unpack_bits(w_bits.T, k) * expand_groups(w_scale, k)
        return F.linear(x, w.to(x.dtype), bias)

    bits, beta = pack_rows(x.reshape(-1, k).float(), threshold, w_scale.shape[1])
    y = binary_linear(bits, w_bits, k, beta, w_scale, bias)
    return y.reshape(*lead, w_bits.shape[1]).to(x.dtype)


@linear_binary.register_fake
def _(x, w_bits, w_scale, bias, threshold, in_features):
    return x.new_empty((*x.shape[:-1], w_bits.shape[1]))
