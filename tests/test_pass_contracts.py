"""A contract test for every registered pass, on every small zoo model: the pass changes
something, and its output stays within the numerics contract it declares. One pass on a
captured graph (`optim.testing.run_pass`); `optimize()` end to end is tested elsewhere."""

import pytest
import torch

from optim import numerics
from optim.errors import PassError
from optim.pass_base import Exact
from optim.registry import PASSES
from optim.testing import capture_example, run_pass
from tests.conftest import SMALL

# passes that only do something after a lossy one: what runs on the graph before them
BEFORE = {"distill_outputs": "prune_weights"}
# passes that must refuse a model kind, and the words their refusal gives
REFUSES = {("merge_tokens", m): "causal mask" for m in ("gpt2", "llama")} | \
    {("merge_tokens", "bert"): "padding mask"}
# options the contract runs with: the zoo's tiny models are below linear attention's and token
# merging's break-even, so their cost-model gates are off here (their own tests test them)
OPTIONS = {"linearize_attention": {"gate": False, "fit_steps": 40},
           "merge_tokens": {"gate": False}, "binarize": {"distill_steps": 10},
           "distill_outputs": {"steps": 20, "lr": 1e-3}}


@pytest.fixture(scope="module")
def captured(zoo_model):
    cache = {}

    def get(name):
        if name not in cache:
            z = zoo_model(name)
            cache[name] = (capture_example(z.model, z.example_args, z.example_kwargs), z)
        return cache[name]

    return get


@pytest.mark.parametrize("model_name", SMALL)
@pytest.mark.parametrize("pass_name", PASSES.names())
def test_numerics_contract(pass_name, model_name, captured):
    spec = PASSES.get(pass_name)
    gm, z = captured(model_name)
    example = (z.example_args, z.example_kwargs)
    if (pass_name, model_name) in REFUSES:
        with pytest.raises(PassError, match=REFUSES[pass_name, model_name]):
            run_pass(pass_name, gm, *example, options=OPTIONS.get(pass_name))
        return
    start = run_pass(BEFORE[pass_name], gm, *example).gm if pass_name in BEFORE else gm
    run = run_pass(pass_name, start, *example, options=OPTIONS.get(pass_name), teacher=gm)
    with torch.no_grad():
        fid = numerics.compare(z.model(*z.example_args, **z.example_kwargs), run.after)
    if isinstance(spec.numerics, Exact):
        assert fid["max_abs_error"] <= spec.numerics.atol
    else:
        assert fid[spec.numerics.metric] >= spec.numerics.min_value
    assert run.result.changed, f"{pass_name} changed nothing on {model_name}"
