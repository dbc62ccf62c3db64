"""A contract test for every registered pass, on every small zoo model."""

import pytest

import optim
from optim import numerics
from optim.pass_base import Exact
from optim.registry import PASSES
from tests.conftest import SMALL


@pytest.mark.parametrize("model_name", SMALL)
@pytest.mark.parametrize("pass_name", PASSES.names())
def test_numerics_contract(pass_name, model_name, zoo_model):
    spec = PASSES.get(pass_name)
    z = zoo_model(model_name)
    om = optim.optimize(z.model, "cpu", z.example_args, example_kwargs=z.example_kwargs,
                        pipeline=[*spec.requires, pass_name], backend="torch",
                        measure_latency=False)
    ref = z.model(*z.example_args, **z.example_kwargs)
    fid = numerics.compare(ref, om(*z.example_args, **z.example_kwargs))
    if isinstance(spec.numerics, Exact):
        assert fid["max_abs_error"] <= spec.numerics.atol
    else:
        assert fid[spec.numerics.metric] >= spec.numerics.min_value
    result = om.report.pass_result(pass_name)
    assert result["changed"], f"{pass_name} changed nothing on {model_name}"
