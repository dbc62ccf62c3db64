"""KV-cache policies: which tokens a bounded cache keeps (exact small cases), eviction into
reused slots, and generation with a bounded cache."""

from __future__ import annotations

import pytest
import torch

from optim.decoder_steps import CacheLayout
from optim.errors import ConfigError
from optim.kv_cache import CachePolicy, KVCache, select

LAYOUT = CacheLayout(layers=2, kv_heads=1, head_dim=2, value_dim=2)


def _kv(batch: int, tokens: int, first: int = 0):
    """Keys and values whose every entry is its token's position (to see where it went)."""
    pos = torch.arange(first, first + tokens, dtype=torch.float32)
    k = pos[None, None, :, None].expand(batch, 1, tokens, 2).clone()
    return [k, k + 0.5], [k + 100, k + 100.5]


def test_keyformer_keeps_the_recent_tokens_and_the_best_scored_others():
    real = torch.ones(1, 8, dtype=torch.bool)
    pos = torch.arange(8)[None]
    score = torch.tensor([[0.9, 0.1, 0.8, 0.2, 0.0, 0.3, 0.05, 0.05]])
    keep = select(real, pos, score, 4, CachePolicy("keyformer", 4, recent=0.5))
    assert keep.tolist() == [[0, 2, 6, 7]]  # two best older tokens, two most recent


def test_window_keeps_sinks_and_recent_tokens_and_padding_last():
    real = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)  # left padding
    pos = (real.long().cumsum(1) - 1).clamp(min=0)
    keep = select(real, pos, torch.zeros(1, 8), 4, CachePolicy("window", 4, sinks=1))
    assert keep.tolist() == [[2, 5, 6, 7]]  # the first real token, then the three latest


def test_a_full_cache_evicts_the_lowest_score_outside_the_recent_window(monkeypatch):
    # scores without noise, to check the eviction itself exactly
    monkeypatch.setattr(KVCache, "_score", lambda self, mass, valid: mass * valid)
    cache = KVCache(LAYOUT, 1, 4, CachePolicy("keyformer", 4, recent=0.5), steps=4)
    keys, values = _kv(1, 4)
    cache.fill(keys, values, torch.tensor([[0.5, 0.1, 0.3, 0.05]]), torch.arange(4)[None],
               torch.ones(1, 4))
    assert cache.mask.all() and cache.position.tolist() == [[0, 1, 2, 3]]
    # this step: token 1 gains enough to pass token 2; token 3 is recent and stays
    cache.add(*_kv(1, 1, first=4), torch.tensor([[0.0, 0.3, 0.0, 0.0, 0.7]]),
              torch.tensor([4]))
    assert cache.position.tolist() == [[0, 1, 4, 3]]  # token 2 (0.3 < 0.4) went
    assert cache.keys[0][0, 0, 2].tolist() == [4.0, 4.0]
    assert cache.values[1][0, 0, 2].tolist() == [104.5, 104.5]
    assert torch.allclose(cache.score, torch.tensor([[0.5, 0.4, 0.7, 0.05]]))


def test_keyformer_scores_are_a_distribution_over_valid_keys_and_seeded():
    policy = CachePolicy("keyformer", 4, seed=3)
    a, b = KVCache(LAYOUT, 1, 4, policy), KVCache(LAYOUT, 1, 4, policy)
    mass = torch.tensor([[0.5, 0.2, 0.3, 0.0]])
    valid = torch.tensor([[True, True, True, False]])
    sa, sb = a._score(mass, valid), b._score(mass, valid)
    assert torch.equal(sa, sb) and sa[0, 3] == 0 and abs(float(sa.sum()) - 1) < 1e-6


def test_window_evicts_the_oldest_non_sink():
    cache = KVCache(LAYOUT, 2, 3, CachePolicy("window", 3, sinks=1), steps=2)
    keys, values = _kv(2, 3)
    cache.fill(keys, values, torch.ones(2, 3), torch.arange(3).expand(2, 3),
               torch.ones(2, 3))
    cache.add(*_kv(2, 1, first=3), torch.ones(2, 4), torch.tensor([3, 3]))
    assert cache.position.tolist() == [[0, 3, 2], [0, 3, 2]]  # token 1 went


def test_bad_policies_are_refused():
    with pytest.raises(ConfigError, match="budget"):
        CachePolicy.parse({"method": "keyformer", "budget": 1.5})
    with pytest.raises(ConfigError, match="unknown options"):
        CachePolicy.parse({"method": "window", "size": 3})
    with pytest.raises(ConfigError, match="method"):
        CachePolicy.parse({"method": "h2o"})


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_generation_with_a_bounded_cache(backend):
    import optim
    from optim.zoo import char_lm

    model = char_lm.load()
    text = char_lm.batches("test", 2, 1, seed=1)[0]
    fast = optim.optimize(model, "cpu", text[:, :48], pipeline="cleanup", backend=backend,
                          measure_latency=False)
    full = fast.generate(text[:, :48], 24, stop_tokens=[])
    roomy = fast.generate(text[:, :48], 24, stop_tokens=[],
                          cache={"method": "keyformer", "budget": 72})  # every token fits
    assert torch.equal(full, roomy)
    for method in ("window", "keyformer"):
        small = fast.generate(text[:, :48], 24, stop_tokens=[],
                              cache={"method": method, "budget": 0.25})
        assert small.shape == full.shape and not torch.equal(small, full)
    ppl_full = fast.perplexity([text], prompt=48)
    ppl_small = fast.perplexity([text], prompt=48, cache={"method": "window", "budget": 0.25})
    assert ppl_full < ppl_small < 5 * ppl_full



def test_onnxruntime_steps_return_the_attention_mass_torch_does():
    """The attention each key received is Keyformer's eviction score: the ORT lowering of
    attention_decode must return torch's, for a prompt (over an empty cache) and a decode step
    (over a cache), with a padded sequence in the batch."""
    import optim
    from optim.zoo import char_lm

    model = char_lm.load()
    ids = char_lm.batches("test", 2, 1, seed=2)[0][:, :40]
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    masses = {}
    for backend in ("torch", "onnxruntime"):
        fast = optim.optimize(model, "cpu", ids[:, :24], pipeline="cleanup", backend=backend,
                              measure_latency=False)
        keys, values = fast.layout.allocate(2, 1)
        _, k, v, prompt_mass = fast._run(ids, mask, pos, torch.zeros(2, 1, dtype=torch.bool),
                                         keys, values)
        one = torch.ones(2, 1, dtype=torch.long)
        _, _, _, step_mass = fast._run(ids[:, -1:], one, pos[:, -1:] + 1, mask.bool(), k, v)
        masses[backend] = prompt_mass, step_mass
    for ours, theirs in zip(masses["torch"], masses["onnxruntime"]):
        assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-4)
    assert masses["torch"][1][1, :7].abs().max() == 0  # padding slots receive nothing



@pytest.mark.parametrize("method", ["window", "keyformer"])
def test_a_bounded_cache_keeps_the_same_tokens_when_the_prompt_goes_in_chunks(method,
                                                                              monkeypatch):
    """Chunked prefill into a staging cache, the attention mass summed per key over the
    chunks: the policy sees the same scores as from one step over the prompt."""
    import optim
    from optim import generation
    from optim.zoo import char_lm

    model = char_lm.load()
    text = char_lm.batches("test", 2, 1, seed=4)[0]
    fast = optim.optimize(model, "cpu", text[:, :24], pipeline="cleanup",
                          measure_latency=False)
    policy = {"method": method, "budget": 0.25, "seed": 2}
    one_step = fast.generate(text[:, :48], 16, stop_tokens=[], cache=policy)
    monkeypatch.setattr(generation, "PREFILL_CHUNK", 10)
    blocks = []
    run = fast._run
    monkeypatch.setattr(fast, "_run", lambda ids, *a: blocks.append(ids.shape[1]) or run(ids, *a))
    chunked = fast.generate(text[:, :48], 16, stop_tokens=[], cache=policy)
    assert blocks[:5] == [10, 10, 10, 10, 8]
    assert torch.equal(one_step, chunked)
