"""prune_weights: Wanda/magnitude masks, unstructured and 2:4, and what the cost model makes
of them."""

from __future__ import annotations

import copy

import pytest
import torch

import optim
from passes.prune_weights import PruneWeightsConfig, _mask


def _prune(z, opts, **kw):
    return optim.optimize(copy.deepcopy(z.model), "cpu", z.example_args,
                          ["cleanup", {"prune_weights": opts}], example_kwargs=z.example_kwargs,
                          backend="torch", measure_latency=False, **kw)


def test_masks_have_the_pattern():
    score = torch.rand(8, 16)
    two_four = _mask(score, PruneWeightsConfig(pattern="2:4"))
    assert (two_four.reshape(8, 4, 4).sum(-1) == 2).all()
    kept = score * two_four
    assert (kept.reshape(8, 4, 4).amax(-1) == score.reshape(8, 4, 4).amax(-1)).all()
    rows = _mask(score, PruneWeightsConfig(sparsity=0.75))
    assert (rows.sum(1) == 4).all()


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_zoo_layers_are_masked_and_costed(pattern, zoo_model):
    z = zoo_model("bert")
    om = _prune(z, {"pattern": pattern}, estimate_targets=["a100"])
    res = om.report.pass_result("prune_weights")
    assert res["counts"]["linears_masked"] == 12
    assert all(la["density"] == 0.5 for la in res["details"]["layers"])
    assert "no backend here runs them faster" in res["details"]["speed"]
    a100 = next(e for e in om.report["estimates"] if e["target"] == "a100")
    if pattern == "unstructured":
        assert any("runs as a dense GEMM, no gain" in n for n in a100["notes"])


def test_two_four_is_faster_only_where_the_target_has_sparse_tensor_cores():
    from dataclasses import replace

    from hardware.costmodel import default_calibration, kernel_time
    from hardware.opcost import graph_kernels
    from optim import zoo
    from optim.targets import resolve_target

    z = zoo.load("bert", batch=8, seq=128, hidden_size=512, intermediate_size=2048,
                 num_attention_heads=8)
    om = _prune(z, {"pattern": "2:4"})
    sparse = [k for k in graph_kernels(om.graph) if k.weight_format == "2:4"]
    assert len(sparse) == 12
    for target, faster in (("a100", True), ("cpu", False)):
        spec = resolve_target(target).spec
        cal = default_calibration(spec)
        t = sum(kernel_time(k, spec, cal, "fp16" if target == "a100" else "graph").seconds
                for k in sparse)
        t_dense = sum(kernel_time(replace(k, weight_format="dense"), spec, cal,
                                  "fp16" if target == "a100" else "graph").seconds
                      for k in sparse)
        assert (t < 0.95 * t_dense) == faster, target
