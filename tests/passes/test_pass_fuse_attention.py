"""fuse_attention, one pass on small graphs: SDPA and explicit chains fused, near-misses refused."""

from __future__ import annotations

import pytest
import torch

from optim.errors import ConfigError, PassError
from optim.testing import capture_example, capture_zoo, histogram_diff, run_pass
from tests.passes.small_models import MaskedAttention

ATTENTION = torch.ops.optim.attention.default


class _Block(torch.nn.Module):
    """One hand-written attention over 2 heads of 8, in a correct form or a near-miss."""

    def __init__(self, mode):
        super().__init__()
        self.mode = mode
        self.proj = torch.nn.Linear(16, 48)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.proj(x).view(b, n, 3, 2, 8).permute(2, 0, 3, 1, 4)
        s = q @ k.transpose(-2, -1)
        if self.mode == "explicit":
            return torch.softmax(s * 0.35, dim=-1) @ v
        if self.mode == "divided":
            return torch.softmax(s / 4.0, dim=-1) @ v
        if self.mode == "one_good_one_wrong":
            return torch.softmax(s * 0.35, dim=-1) @ v + torch.softmax(s, dim=-2) @ v
        if self.mode == "probs_returned":  # output_attentions-style: probs are used elsewhere
            p = torch.softmax(s * 0.35, dim=-1)
            return p @ v, p
        if self.mode == "wrong_axis":
            return torch.softmax(s, dim=-2) @ v
        if self.mode == "mask_before_scale":
            return torch.softmax((s + x.new_zeros(n, n)) * 0.35, dim=-1) @ v
        if self.mode == "scale_from_data":
            return torch.softmax(s * x.abs().mean(), dim=-1) @ v
        if self.mode == "classifier_softmax":
            return torch.softmax(self.proj(x), dim=-1)
        raise ValueError(self.mode)


def _hand(mode, seq=5):
    torch.manual_seed(0)
    x = torch.randn(2, seq, 16)
    return capture_example(_Block(mode).eval(), (x,), {}), (x,)


@pytest.fixture(scope="module")
def bert():
    return capture_zoo("bert")


@pytest.fixture(scope="module")
def gpt2():
    return capture_zoo("gpt2")


def test_sdpa_fused_on_bert(bert):
    gm, z = bert
    run = run_pass("fuse_attention", gm, z.example_args, z.example_kwargs)
    assert [r.name for r in run.results] == ["cleanup", "fuse_attention"]
    assert run.result.counts == {"attention_fused": 2}  # bert's padding mask is kept
    assert run.result.skipped == []
    info = run.result.details["attentions"]
    assert [a["form"] for a in info] == ["sdpa", "sdpa"]
    assert (info[0]["heads"], info[0]["head_dim"], info[0]["k_len"]) == (4, 16, 16)
    assert info[0]["scale"] == pytest.approx(0.25) and info[0]["mask"] == [2, 1, 16, 16]
    # the fused op is the only change on top of cleanup's
    cleaned = run.results[0]
    assert cleaned.name == "cleanup" and cleaned.changed
    after_cleanup = run_pass("cleanup", gm, z.example_args, z.example_kwargs).histogram_after
    assert histogram_diff(after_cleanup, run.histogram_after) == {
        "aten.scaled_dot_product_attention": -2, "optim.attention": 2}
    assert run.max_abs_error() < 1e-4


def test_explicit_chain_fused_on_gpt2(gpt2):
    gm, z = gpt2
    run = run_pass("fuse_attention", gm, z.example_args, z.example_kwargs)
    assert run.result.counts == {"attention_fused": 2}
    info = run.result.details["attentions"]
    assert [a["form"] for a in info] == ["explicit", "explicit"]
    assert info[0]["scale"] == pytest.approx(0.25) and info[0]["causal"] is False
    assert info[0]["mask"] == [2, 1, 16, 16]  # GPT-2's float causal mask rides along
    after = run.histogram_after
    assert after["optim.attention"] == 2
    assert "aten.softmax" not in after and "aten.matmul" not in after
    after_cleanup = run_pass("cleanup", gm, z.example_args, z.example_kwargs).histogram_after
    added = histogram_diff(after_cleanup, after)
    assert added["aten.softmax"] == -2 and added["aten.matmul"] == -4
    assert added["optim.attention"] == 2
    assert run.max_abs_error() < 1e-4


@pytest.mark.parametrize("mode, scale", [("explicit", 0.35), ("divided", 0.25)])
def test_hand_written_attention_fused_with_its_scale(mode, scale):
    gm, args = _hand(mode)
    run = run_pass("fuse_attention", gm, args)
    assert run.result.counts == {"attention_fused": 1}
    info, = run.result.details["attentions"]
    assert (info["heads"], info["head_dim"], info["mask"]) == (2, 8, None)
    assert info["scale"] == pytest.approx(scale, abs=1e-6)
    assert run.ops_added()["optim.attention"] == 1 and "aten.softmax" not in run.histogram_after
    assert run.max_abs_error() < 1e-5


def test_one_near_miss_next_to_a_match_is_skipped_with_reason():
    gm, args = _hand("one_good_one_wrong")
    run = run_pass("fuse_attention", gm, args)
    assert run.result.counts == {"attention_fused": 1}
    assert [s.reason for s in run.result.skipped] == ["softmax over dim -2, not the key axis"]
    assert run.histogram_after["aten.softmax"] == 1 and run.histogram_after["optim.attention"] == 1
    assert run.max_abs_error() < 1e-5


@pytest.mark.parametrize("mode, reason", [
    ("probs_returned", "not consumed only by matmul(probs, v)"),
    ("wrong_axis", "not the key axis"),
    ("mask_before_scale", "mask is added before the scale"),
    ("scale_from_data", "scaled by a non-constant"),
    ("classifier_softmax", "softmax output is not consumed only by matmul"),
])
def test_near_misses_raise_with_the_reason(mode, reason):
    gm, args = _hand(mode)
    with pytest.raises(PassError) as err:  # run_pass expects a match (expect=True)
        run_pass("fuse_attention", gm, args)
    assert err.value.pass_name == "fuse_attention" and err.value.before == ["cleanup"]
    assert isinstance(err.value.cause, ConfigError)
    assert "expected ['attention_fused'] > 0" in str(err.value) and reason in str(err.value)


def test_matching_nothing_is_recorded_with_the_reason_unless_expected():
    gm, args = _hand("wrong_axis")
    run = run_pass("fuse_attention", gm, args, expect=False)  # as a pipeline runs it
    assert run.result.counts == {} and run.max_abs_error() == 0
    assert "not the key axis" in run.result.details["matched_nothing"]["reasons"]


def test_min_seq_len_is_a_strict_lower_bound():
    gm, args = _hand("explicit", seq=5)
    run = run_pass("fuse_attention", gm, args, options={"min_seq_len": 5})
    assert run.result.counts == {"attention_fused": 1}
    with pytest.raises(PassError, match="5 key positions < min_seq_len 6"):
        run_pass("fuse_attention", gm, args, options={"min_seq_len": 6})


def test_constant_all_true_mask_is_dropped_but_a_real_one_kept():
    torch.manual_seed(0)
    x = torch.randn(1, 6, 16)
    everything = capture_example(MaskedAttention(torch.ones(6, 6, dtype=torch.bool)).eval(), (x,))
    run = run_pass("fuse_attention", everything, (x,))
    assert run.result.counts == {"attention_fused": 1, "no_op_mask_dropped": 1}
    attn, = [n for n in run.gm.graph.nodes if n.target is ATTENTION]
    assert attn.args[3] is None
    assert run.max_abs_error() < 1e-5
    band = (torch.arange(6)[:, None] - torch.arange(6)).abs() <= 1
    banded = capture_example(MaskedAttention(band).eval(), (x,))
    run = run_pass("fuse_attention", banded, (x,))
    assert run.result.counts == {"attention_fused": 1}  # no no_op_mask_dropped
    attn, = [n for n in run.gm.graph.nodes if n.target is ATTENTION]
    assert attn.args[3] is not None
    assert run.max_abs_error() < 1e-5


def test_input_dependent_mask_is_never_dropped(bert):
    gm, z = bert
    run = run_pass("fuse_attention", gm, z.example_args, z.example_kwargs)
    assert "no_op_mask_dropped" not in run.result.counts
    assert all(n.args[3] is not None for n in run.gm.graph.nodes if n.target is ATTENTION)


def test_unknown_option_is_a_config_error(bert):
    gm, z = bert
    with pytest.raises(ConfigError, match="Did you mean 'min_seq_len'"):
        run_pass("fuse_attention", gm, z.example_args, z.example_kwargs,
                 options={"min_seq": 4})
