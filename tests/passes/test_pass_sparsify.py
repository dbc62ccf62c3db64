"""sparsify (structured), one pass on small graphs: counts of heads and neurons removed, weights
that really shrink (and no op added), a fidelity floor, least-squares reconstruction, the
attentions and MLPs it must leave whole (with the reason), and its options."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from optim import numerics
from optim.errors import ConfigError, PassError
from optim.ir import get_constant
from optim.testing import capture_example, capture_zoo, run_pass


class _FusedQkv(torch.nn.Module):
    """A pre-norm block whose q, k and v come from one projection (as GPT-2's c_attn), after an
    MLP that no attention precedes."""

    def __init__(self):
        super().__init__()
        self.pre_up, self.pre_down = torch.nn.Linear(32, 64), torch.nn.Linear(64, 32)
        self.norm = torch.nn.LayerNorm(32)
        self.qkv, self.o = torch.nn.Linear(32, 96), torch.nn.Linear(32, 32)
        self.up, self.down = torch.nn.Linear(32, 64), torch.nn.Linear(64, 32)

    def forward(self, x):
        b, n, _ = x.shape
        x = x + self.pre_down(F.gelu(self.pre_up(x)))
        q, k, v = self.qkv(self.norm(x)).view(b, n, 3, 4, 8).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)
        x = x + self.o(a.transpose(1, 2).reshape(b, n, 32))
        return x + self.down(F.gelu(self.up(x)))


class _NoAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(32, 64), torch.nn.Linear(64, 32)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(x)))


def _weight(gm, module: str, kind: str = "weight") -> torch.Tensor:
    """The (possibly renamed) constant `kind` of `module` ("encoder.layer.0.intermediate.dense")."""
    flat = f"{module}.{kind}".replace(".", "_")
    (hit,) = [n for n in gm.graph.nodes if n.op == "get_attr"
              and (n.target == f"{module}.{kind}" or n.target.startswith(flat + "_w")
                   or n.target == flat)]
    return get_constant(gm, hit)


@pytest.fixture(scope="module")
def bert():
    return capture_zoo("bert")  # 2 layers, 4 heads of 16, 128 MLP neurons


@pytest.fixture(scope="module")
def half(bert):
    gm, z = bert
    return run_pass("sparsify", gm, z.example_args, z.example_kwargs,
                    options={"sparsity": 0.5, "reconstruct": False})


@pytest.fixture(scope="module")
def fused_qkv():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 32)
    return capture_example(_FusedQkv().eval(), (x,)), (x,)


def test_counts_on_bert(half):
    assert [r.name for r in half.results] == ["cleanup", "fuse_attention", "sparsify"]
    assert half.result.counts == {"layers_pruned": 2, "heads_removed": 4, "neurons_removed": 128}
    assert half.result.skipped == []
    assert [(x["heads"], x["neurons"]) for x in half.result.details["layers"]] == \
        [("2/4", "64/128")] * 2
    assert half.result.details["sparsity"] == 0.5
    assert 0.45 < half.result.details["flops_fraction"] < 0.6  # measured 0.51


def test_default_sparsity_counts(bert):
    gm, z = bert
    run = run_pass("sparsify", gm, z.example_args, z.example_kwargs)  # sparsity 0.3
    assert run.result.counts == {"layers_pruned": 2, "heads_removed": 2, "neurons_removed": 76}
    assert [(x["heads"], x["neurons"]) for x in run.result.details["layers"]] == \
        [("3/4", "90/128")] * 2


def test_tensors_really_shrink(bert, half):
    gm, _ = bert
    for i in (0, 1):
        layer = f"encoder.layer.{i}"
        for p in ("query", "key", "value"):  # 2 heads of 16 kept: 32 rows
            assert _weight(half.gm, f"{layer}.attention.self.{p}").shape == (32, 64)
            assert _weight(half.gm, f"{layer}.attention.self.{p}", "bias").shape == (32,)
        assert _weight(half.gm, f"{layer}.attention.output.dense").shape == (64, 32)
        assert _weight(half.gm, f"{layer}.intermediate.dense").shape == (64, 64)
        assert _weight(half.gm, f"{layer}.intermediate.dense", "bias").shape == (64,)
        assert _weight(half.gm, f"{layer}.output.dense").shape == (64, 64)
        assert _weight(gm, f"{layer}.intermediate.dense").shape == (128, 64)  # captured: intact
    params = sum(get_constant(half.gm, n).numel() for n in half.gm.graph.nodes
                 if n.op == "get_attr")
    params_before = sum(get_constant(gm, n).numel() for n in gm.graph.nodes if n.op == "get_attr")
    # 2 layers x (3 x 32 x 64 + 64 x 32 + 2 x 64 x 64 + biases) fewer
    assert params_before - params == 2 * (3 * (32 * 64 + 32) + 64 * 32 + 2 * 64 * 64 + 64)


def test_no_op_is_added_or_removed(bert, half):
    gm, z = bert
    fused = run_pass("fuse_attention", gm, z.example_args, z.example_kwargs)
    assert half.histogram_after == fused.histogram_after  # only tensors and reshape sizes change
    assert half.ops_added()["optim.attention"] == 2  # from the fuse_attention prerequisite
    attn = [n for n in half.gm.graph.nodes if n.target is torch.ops.optim.attention.default]
    assert all(n.args[0].meta["val"].shape[1] == 2 for n in attn)  # 2 query heads left


def test_numerics_floor(half):
    # contract: cosine_min >= 0.8; measured on BERT at 50%: 34.2 dB, cosine_min 0.9997
    assert [t.shape for t in half.after] == [t.shape for t in half.before]
    assert 28.0 <= half.sqnr_db() < 60.0 and half.max_abs_error() > 1e-4
    assert numerics.compare(half.before, half.after)["cosine_min"] >= 0.99


def test_reconstruction_refits_on_enough_calibration_data(bert, half):
    gm, z = bert
    g = torch.Generator().manual_seed(1)
    calib = [((), {"input_ids": torch.randint(0, 1000, (2, 16), generator=g),
                   "attention_mask": torch.ones(2, 16, dtype=torch.long)}) for _ in range(8)]
    run = run_pass("sparsify", gm, z.example_args, z.example_kwargs,
                   options={"sparsity": 0.5}, calibration=calib)
    assert run.result.counts == half.result.counts
    for layer in run.result.details["layers"]:
        for kind in ("heads", "neurons"):
            assert layer[f"{kind}_relative_error"] < 0.5 * layer[f"{kind}_relative_error_unfitted"]
    # the example is not in the calibration data: held out, and closer than without the refit
    assert run.sqnr_db() > half.sqnr_db() + 3.0  # measured 40.6 vs 34.2 dB


def test_too_little_calibration_data_is_said(bert):
    gm, z = bert
    run = run_pass("sparsify", gm, z.example_args, z.example_kwargs, options={"sparsity": 0.5})
    # the example alone: 32 rows, fewer than twice the 65 unknowns per output of the MLP fit
    layer = run.result.details["layers"][0]
    assert layer["neurons_note"] == ("not refitted: 32 calibration rows for 65 unknowns per "
                                     "output (give more calibration data)")
    assert "neurons_relative_error" not in layer


@pytest.mark.parametrize("option,counts,query_rows,neurons", [
    ("heads", {"layers_pruned": 2, "neurons_removed": 128}, 64, 64),
    ("mlp", {"layers_pruned": 2, "heads_removed": 4}, 32, 128),
])
def test_heads_or_mlp_can_be_left_whole(bert, option, counts, query_rows, neurons):
    gm, z = bert
    run = run_pass("sparsify", gm, z.example_args, z.example_kwargs,
                   options={"sparsity": 0.5, "reconstruct": False, option: False})
    assert run.result.counts == counts
    assert _weight(run.gm, "encoder.layer.0.attention.self.query").shape[0] == query_rows
    assert _weight(run.gm, "encoder.layer.0.intermediate.dense").shape[0] == neurons


def test_flops_budget_is_met(bert):
    gm, z = bert
    run = run_pass("sparsify", gm, z.example_args, z.example_kwargs,
                   options={"flops": 0.75, "reconstruct": False})
    # the uniform sparsity found by bisection (0.266): 3 of 4 heads, 94 of 128 neurons
    assert 0.7 <= run.result.details["flops_fraction"] <= 0.75  # measured 0.748
    assert 0.2 < run.result.details["sparsity"] < 0.3
    assert run.result.counts == {"layers_pruned": 2, "heads_removed": 2, "neurons_removed": 68}


def test_fused_qkv_keeps_its_heads_with_the_reason(fused_qkv):
    gm, args = fused_qkv
    run = run_pass("sparsify", gm, args)
    assert run.result.counts == {"layers_pruned": 1, "neurons_removed": 19}
    reasons = {s.where: s.reason for s in run.result.skipped}
    assert reasons["pre_down"] == ("MLP outside a transformer block (no attention right "
                                   "before it); it stays whole")
    assert any("fused q/k/v projection" in r for r in reasons.values())
    shapes = {n.target: tuple(get_constant(run.gm, n).shape) for n in run.gm.graph.nodes
              if n.op == "get_attr"}
    assert shapes["qkv.weight"] == (96, 32) and shapes["pre_up.weight"] == (64, 32)
    assert sorted(s for k, s in shapes.items() if k.startswith("up_weight")) == [(45, 32)]


def test_heads_only_on_fused_qkv_is_an_error(fused_qkv):
    gm, args = fused_qkv
    with pytest.raises(PassError, match=r"expected \['layers_pruned'\] > 0.*"
                                        r"fused q/k/v projection") as e:
        run_pass("sparsify", gm, args, options={"mlp": False})
    assert isinstance(e.value.cause, ConfigError)
    assert e.value.before == ["cleanup", "fuse_attention"]


def test_a_graph_without_attention_fails_in_sparsify_not_its_prerequisite():
    """The inserted fuse_attention finding nothing is recorded; sparsify, asked for by name,
    is the one that fails."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 32)
    gm = capture_example(_NoAttention().eval(), (x,))
    with pytest.raises(PassError, match="layers_pruned") as e:
        run_pass("sparsify", gm, (x,))
    assert e.value.pass_name == "sparsify" and e.value.before == ["cleanup", "fuse_attention"]


def test_bad_options_are_named(fused_qkv):
    gm, args = fused_qkv
    with pytest.raises(ConfigError, match=r"sparsity must be in \[0, 1\)"):
        run_pass("sparsify", gm, args, options={"sparsity": 1.0})
    with pytest.raises(ConfigError, match="nothing to prune"):
        run_pass("sparsify", gm, args, options={"heads": False, "mlp": False})
