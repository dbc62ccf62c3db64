"""A contract test for every registered pass, on every small zoo model."""

import pytest

import optim
from optim import numerics
from optim.errors import PassError
from optim.pass_base import Exact
from optim.registry import PASSES
from tests.conftest import SMALL

# passes that only do something after a lossy one: what runs before them in the contract
BEFORE = {"distill_outputs": ["cleanup", "prune_weights"]}


def _pipeline(name: str) -> list[str]:
    """`name` preceded by everything it requires, transitively, in order."""
    if name in BEFORE:
        return BEFORE[name] + [name]
    out = []
    for req in PASSES.get(name).requires:
        out += [p for p in _pipeline(req) if p not in out]
    return out + [name]


# passes that must refuse a model kind, and the words their refusal gives
REFUSES = {("merge_tokens", m): "causal mask" for m in ("gpt2", "llama")} | \
    {("merge_tokens", "bert"): "padding mask"}
# options the contract runs with: the zoo's tiny models are below linear attention's and token
# merging's break-even, so their cost-model gates are off here (their own tests test them)
OPTIONS = {"linearize_attention": {"gate": False, "fit_steps": 40},
           "merge_tokens": {"gate": False}, "binarize": {"distill_steps": 10},
           "distill_outputs": {"steps": 20, "lr": 1e-3}}


@pytest.mark.parametrize("model_name", SMALL)
@pytest.mark.parametrize("pass_name", PASSES.names())
def test_numerics_contract(pass_name, model_name, zoo_model):
    spec = PASSES.get(pass_name)
    z = zoo_model(model_name)
    if (pass_name, model_name) in REFUSES:
        with pytest.raises(PassError, match=REFUSES[pass_name, model_name]):
            optim.optimize(z.model, "cpu", z.example_args, example_kwargs=z.example_kwargs,
                           pipeline=_pipeline(pass_name), backend="torch",
                           measure_latency=False)
        return
    om = optim.optimize(z.model, "cpu", z.example_args, example_kwargs=z.example_kwargs,
                        pipeline=_pipeline(pass_name), backend="torch",
                        measure_latency=False, **{k: v for k, v in OPTIONS.items()
                                                  if k == pass_name})
    ref = z.model(*z.example_args, **z.example_kwargs)
    fid = numerics.compare(ref, om(*z.example_args, **z.example_kwargs))
    if isinstance(spec.numerics, Exact):
        assert fid["max_abs_error"] <= spec.numerics.atol
    else:
        assert fid[spec.numerics.metric] >= spec.numerics.min_value
    result = om.report.pass_result(pass_name)
    assert result["changed"], f"{pass_name} changed nothing on {model_name}"
