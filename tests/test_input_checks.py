"""Inputs are checked where they enter an optimized model, the same way on every backend: ids
outside the embedding table (a compiled backend would read out of bounds, ONNX Runtime wraps
negative ids), keywords it was not traced with or lacks, wrong dtypes and ranks; each a
`ShapeError` naming the input and what it accepts (issue 23, items 3 and 4)."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertModel

import optim
from optim.shapes import ShapeError

_BUILT = {}


def _optimized(backend):
    if backend not in _BUILT:
        torch.manual_seed(0)
        model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=100)).eval()
        ids = torch.randint(0, 100, (2, 8))
        _BUILT[backend] = optim.optimize(model, "cpu", (), example_kwargs={
            "input_ids": ids, "attention_mask": torch.ones_like(ids)}, pipeline="cleanup",
            backend=backend, measure_latency=False)
    return _BUILT[backend]


IDS = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))
MASK = torch.ones_like(IDS)
BACKENDS = ["torch", "onnxruntime", pytest.param("tvm", marks=pytest.mark.slow)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad,message", [
    (IDS.clone().fill_(100), "'input_ids' holds 100, outside 0..99"),
    (torch.full((2, 8), 10 ** 6), "'input_ids' holds 1000000, outside 0..99"),
    (torch.full((2, 8), -1), "'input_ids' holds -1, outside 0..99"),
    (IDS.float(), "'input_ids' must be int64, got float32"),
    (IDS[0], "'input_ids' must have 2 dimensions"),
    (IDS[:1], "'attention_mask' has batch 2, but 'input_ids' has 1: inputs must agree"),
])
def test_bad_ids_are_refused_before_the_backend_runs(backend, bad, message):
    om = _optimized(backend)
    with pytest.raises(ShapeError, match=message):
        om(input_ids=bad, attention_mask=MASK)
    om(input_ids=IDS, attention_mask=MASK)  # and the model still runs


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_keywords_it_was_not_traced_with_are_errors_not_ignored(backend):
    om = _optimized(backend)
    with pytest.raises(ShapeError, match="token_type_ids"):
        om(input_ids=IDS, attention_mask=MASK, token_type_ids=torch.zeros_like(IDS))
    with pytest.raises(ShapeError, match="attention_mask"):
        om(input_ids=IDS)


def test_the_bounds_survive_save_and_load(tmp_path):
    om = _optimized("onnxruntime")
    om.save(tmp_path / "m")
    again = optim.load(tmp_path / "m")
    with pytest.raises(ShapeError, match="outside 0..99"):
        again(input_ids=IDS.clone().fill_(100), attention_mask=MASK)


def test_a_traced_keyword_left_out_takes_its_traced_value_and_another_is_refused():
    """GPT-2 traced with use_cache=False: a call without it runs as traced (what the
    original's default would do is not ours to guess, the traced value is what the graph
    holds); use_cache=True is an error saying to optimize again (issue 23, item 4)."""
    from optim import zoo

    z = zoo.load("gpt2")
    om = optim.optimize(z.model, "cpu", z.example_args, example_kwargs=z.example_kwargs,
                        pipeline="cleanup", backend="onnxruntime", measure_latency=False)
    with_it = om(*z.example_args, use_cache=False)
    without = om(*z.example_args)
    torch.testing.assert_close(with_it.logits, without.logits)
    with pytest.raises(ShapeError, match="'use_cache' was traced as False"):
        om(*z.example_args, use_cache=True)
