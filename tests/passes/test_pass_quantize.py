"""quantize (int8), one pass on small graphs: counts, the int8 ops it adds, a fidelity floor, the
linears it must leave float (with the reason), and the options that change what it does."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from optim.errors import ConfigError, PassError
from optim.ir import get_constant
from optim.testing import capture_example, capture_zoo, run_pass
from tests.passes.small_models import FfnBlocks, WeightIsAnInput

INT8 = torch.ops.optim.linear_int8.default


class _NearMiss(torch.nn.Module):
    """One quantizable linear next to three it must leave float, each for its own reason."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(32, 32)  # quantized
        self.tiny = torch.nn.Linear(8, 32)  # 8 input features < min_features 16
        self.head = torch.nn.Linear(32, 4)  # output head: in the default skip list

    def forward(self, x, w, s):
        g = F.linear(self.fc(x), w)  # the weight is a graph input, not a constant
        return self.head(g + self.tiny(s))


def _int8_nodes(gm):
    return [n for n in gm.graph.nodes if n.target is INT8]


@pytest.fixture(scope="module")
def bert():
    return capture_zoo("bert")  # 2 post-norm layers, 6 linears each, hidden 64


@pytest.fixture(scope="module")
def quantized(bert):
    gm, z = bert
    return run_pass("quantize", gm, z.example_args, z.example_kwargs)


@pytest.fixture(scope="module")
def stack():
    torch.manual_seed(0)
    model, x = FfnBlocks(residual=False).eval(), torch.randn(4, 16, 64)
    return capture_example(model, (x,)), (x,)


@pytest.fixture(scope="module")
def near_miss():
    torch.manual_seed(0)
    args = (torch.randn(2, 5, 32), torch.randn(32, 32), torch.randn(2, 5, 8))
    return capture_example(_NearMiss().eval(), args), args


def test_counts_on_bert(quantized):
    assert [r.name for r in quantized.results] == ["cleanup", "quantize"]
    # 12 linears; BERT is post-norm (every LayerNorm output also feeds a residual), so no
    # smoothing folds into a norm: one x / s per input tensor (q/k/v share one), 4 per layer
    assert quantized.result.counts == {"linear_quantized": 12, "input_smoothed": 8}
    assert quantized.result.changed and quantized.result.skipped == []


def test_histogram_swaps_every_linear_for_an_int8_one(bert, quantized):
    gm, z = bert
    assert quantized.ops_added()["optim.linear_int8"] == 12
    assert quantized.ops_added()["aten.linear"] == -12
    assert "aten.linear" not in quantized.histogram_after
    # against the graph cleanup alone leaves: nothing but the swap (smoothing adds no op, the
    # kernel takes 1/s as an argument)
    clean = run_pass("cleanup", gm, z.example_args, z.example_kwargs)
    diff = {k: quantized.histogram_after.get(k, 0) - clean.histogram_after.get(k, 0)
            for k in set(quantized.histogram_after) | set(clean.histogram_after)}
    assert {k: v for k, v in diff.items() if v} == {"aten.linear": -12, "optim.linear_int8": 12}


def test_weights_are_7_bit_per_channel_by_default(quantized):
    nodes = _int8_nodes(quantized.gm)
    assert len(nodes) == 12
    for n in nodes:
        w_q, w_s = get_constant(quantized.gm, n.args[1]), get_constant(quantized.gm, n.args[2])
        assert w_q.dtype == torch.int8 and w_s.dtype == torch.float32
        assert w_s.shape == (w_q.shape[0],)  # one scale per output channel
        assert (w_q.abs().amax(1) == 63).all()  # every row reaches ±63: symmetric per channel
        assert n.args[4] is not None and n.args[5] is None  # smoothed input; dynamic activations


def test_numerics_floor(stack, quantized):
    gm, args = stack
    run = run_pass("quantize", gm, args)
    # contract: sqnr_db >= 15; int8 with per-token activations measured 33.3 dB here
    assert 28.0 <= run.sqnr_db() < 60.0  # lossy, and not a no-op
    assert run.max_abs_error() > 0
    assert run.result.details["sqnr_db_min"] >= 30.0  # per layer on the calibration rows
    # BERT: the residual stream keeps end to end SQNR high (64 dB); per layer 36-39 dB
    assert quantized.sqnr_db() >= 45.0
    assert quantized.result.details["sqnr_db_min"] >= 33.0


def test_smoothing_folds_into_a_norm_only_these_linears_read(stack):
    gm, args = stack
    run = run_pass("quantize", gm, args)
    # pre-norm: each `up` reads a LayerNorm nothing else reads (folded into γ, β); each `down`
    # reads gelu (applied by the kernel)
    assert run.result.counts == {"linear_quantized": 4, "smoothing_folded_into_norm": 2,
                                 "input_smoothed": 2}
    assert sum("norm_smoothed" in n.target for n in run.gm.graph.nodes if n.op == "get_attr") == 4
    off = run_pass("quantize", gm, args, options={"smooth_alpha": 0.0})
    assert off.result.counts == {"linear_quantized": 4}
    assert all(n.args[4] is None for n in _int8_nodes(off.gm))


def test_weight_bits_8_uses_the_full_range_and_gains_fidelity(stack):
    gm, args = stack
    seven = run_pass("quantize", gm, args)
    eight = run_pass("quantize", gm, args, options={"weight_bits": 8})
    for n in _int8_nodes(eight.gm):
        assert (get_constant(eight.gm, n.args[1]).abs().amax(1) == 127).all()
    assert eight.sqnr_db() > seven.sqnr_db() + 1.5  # measured 36.1 vs 33.3 dB


def test_skip_keeps_the_named_layers_float(bert):
    gm, z = bert
    run = run_pass("quantize", gm, z.example_args, z.example_kwargs,
                   options={"skip": ["query"]})
    assert run.result.counts == {"linear_quantized": 10, "input_smoothed": 8}
    assert [(s.where, s.reason) for s in run.result.skipped] == [
        (f"encoder.layer.{i}.attention.self.query",
         "output head / excluded layer (matches skip pattern 'query')") for i in (0, 1)]
    assert run.histogram_after["aten.linear"] == 2


def test_min_sqnr_db_keeps_the_worst_layers_float(bert, quantized):
    gm, z = bert
    measured = sorted(x["sqnr_db"] for x in quantized.result.details["layers"])
    floor = (measured[5] + measured[6]) / 2  # between the 6th and 7th best layer
    run = run_pass("quantize", gm, z.example_args, z.example_kwargs,
                   options={"min_sqnr_db": floor})
    assert run.result.counts["linear_quantized"] == 6
    assert len(run.result.skipped) == 6
    assert all(f"< min_sqnr_db {floor:g}" in s.reason and s.reason.startswith("calibrated SQNR")
               for s in run.result.skipped)
    assert run.histogram_after["aten.linear"] == 6


def test_static_activations_get_one_calibrated_scale_per_layer(bert):
    gm, z = bert
    run = run_pass("quantize", gm, z.example_args, z.example_kwargs,
                   options={"activations": "static"})
    nodes = _int8_nodes(run.gm)
    assert len(nodes) == 12
    scales = [get_constant(run.gm, n.args[5]) for n in nodes]
    assert all(s is not None and s.dim() == 0 and float(s) > 0 for s in scales)


def test_near_misses_stay_float_with_the_reason(near_miss):
    gm, args = near_miss
    run = run_pass("quantize", gm, args)
    assert run.result.counts == {"linear_quantized": 1, "input_smoothed": 1}
    reasons = {s.reason: s.where for s in run.result.skipped}
    assert set(reasons) == {"weight is not a constant", "8 input features < min_features 16",
                            "output head / excluded layer (matches skip pattern 'head')"}
    assert reasons["8 input features < min_features 16"] == "tiny"
    assert reasons["output head / excluded layer (matches skip pattern 'head')"] == "head"
    assert run.histogram_after["aten.linear"] == 3 and run.histogram_after["optim.linear_int8"] == 1
    lower = run_pass("quantize", gm, args, options={"min_features": 8})
    assert lower.result.counts["linear_quantized"] == 2  # `tiny` too


def test_a_graph_with_nothing_to_quantize_is_an_error():
    torch.manual_seed(0)
    args = (torch.randn(2, 5, 32), torch.randn(16, 32))
    gm = capture_example(WeightIsAnInput(), args)
    with pytest.raises(PassError, match=r"expected \['linear_quantized'\] > 0") as e:
        run_pass("quantize", gm, args)
    assert "weight is not a constant" in str(e.value)
    assert isinstance(e.value.cause, ConfigError) and e.value.before == ["cleanup"]


def test_bad_options_are_named(stack):
    gm, args = stack
    with pytest.raises(ConfigError, match="weight_bits must be 7 or 8"):
        run_pass("quantize", gm, args, options={"weight_bits": 4})
