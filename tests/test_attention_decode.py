"""optim::attention_decode against plain attention over the concatenated cache: new tokens
(causal among themselves, padding masked), grouped-query heads, the attention mass it returns,
and the split-K form (LeanAttention) for one sequence with a long cache."""

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


@pytest.mark.parametrize("t", [1, 4])
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
