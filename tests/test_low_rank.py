"""low_rank: truncated SVD of linear layers, rank choice, refusals where it would not pay."""

from __future__ import annotations

import copy

import pytest
import torch

import optim
from optim.ir import get_constant


def _factor(model, args, opts, kwargs=None, calibration=None):
    return optim.optimize(copy.deepcopy(model), "cpu", args, ["cleanup", {"low_rank": opts}],
                          example_kwargs=kwargs or {}, calibration=calibration,
                          backend="torch", measure_latency=False)


class _Mlp(torch.nn.Module):
    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.fc = torch.nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            self.fc.weight.copy_(w)

    def forward(self, x):
        return self.fc(x)


def test_a_low_rank_weight_is_recovered_exactly():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(128, 8, generator=g) @ torch.randn(8, 96, generator=g)  # rank 8
    model = _Mlp(w).eval()
    x = torch.randn(4, 10, 96, generator=g)
    om = _factor(model, (x,), {"energy": 0.999999})
    layer = om.report.pass_result("low_rank")["details"]["layers"][0]
    assert layer["rank"] == 8 and layer["relative_weight_error"] < 1e-5
    torch.testing.assert_close(om(x), model(x), rtol=1e-4, atol=1e-4)
    shapes = sorted(tuple(get_constant(om.graph, n).shape) for n in om.graph.graph.nodes
                    if n.op == "get_attr" and get_constant(om.graph, n).dim() == 2)
    assert shapes == [(8, 96), (128, 8)]


def test_full_rank_weights_stay_dense_with_the_reason():
    model = _Mlp(torch.randn(128, 96)).eval()  # random: flat spectrum
    with pytest.raises(optim.PassError, match="would cost more than the dense"):
        _factor(model, (torch.randn(2, 96),), {"energy": 0.99})


def test_activation_aware_rank_keeps_what_inputs_use():
    # inputs live in 8 of 96 channels: weighting by their RMS keeps those directions
    g = torch.Generator().manual_seed(1)
    model = _Mlp(torch.randn(128, 96, generator=g)).eval()
    x = torch.zeros(8, 16, 96)
    x[..., :8] = torch.randn(8, 16, 8, generator=g)
    x[..., 8:] = 1e-3 * torch.randn(8, 16, 88, generator=g)
    err = {}
    for aware in (False, True):
        om = _factor(model, (x,), {"flops": 0.2, "activation_aware": aware})  # rank 10
        err[aware] = float((om(x) - model(x)).norm() / model(x).norm())
    assert err[True] < 0.05 < err[False]


@pytest.mark.parametrize("name", ["bert", "llama", "dit"])
def test_flop_budget_factorizes_zoo_layers(name, zoo_model):
    z = zoo_model(name)
    om = _factor(z.model, z.example_args, {"flops": 0.5}, z.example_kwargs)
    layers = om.report.pass_result("low_rank")["details"]["layers"]
    assert layers and all(la["flops_fraction"] <= 0.5 + 1e-3 for la in layers)
    assert not any("lm_head" in la["where"] or "classifier" in la["where"] for la in layers)


def test_bad_options_are_named():
    model = _Mlp(torch.randn(128, 96)).eval()
    with pytest.raises(optim.ConfigError, match=r"energy must be in \(0, 1\]"):
        _factor(model, (torch.randn(2, 96),), {"energy": 0})
