"""optim.encode: sentence embeddings batched by length and token budget, in the caller's order."""

import pytest
import torch

import optim
from optim.embeddings import plan_batches
from optim.numerics import mean_pool
from optim.zoo.data import sentences


def test_batches_fill_a_token_budget_longest_first():
    lengths = [5, 40, 7, 7, 120, 3, 40, 9]
    batches = plan_batches(lengths, max_tokens=90, max_batch=3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert batches[0] == [4]  # 120 tokens alone: over budget, never split
    for b in batches:
        assert len(b) <= 3
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 90
        assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)
    with pytest.raises(optim.ConfigError, match="max_tokens and max_batch"):
        plan_batches(lengths, 0, 3)


@pytest.fixture(scope="module")
def minilm():
    from optim import zoo

    return zoo.load("minilm", batch=4, seq=32)


def test_encode_equals_each_sentence_alone_in_the_callers_order(minilm):
    om = optim.optimize(minilm.model, "cpu", example_kwargs=minilm.example_kwargs,
                        pipeline="cleanup,fuse_attention", backend="torch",
                        measure_latency=False)
    texts = sentences(40, seed=5) + ["Hi.", " ".join(sentences(30, seed=6))]  # 1 and 512 tokens
    got = optim.encode(om, minilm.tokenizer, texts, max_tokens=300, max_batch=8)
    assert got.shape == (len(texts), 384)
    with torch.inference_mode():
        for i, text in enumerate(texts):  # no padding at all: the reference
            enc = minilm.tokenizer([text], truncation=True, max_length=512, return_tensors="pt")
            ref = mean_pool(minilm.model(**enc).last_hidden_state, enc["attention_mask"])
            torch.testing.assert_close(got[i], ref[0], atol=1e-4, rtol=1e-4)


def test_encode_refuses_what_it_cannot_batch(minilm):
    static = optim.optimize(minilm.model, "cpu", example_kwargs=minilm.example_kwargs,
                            pipeline="cleanup", backend="torch", measure_latency=False,
                            dynamic=False)
    with pytest.raises(optim.ConfigError, match="batch and seq is static"):
        optim.encode(static, minilm.tokenizer, ["a sentence"])
    with pytest.raises(optim.ConfigError, match="list of texts"):
        optim.encode(minilm.model, minilm.tokenizer, "a sentence")
