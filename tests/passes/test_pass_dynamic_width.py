"""dynamic_width, one pass on small graphs: heads and neurons ordered (counts), no op added or
removed (a permutation of weights), exact at full width, and the units it must leave alone."""

from __future__ import annotations

import pytest
import torch

from optim.errors import ConfigError, PassError
from optim.ir import get_constant
from optim.testing import capture_example, capture_zoo, run_pass
from passes.common.linears import constant_linears, weight_and_bias


class _FusedQKV(torch.nn.Module):
    """One attention whose q, k and v come from a single projection (GPT-2's c_attn), with or
    without an MLP after it."""

    def __init__(self, mlp: bool):
        super().__init__()
        self.proj = torch.nn.Linear(16, 48)
        self.o = torch.nn.Linear(16, 16)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(),
                                       torch.nn.Linear(32, 16)) if mlp else None

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.proj(x).view(b, n, 3, 2, 8).permute(2, 0, 3, 1, 4)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        x = x + self.o(a.transpose(1, 2).reshape(b, n, 16))
        return x + self.mlp(x) if self.mlp is not None else x


def _weights(gm) -> dict[str, torch.Tensor]:
    return {weight_and_bias(n)[0].target: get_constant(gm, weight_and_bias(n)[0])
            for n in constant_linears(gm)}


@pytest.fixture(scope="module")
def bert():
    return capture_zoo("bert")


@pytest.fixture(scope="module")
def nested(bert):
    gm, z = bert
    return run_pass("dynamic_width", gm, z.example_args, z.example_kwargs)


@pytest.fixture(scope="module")
def fused(bert):
    gm, z = bert
    return run_pass("fuse_attention", gm, z.example_args, z.example_kwargs)


def test_prerequisites_are_inserted(nested):
    assert [r.name for r in nested.results] == ["cleanup", "fuse_attention", "dynamic_width"]


def test_counts_on_bert(nested):
    assert nested.result.counts == {"attention_heads_ordered": 2, "mlp_neurons_ordered": 2,
                                    "layers_nested": 2}
    assert nested.result.skipped == []
    layer = nested.result.details["plan"]["layers"][0]
    assert (layer["heads"]["heads"], layer["heads"]["head_dim"]) == (4, 16)
    assert layer["mlp"]["neurons"] == 128


def test_histogram_unchanged_by_the_permutation(nested, fused):
    assert nested.histogram_after == fused.histogram_after
    assert nested.result.changed


def test_weights_are_permuted_not_changed(nested, fused):
    before, after = _weights(fused.gm), _weights(nested.gm)
    assert before.keys() == after.keys()
    moved = [t for t in before if not torch.equal(before[t], after[t])]
    assert moved  # the ordering really moved rows/columns
    for t in before:  # ... and only moved them: the same values, in another order
        assert torch.equal(before[t].flatten().sort().values, after[t].flatten().sort().values)


def test_numerics_exact_at_full_width(nested):
    assert nested.max_abs_error() < 1e-4  # Exact(atol=1e-4); measured 4.8e-7
    assert nested.result.details["permutation_max_abs_error"] < 1e-5


def test_each_width_is_cheaper_and_keeps_a_prefix(nested):
    rows = nested.result.details["widths"]
    assert [r["width"] for r in rows] == [1.0, 0.75, 0.5, 0.25]
    flops = [r["flops_fraction"] for r in rows]
    assert flops[0] == 1.0 and flops == sorted(flops, reverse=True) and flops[-1] < 0.3
    assert [r["kept"][0] for r in rows] == [{"heads": h, "neurons": 32 * h} for h in (4, 3, 2, 1)]
    assert rows[0]["cosine"] == 1.0 and rows[-1]["cosine"] < 1.0


def test_mlp_only(bert, fused):
    gm, z = bert
    run = run_pass("dynamic_width", gm, z.example_args, z.example_kwargs,
                   options={"heads": False, "widths": [1.0, 0.5]})
    counts = run.result.counts
    assert counts["mlp_neurons_ordered"] == 2 and counts["layers_nested"] == 2
    assert counts.get("attention_heads_ordered", 0) == 0
    assert all("heads" not in la for la in run.result.details["plan"]["layers"])
    # q/k/v/o untouched: only the MLP weights moved
    before, after = _weights(fused.gm), _weights(run.gm)
    moved = {t for t in before if not torch.equal(before[t], after[t])}
    assert moved and all("intermediate" in t or "output.dense" in t for t in moved)
    assert not any("attention" in t for t in moved)
    assert run.max_abs_error() < 1e-4


def test_fused_qkv_heads_are_skipped_with_reason_mlp_still_nests():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 16)
    gm = capture_example(_FusedQKV(mlp=True).eval(), (x,))
    run = run_pass("dynamic_width", gm, (x,))
    assert run.result.counts.get("attention_heads_ordered", 0) == 0
    assert run.result.counts["mlp_neurons_ordered"] == 1
    assert run.result.counts["layers_nested"] == 1
    reasons = [s.reason for s in run.result.skipped]
    assert len(reasons) == 1 and reasons[0].startswith("no separate q projection (a fused q/k/v")
    assert run.max_abs_error() < 1e-5


def test_nothing_to_nest_is_an_error_with_the_reason():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 16)
    gm = capture_example(_FusedQKV(mlp=False).eval(), (x,))
    with pytest.raises(PassError) as err:  # expects=("layers_nested",)
        run_pass("dynamic_width", gm, (x,))
    assert err.value.before == ["cleanup", "fuse_attention"]
    assert isinstance(err.value.cause, ConfigError)
    assert "expected ['layers_nested'] > 0" in str(err.value)
    assert "no separate q projection" in str(err.value)


@pytest.mark.parametrize("options, match", [
    ({"widths": [1.5]}, r"widths must be numbers in \(0, 1\]"),
    ({"heads": False, "mlp": False}, "nothing to nest"),
])
def test_bad_options_are_config_errors(bert, options, match):
    gm, z = bert
    with pytest.raises(ConfigError, match=match):
        run_pass("dynamic_width", gm, z.example_args, z.example_kwargs, options=options)
