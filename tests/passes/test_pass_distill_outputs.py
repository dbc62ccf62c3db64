"""distill_outputs, one pass on a small graph (a few Adam steps): trained weights are counted,
no op changes, the held-out error falls and sparsity masks keep their zeros; with nothing to
recover, no linears, one batch or no teacher it changes nothing and says why.

`run_pass` records the teacher from the graph it is given, so there the graph already matches
its teacher; the recovery tests give the pass a damaged graph and the undamaged graph's outputs
as the teacher through a PassContext of their own."""

from __future__ import annotations

import copy

import pytest
import torch

from optim import numerics, zoo
from optim.errors import ConfigError
from optim.ir import get_constant, op_histogram, replace_constant
from optim.pass_base import PassContext
from optim.registry import PASSES
from optim.targets import resolve_target
from optim.testing import capture_example, run_pass
from passes.common.graph_runner import output_error
from passes.common.graph_runner import run as run_graph
from passes.common.linears import constant_linears, weight_and_bias

# measured on this ViT, half of every weight zeroed: held-out error 0.33 -> 0.15, kept
TRAIN = {"steps": 20, "lr": 1e-3}


def _batches(x: torch.Tensor, n: int, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [((torch.randn(x.shape, generator=g),), {}) for _ in range(n)]


def _pruned(gm):
    """`gm` with the smaller half of every linear weight set to zero (a sparsity mask)."""
    out = copy.deepcopy(gm)
    for n in constant_linears(out):
        w_node, _ = weight_and_bias(n)
        w = get_constant(out, w_node)
        cut = w.abs().flatten().kthvalue(w.numel() // 2).values
        replace_constant(out, w_node, torch.where(w.abs() > cut, w, torch.zeros_like(w)))
    return out


def _distill(student, teacher_gm, batches, options):
    """Run the pass alone on a copy of `student`, the teacher being `teacher_gm`'s outputs."""
    spec = PASSES.get("distill_outputs")
    gm = copy.deepcopy(student)
    ctx = PassContext(target=resolve_target("xeon-spr"), example_inputs=batches[0],
                      calibration=batches)
    with torch.no_grad():
        ctx.teacher = {id(b): run_graph(teacher_gm, b) for b in batches}
        result = spec.run(gm, spec.make_config(options), ctx)
    return gm, result, ctx


class _NoLinears(torch.nn.Module):
    def forward(self, x):
        return torch.relu(x) * 2.0 + x.mean(-1, keepdim=True)


@pytest.fixture(scope="module")
def vit():
    z = zoo.load("vit")
    gm = capture_example(z.model, z.example_args, z.example_kwargs)
    gm.graph.eliminate_dead_code()  # so histograms compare what the pass did, not dead code
    gm.recompile()
    return gm, z


@pytest.fixture(scope="module")
def batches(vit):
    _, z = vit
    return _batches(z.example_args[0], 4)


@pytest.fixture(scope="module")
def recovered(vit, batches):
    gm, _ = vit
    student = _pruned(gm)
    out, result, ctx = _distill(student, gm, batches, TRAIN)
    return student, out, result, ctx


def test_counts_every_linear_weight_and_bias(recovered):
    _, _, result, _ = recovered
    assert result.name == "distill_outputs" and result.changed
    assert result.counts == {"weights_trained": 26}  # 13 linears, weight and bias each
    assert result.skipped == []
    d = result.details
    assert d["kept"] and (d["train_batches"], d["held_out_batches"]) == (3, 1)


def test_histogram_unchanged_only_values_move(recovered):
    student, out, _, _ = recovered
    assert op_histogram(out) == op_histogram(student)
    changed = [n for n in constant_linears(out)
               if not torch.equal(get_constant(out, weight_and_bias(n)[0]),
                                  get_constant(student, weight_and_bias(n)[0]))]
    assert len(changed) == 13


def test_held_out_error_falls_and_is_what_the_graph_has(recovered, batches):
    _, out, result, ctx = recovered
    d = result.details
    assert d["relative_error_after"] < 0.7 * d["relative_error_before"]
    held = batches[3:]
    assert output_error(out, held, [ctx.teacher[id(b)] for b in held]) == \
        pytest.approx(d["relative_error_after"], rel=1e-3)


def test_numerics_closer_to_the_teacher(recovered, batches):
    # contract floor is cosine_min >= 0.0 (the pass repairs others' damage); here it must
    # improve on the damaged graph on the held-out batch
    student, out, _, ctx = recovered
    held = batches[3]
    ref = ctx.teacher[id(held)]
    with torch.no_grad():
        cos_before = numerics.compare(ref, run_graph(student, held))["cosine_min"]
        cos_after = numerics.compare(ref, run_graph(out, held))["cosine_min"]
    assert cos_after > cos_before


def test_sparsity_masks_keep_their_zeros(recovered):
    student, out, _, _ = recovered
    for n in constant_linears(out):
        w_node, _ = weight_and_bias(n)
        was, now = get_constant(student, w_node), get_constant(out, w_node)
        assert torch.equal(now == 0, was == 0)
        assert not torch.equal(now, was)


def test_nothing_to_recover_leaves_the_graph_exact(vit, batches):
    gm, z = vit  # run_pass: the teacher is this very graph, so training cannot help
    run = run_pass("distill_outputs", gm, z.example_args, options={"steps": 5, "lr": 1e-3},
                   calibration=batches)
    assert [r.name for r in run.results] == ["distill_outputs"]  # no prerequisites
    assert not run.result.changed and run.result.counts == {}
    assert not run.result.details["kept"] and run.result.details["relative_error_before"] == 0
    skip, = run.result.skipped
    assert skip.where == "weights" and skip.reason.startswith(
        "training did not lower the held-out output error; the weights are unchanged")
    assert run.max_abs_error() == 0.0
    assert run.histogram_after == run.histogram_before


def test_one_batch_is_flagged(vit, batches):
    gm, _ = vit
    _, result, _ = _distill(_pruned(gm), gm, batches[:1], {"steps": 2, "lr": 1e-3})
    reasons = {s.where: s.reason for s in result.skipped}
    assert reasons["calibration"].startswith("only one calibration batch")
    # the one batch is both trained on and measured on
    assert (result.details["train_batches"], result.details["held_out_batches"]) == (1, 1)


def test_graph_without_linears_is_skipped():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8)
    gm = capture_example(_NoLinears().eval(), (x,))
    run = run_pass("distill_outputs", gm, (x,), options={"steps": 2})
    assert not run.result.changed and run.result.counts == {}
    assert [(s.where, s.reason) for s in run.result.skipped] == \
        [("graph", "no float linear with constant weights left to train")]
    assert run.max_abs_error() == 0.0


def test_without_a_teacher_it_says_how_to_run_it(vit):
    gm, z = vit
    spec = PASSES.get("distill_outputs")
    ctx = PassContext(target=resolve_target("xeon-spr"), example_inputs=(z.example_args, {}))
    with pytest.raises(ConfigError, match="run it through optim.optimize or a pipeline file"):
        spec.run(copy.deepcopy(gm), spec.make_config({"steps": 1}), ctx)


@pytest.mark.parametrize("options, match", [
    ({"steps": 0}, "steps must be >= 1"),
    ({"lr": 0.0}, r"lr must be in \(0, 1\)"),
    ({"step": 3}, "Did you mean 'steps'"),
])
def test_bad_options_are_config_errors(vit, options, match):
    gm, z = vit
    with pytest.raises(ConfigError, match=match):
        run_pass("distill_outputs", gm, z.example_args, options=options)
