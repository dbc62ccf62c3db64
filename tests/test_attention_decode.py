"""optim::attention_decode against plain attention over the concatenated cache: new tokens
(causal among themselves, padding masked), grouped-query heads, the attention mass it returns,
the split-K form (LeanAttention) for one sequence with a long cache, and the chunked form long
prompts take."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from optim import ops


def _case(b=2, hkv=2, group=3, t=4, s=11, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hkv * group, t, d, generator=g)
    k, v = torch.randn(b, hkv, t, d, generator=g), torch.randn(b, hkv, t, d, generator=g)
    kc, vc = torch.randn(b, hkv, s, d, generator=g), torch.randn(b, hkv, s, d, generator=g)
    cache_mask = torch.rand(b, s, generator=g) > 0.3
    new_mask = torch.ones(b, t, dtype=torch.long)
    return q, k, v, kc, vc, cache_mask, new_mask


def _biased(case):
    q, k, v, kc, vc, cache_mask, new_mask = case
    group = q.shape[1] // k.shape[1]
    return q, k, v, kc, vc, ops.cache_bias(cache_mask), ops.new_bias(new_mask, group)


def _reference(q, k, v, kc, vc, cache_mask, new_mask, scale):
    t = q.shape[2]
    keys, values = torch.cat([kc, k], 2), torch.cat([vc, v], 2)
    causal = torch.ones(t, t, dtype=torch.bool).tril() & new_mask.bool()[:, None, :]
    allowed = torch.cat([cache_mask[:, None, :].expand(-1, t, -1), causal], -1)[:, None]
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed, scale=scale,
                                          enable_gqa=True)


@pytest.mark.parametrize("t", [1, 4, ops.CHUNK_ROWS * 2 + 5])
def test_matches_attention_over_the_concatenated_cache(t):
    case = _case(t=t)
    out, mass = torch.ops.optim.attention_decode(*_biased(case), 0.3)
    assert torch.allclose(out, _reference(*case, 0.3), atol=1e-5)
    q = case[0]
    assert torch.allclose(mass.sum(1), torch.full((2,), float(q.shape[1] * t)), atol=1e-4)
    assert (mass[:, :11][~case[5]] == 0).all()  # masked slots get no attention


def test_split_k_is_exact_for_one_sequence_over_a_long_cache():
    q, k, v, kc, vc, cache_mask, new_mask = _case(b=1, hkv=1, group=4, t=1, s=2000, seed=1)
    cache_mask[:, 1900:] = False  # the unwritten end of the cache
    case = _biased((q, k, v, kc, vc, cache_mask, new_mask))
    whole = ops.attention_decode._init_fn(*case, 0.3)
    n = ops._used_slots(case[5])
    qg = q.reshape(1, 1, 4, -1)
    for splits in (2, 3, 7):
        out, mass = ops._attention_split(qg, k, v, kc, vc, case[5], 0.3, n, splits,
                                         (1, 4, 1))
        assert torch.allclose(out, whole[0], atol=1e-6)
        assert torch.allclose(mass, whole[1], atol=1e-6)


@pytest.mark.parametrize("s", [1, 40])  # a prompt over an empty cache; a block after a cache
def test_long_blocks_run_in_causal_chunks_with_the_same_result(s):
    q, k, v, kc, vc, cache_mask, new_mask = _case(b=2, t=ops.CHUNK_ROWS + 70, s=s, seed=2)
    new_mask[1, :9] = 0  # a left-padded prompt
    if s == 1:
        cache_mask[:] = False
    case = (q, k, v, kc, vc, cache_mask, new_mask)
    biased = _biased(case)
    chunked = torch.ops.optim.attention_decode(*biased, 0.3)
    n = ops._used_slots(biased[5])
    qg = q.reshape(2, 2, -1, q.shape[-1])
    past = torch.matmul(qg, kc[:, :, :n].transpose(-1, -2)) * 0.3 + biased[5][:, None, None, :n]
    new = torch.matmul(qg, k.transpose(-1, -2)) * 0.3 + biased[6]
    p = torch.softmax(torch.cat([past, new], -1), -1)  # the one-shot form, written out
    mass = torch.zeros(2, s + q.shape[2])
    mass[:, :n], mass[:, s:] = p[..., :n].sum((1, 2)), p[..., n:].sum((1, 2))
    real = new_mask.bool()[:, None, :, None].expand(-1, 6, -1, -1)  # padding rows: anything
    assert torch.allclose(torch.where(real, chunked[0], 0),
                          torch.where(real, _reference(*case, 0.3), 0), atol=1e-5)
    assert torch.allclose(chunked[1], mass, atol=1e-3)
