"""low_rank: truncated SVD of linear layers, rank choice, refusals where it would not pay."""

from __future__ import annotations

import copy

import pytest

import optim


def _factor(model, args, opts, kwargs=None, calibration=None):
    return optim.optimize(copy.deepcopy(model), "cpu", args, ["cleanup", {"low_rank": opts}],
                          example_kwargs=kwargs or {}, calibration=calibration,
                          backend="torch", measure_latency=False)


@pytest.mark.parametrize("name", ["bert", "llama", "dit"])
def test_flop_budget_factorizes_zoo_layers(name, zoo_model):
    z = zoo_model(name)
    om = _factor(z.model, z.example_args, {"flops": 0.5}, z.example_kwargs)
    layers = om.report.pass_result("low_rank")["details"]["layers"]
    assert layers and all(la["flops_fraction"] <= 0.5 + 1e-3 for la in layers)
    assert not any("lm_head" in la["where"] or "classifier" in la["where"] for la in layers)
