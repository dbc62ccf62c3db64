"""prune_weights, one pass on small graphs: counts, masks with exactly the pattern asked for (and
no op added: the weights stay dense), a fidelity floor, the linears it must leave alone, and the
options that change which weights go."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from optim import numerics
from optim.errors import ConfigError, PassError
from optim.ir import get_constant
from optim.testing import capture_example, capture_zoo, run_pass
from tests.passes.small_models import FfnBlocks, WeightIsAnInput

LINEAR = torch.ops.aten.linear.default


class _NearMiss(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(32, 32)  # masked
        self.odd = torch.nn.Linear(30, 16)  # 30 inputs: no 2:4 groups (unstructured: masked)
        self.classifier = torch.nn.Linear(16, 4)  # output head: in the default skip list

    def forward(self, x, y, w):
        a = F.linear(self.fc(x), w)  # the weight is a graph input: not a constant linear
        return self.classifier(a + self.odd(y))


class _LoudInputs(torch.nn.Module):
    """Inputs 0..3 will be 100x louder than the rest, and their weights are the smallest."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 4, bias=False)
        with torch.no_grad():
            self.fc.weight.fill_(1.0)
            self.fc.weight[:, :4] = 0.1

    def forward(self, x):
        return self.fc(x)


def _weights(gm) -> dict[str, torch.Tensor]:
    """Each constant linear's weight [out, in], by the linear's weight constant name."""
    return {n.args[1].target: get_constant(gm, n.args[1]) for n in gm.graph.nodes
            if n.target is LINEAR and get_constant(gm, n.args[1]) is not None}


@pytest.fixture(scope="module")
def bert():
    return capture_zoo("bert")  # 2 layers x 6 linears; 64 inputs each, 128 for output.dense


@pytest.fixture(scope="module")
def pruned(bert):
    gm, z = bert
    return run_pass("prune_weights", gm, z.example_args, z.example_kwargs)


@pytest.fixture(scope="module")
def blocks():
    torch.manual_seed(0)
    model, x = FfnBlocks(residual=True).eval(), torch.randn(4, 16, 64)
    return capture_example(model, (x,)), (x,)


def test_counts_on_bert(pruned):
    assert [r.name for r in pruned.results] == ["cleanup", "prune_weights"]
    assert pruned.result.counts == {"linears_masked": 12}
    assert pruned.result.skipped == []
    assert [x["density"] for x in pruned.result.details["layers"]] == [0.5] * 12
    assert "no backend here runs them faster" in pruned.result.details["speed"]


def test_no_op_is_added_or_removed(bert, pruned):
    gm, z = bert
    clean = run_pass("cleanup", gm, z.example_args, z.example_kwargs)
    assert pruned.histogram_after == clean.histogram_after  # masks live in the weights
    assert pruned.histogram_after["aten.linear"] == 12
    marked = [n for n in pruned.gm.graph.nodes if n.target is LINEAR]
    assert all(n.meta["weight_format"] == "unstructured" and n.meta["weight_density"] == 0.5
               for n in marked)


def test_half_of_every_row_is_zeroed_and_the_rest_is_untouched(bert, pruned):
    gm, _ = bert
    before, after = _weights(gm), _weights(pruned.gm)
    assert len(after) == 12 and set(after) == set(before)
    for name, w in after.items():
        assert ((w != 0).sum(1) == w.shape[1] // 2).all(), name
        kept = w != 0
        assert torch.equal(w[kept], before[name][kept])  # kept weights keep their values


def test_two_four_keeps_the_two_largest_of_every_four(bert):
    gm, z = bert
    run = run_pass("prune_weights", gm, z.example_args, z.example_kwargs,
                   options={"pattern": "2:4", "score": "magnitude"})
    assert run.result.counts == {"linears_masked": 12}
    before, after = _weights(gm), _weights(run.gm)
    for name, w in after.items():
        g, orig = w.reshape(w.shape[0], -1, 4), before[name].reshape(w.shape[0], -1, 4)
        assert ((g != 0).sum(-1) == 2).all(), name
        top2 = orig.abs().topk(2, dim=-1).indices
        assert torch.equal(g.gather(-1, top2), orig.gather(-1, top2))
    assert all(n.meta["weight_format"] == "2:4" for n in run.gm.graph.nodes
               if n.target is LINEAR)


def test_sparsity_sets_the_row_density(bert):
    gm, z = bert
    run = run_pass("prune_weights", gm, z.example_args, z.example_kwargs,
                   options={"sparsity": 0.75})
    for name, w in _weights(run.gm).items():
        assert ((w != 0).sum(1) == w.shape[1] // 4).all(), name
    assert {x["density"] for x in run.result.details["layers"]} == {0.25}


def test_numerics_floor(blocks, pruned):
    gm, args = blocks
    run = run_pass("prune_weights", gm, args)
    # contract: cosine_min >= 0.8; measured here 17.3 dB, cosine_min 0.982
    assert 14.0 <= run.sqnr_db() < 30.0
    assert numerics.compare(run.before, run.after)["cosine_min"] >= 0.95
    # BERT's residual stream keeps 39.6 dB
    assert pruned.sqnr_db() >= 30.0 and pruned.max_abs_error() > 0
    assert all(x["output_sqnr_db_est"] > 5.0 for x in pruned.result.details["layers"])


def test_wanda_keeps_small_weights_on_loud_inputs():
    torch.manual_seed(0)
    x = torch.randn(32, 16)
    x[:, :4] *= 100
    gm = capture_example(_LoudInputs().eval(), (x,))
    kept = {}
    for score in ("wanda", "magnitude"):
        run = run_pass("prune_weights", gm, (x,), options={"score": score})
        (w,) = _weights(run.gm).values()
        kept[score] = bool((w[:, :4] != 0).all())
        assert int((w != 0).sum()) == 32
    assert kept == {"wanda": True, "magnitude": False}


def test_near_misses_stay_dense_with_the_reason():
    torch.manual_seed(0)
    args = (torch.randn(2, 5, 32), torch.randn(2, 5, 30), torch.randn(16, 32))
    gm = capture_example(_NearMiss().eval(), args)
    run = run_pass("prune_weights", gm, args)
    assert run.result.counts == {"linears_masked": 2}  # fc, odd
    assert [(s.where, s.reason) for s in run.result.skipped] == [
        ("classifier", "in the skip list (output heads stay dense)")]
    assert bool((_weights(run.gm)["classifier.weight"] != 0).all())
    two_four = run_pass("prune_weights", gm, args, options={"pattern": "2:4"})
    assert two_four.result.counts == {"linears_masked": 1}  # fc only
    assert ("odd", "30 inputs are not a multiple of 4 (2:4 groups)") in \
        [(s.where, s.reason) for s in two_four.result.skipped]
    assert bool((_weights(two_four.gm)["odd.weight"] != 0).all())
    everything = run_pass("prune_weights", gm, args, options={"skip": []})
    assert everything.result.counts == {"linears_masked": 3}


def test_a_graph_with_nothing_to_prune_is_an_error():
    torch.manual_seed(0)
    args = (torch.randn(2, 5, 32), torch.randn(16, 32))
    gm = capture_example(WeightIsAnInput(), args)
    with pytest.raises(PassError, match=r"expected \['linears_masked'\] > 0") as e:
        run_pass("prune_weights", gm, args)
    assert isinstance(e.value.cause, ConfigError) and e.value.before == ["cleanup"]


def test_bad_options_are_named(blocks):
    gm, args = blocks
    with pytest.raises(ConfigError, match=r"sparsity must be in \(0, 1\)"):
        run_pass("prune_weights", gm, args, options={"sparsity": 1.0})
