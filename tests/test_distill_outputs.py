"""distill_outputs: output-matching training after lossy passes lowers the held-out error, keeps
sparsity masks, and changes nothing when it cannot help or has no teacher."""

from __future__ import annotations

import copy

import pytest
import torch

import optim
from optim.errors import ConfigError
from optim.ir import get_constant
from optim.pass_base import PassContext
from optim.registry import PASSES
from passes.common.graph_runner import output_error, run
from passes.common.linears import constant_linears, weight_and_bias


def _batches(z, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    (x,) = z.example_args
    return [((torch.randn(x.shape, generator=g),), {}) for _ in range(n)]


def _optimize(z, pipeline, batches):
    return optim.optimize(copy.deepcopy(z.model), "cpu", z.example_args, pipeline,
                          calibration=batches, backend="torch", measure_latency=False)


def test_training_after_pruning_lowers_the_held_out_error(zoo_model):
    z = zoo_model("vit")
    batches = _batches(z, 4)
    pruned = ["fuse_attention", {"sparsify": {"sparsity": 0.5, "reconstruct": False}}]
    om = _optimize(z, ["cleanup", *pruned, {"distill_outputs": {"steps": 60, "lr": 1e-3}}],
                   batches)
    d = om.report.pass_result("distill_outputs")["details"]
    assert d["kept"] and d["train_batches"] == 3 and d["held_out_batches"] == 1
    assert d["relative_error_after"] < 0.7 * d["relative_error_before"]
    # the graph it leaves has that error against the original model on the held-out batch
    original = _optimize(z, ["cleanup"], batches).graph
    held = batches[3:]
    got = output_error(om.graph, held, [run(original, b) for b in held])
    assert got == pytest.approx(d["relative_error_after"], rel=1e-3)
    # the pruned shapes stay: only values change
    plain = _optimize(z, ["cleanup", *pruned], batches)
    assert [get_constant(plain.graph, weight_and_bias(n)[0]).shape
            for n in constant_linears(plain.graph)] == \
        [get_constant(om.graph, weight_and_bias(n)[0]).shape for n in constant_linears(om.graph)]


def test_masked_weights_keep_their_zeros(zoo_model):
    z = zoo_model("vit")
    batches = _batches(z, 4)
    om = _optimize(z, ["cleanup", "prune_weights",
                       {"distill_outputs": {"steps": 30, "lr": 1e-3}}], batches)
    assert om.report.pass_result("distill_outputs")["details"]["kept"]
    masked = [get_constant(om.graph, weight_and_bias(n)[0]) for n in constant_linears(om.graph)]
    masked = [w for w in masked if (w == 0).float().mean() > 0.2]
    assert masked and all(abs(float((w == 0).float().mean()) - 0.5) < 0.01 for w in masked)


def test_nothing_to_recover_leaves_the_graph_exact(zoo_model):
    z = zoo_model("vit")
    batches = _batches(z, 4)
    om = _optimize(z, ["cleanup", {"distill_outputs": {"steps": 10, "lr": 1e-3}}], batches)
    r = om.report.pass_result("distill_outputs")
    assert not r["details"]["kept"] and not r["changed"]
    assert any(s["where"] == "weights" for s in r["skipped"])
    x = batches[0][0]
    torch.testing.assert_close(om(*x), z.model(*x), rtol=1e-5, atol=1e-5)


def test_without_the_original_outputs_it_says_how_to_run_it(zoo_model):
    z = zoo_model("vit")
    gm = _optimize(z, ["cleanup"], _batches(z, 1)).graph
    spec = PASSES.get("distill_outputs")
    ctx = PassContext(example_inputs=(z.example_args, {}))
    with pytest.raises(ConfigError, match="optim.optimize"):
        spec.run(gm, spec.make_config({}), ctx)
