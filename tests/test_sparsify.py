"""sparsify (structured): real shrinking of heads and neurons, FLOP budgets, reconstruction."""

from __future__ import annotations

import copy

import pytest
import torch

import optim
from optim.ir import get_constant


def _prune(z, opts, backend="torch", calibration=None):
    return optim.optimize(copy.deepcopy(z.model), "cpu", z.example_args,
                          ["cleanup", "fuse_attention", {"sparsify": opts}],
                          example_kwargs=z.example_kwargs, backend=backend,
                          calibration=calibration, measure_latency=False)


def _weights(om) -> dict[str, tuple]:
    return {n.target: tuple(get_constant(om.graph, n).shape) for n in om.graph.graph.nodes
            if n.op == "get_attr"}


@pytest.mark.parametrize("name,heads", [("bert", (4, 2)), ("llama", (4, 2)), ("vit", (4, 2)),
                                        ("gpt2", None)])
def test_half_sparsity_shrinks_the_real_tensors(name, heads, zoo_model):
    z = zoo_model(name)
    om = _prune(z, {"sparsity": 0.5, "reconstruct": False})
    res = om.report.pass_result("sparsify")
    layers = z.num_attention_layers
    assert res["counts"]["layers_pruned"] == layers
    assert res["counts"].get("heads_removed", 0) == (layers * (heads[0] - heads[1]) if heads
                                                     else 0)
    assert res["details"]["flops_fraction"] < 0.85
    for layer in res["details"]["layers"]:
        if heads:
            assert layer["heads"] == f"{heads[1]}/{heads[0]}"
        kept, total = map(int, layer["neurons"].split("/"))
        assert kept == total // 2
    if name == "bert":  # the tensors themselves shrank: 2 heads × 16 rows, 64 of 128 neurons
        shapes = _weights(om)
        assert all(s[0] == 32 for k, s in shapes.items() if "query" in k and len(s) == 2)
        assert all(s[0] == 64 for k, s in shapes.items() if "intermediate" in k and len(s) == 2)
        assert any("intermediate" in k for k in shapes)
    out = om(*z.example_args, **z.example_kwargs)
    ref = z.model(*z.example_args, **z.example_kwargs)
    assert out[0].shape == ref[0].shape


def test_unreachable_flop_budget_is_said(zoo_model):
    om = _prune(zoo_model("llama"), {"flops": 0.2, "reconstruct": False})
    reasons = [s["reason"] for s in om.report.pass_result("sparsify")["skipped"]]
    assert any("out of reach" in r for r in reasons)


def test_reconstruction_recovers_fidelity_on_held_out_data():
    from optim import numerics, zoo

    z = zoo.load("vit", batch=8)  # calibration: 4 batches of 8 images; evaluation: another one
    g = torch.Generator().manual_seed(1)
    calib = [((torch.randn(z.example_args[0].shape, generator=g),), {}) for _ in range(4)]
    cos = {}
    for rec in (False, True):
        om = _prune(z, {"sparsity": 0.5, "reconstruct": rec}, calibration=calib)
        cos[rec] = numerics.compare(z.model(*z.example_args).logits,
                                    om(*z.example_args).logits)["cosine_min"]
        if rec:
            layer = om.report.pass_result("sparsify")["details"]["layers"][0]
            assert layer["neurons_relative_error"] < layer["neurons_relative_error_unfitted"]
    assert cos[True] > cos[False]


def test_pruned_graph_lowers_to_onnxruntime(zoo_model):
    z = zoo_model("bert")
    ref = _prune(z, {"sparsity": 0.5, "reconstruct": False})
    om = _prune(z, {"sparsity": 0.5, "reconstruct": False}, backend="onnxruntime")
    torch.testing.assert_close(om(*z.example_args, **z.example_kwargs).last_hidden_state,
                               ref(*z.example_args, **z.example_kwargs).last_hidden_state,
                               rtol=1e-4, atol=1e-4)
