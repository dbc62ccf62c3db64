"""merge_tokens (ToMe), one pass on small graphs: counts and token counts per block, the merge ops
it adds, a fidelity floor, and the attentions and graphs it must refuse."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from optim import numerics
from optim.errors import ConfigError, PassError
from optim.testing import capture_example, capture_zoo, histogram_diff, run_pass

MERGE = torch.ops.optim.merge_tokens.default
ATTENTION = torch.ops.optim.attention.default


class _Block(torch.nn.Module):
    """A pre-norm transformer block whose attention is causal, padded, or cross-attention."""

    def __init__(self, mode):
        super().__init__()
        self.mode = mode
        self.norm = torch.nn.LayerNorm(16)
        self.q, self.k, self.v = (torch.nn.Linear(16, 16) for _ in range(3))
        self.o = torch.nn.Linear(16, 16)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(),
                                       torch.nn.Linear(32, 16))

    def forward(self, x, keep=None, context=None):
        b, n, _ = x.shape
        h = self.norm(x)
        kv = h if context is None else context
        q = self.q(h).view(b, n, 2, 8).transpose(1, 2)
        k = self.k(kv).view(b, kv.shape[1], 2, 8).transpose(1, 2)
        v = self.v(kv).view(b, kv.shape[1], 2, 8).transpose(1, 2)
        mask = None if keep is None else keep[:, None, None, :].bool()
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           is_causal=self.mode == "causal")
        x = x + self.o(a.transpose(1, 2).reshape(b, n, 16))
        return x + self.mlp(x)


def _block_inputs(mode):
    torch.manual_seed(0)
    x = torch.randn(2, 8, 16)
    if mode == "padding":
        keep = torch.ones(2, 8, dtype=torch.long)
        keep[1, 5:] = 0
        return (x,), {"keep": keep}
    if mode == "cross":
        return (x,), {"context": torch.randn(2, 5, 16)}
    return (x,), {}


@pytest.fixture(scope="module")
def vit():
    return capture_zoo("vit")  # 16 patches + CLS, 2 blocks


@pytest.fixture(scope="module")
def merged(vit):
    gm, z = vit
    return run_pass("merge_tokens", gm, z.example_args, options={"r": 4, "gate": False})


def test_prerequisites_are_inserted(merged):
    assert [r.name for r in merged.results] == ["cleanup", "fuse_attention", "merge_tokens"]


def test_counts_and_tokens_per_block(merged):
    res = merged.result
    assert res.counts == {"blocks_merged": 2, "tokens_merged": 8}
    assert res.details["mode"] == "merge" and "fallback" not in res.details
    assert [(b["tokens_in"], b["r"], b["tokens_out"]) for b in res.details["blocks"]] == \
        [(17, 4, 13), (13, 4, 9)]
    merges = [n for n in merged.gm.graph.nodes if n.target is MERGE]
    assert [n.args[3:] for n in merges] == [(4, 1), (4, 1)]  # r, and the CLS token protected


def test_histogram_adds_merges_and_the_proportional_bias(vit, merged):
    gm, z = vit
    fused = run_pass("fuse_attention", gm, z.example_args)
    added = histogram_diff(fused.histogram_after, merged.histogram_after)
    assert added["optim.merge_tokens"] == 2
    assert added["aten.log"] == 1  # log(size) added to the scores of the second block only
    assert "optim.unmerge_tokens" not in merged.histogram_after
    assert merged.histogram_after["optim.attention"] == 2
    attns = [n for n in merged.gm.graph.nodes if n.target is ATTENTION]
    assert attns[0].args[3] is None and attns[1].args[3] is not None


def test_numerics_floor(merged):
    # contract: cosine_min >= 0.9 on the zoo's models; r=4 of 17 on this ViT measured 0.994
    assert [t.shape for t in merged.after] == [t.shape for t in merged.before]
    assert numerics.compare(merged.before, merged.after)["cosine_min"] >= 0.97
    assert merged.max_abs_error() > 1e-5  # lossy: tokens really were averaged


def test_schedule_and_no_proportional_attention(vit):
    gm, z = vit
    run = run_pass("merge_tokens", gm, z.example_args,
                   options={"schedule": [6], "proportional_attention": False, "gate": False})
    assert run.result.counts == {"blocks_merged": 1, "tokens_merged": 6}
    assert [b["r"] for b in run.result.details["blocks"]] == [6, 0]
    assert run.ops_added()["optim.merge_tokens"] == 1 and "aten.log" not in run.histogram_after


def test_unmerge_mode_copies_tokens_back(vit):
    gm, z = vit
    run = run_pass("merge_tokens", gm, z.example_args,
                   options={"r": 4, "mode": "unmerge", "gate": False})
    assert run.result.counts == {"blocks_merged": 2, "tokens_merged": 8}
    assert run.result.details["mode"] == "unmerge"
    assert run.histogram_after["optim.merge_tokens"] == 2
    assert run.histogram_after["optim.unmerge_tokens"] == 2
    assert numerics.compare(run.before, run.after)["cosine_min"] >= 0.95  # measured 0.983


def test_gate_refuses_a_merge_the_cost_model_calls_slower(vit):
    gm, z = vit  # 17 tokens, 64 wide: the matching costs more than it saves
    with pytest.raises(PassError) as err:
        run_pass("merge_tokens", gm, z.example_args, options={"r": 4})
    assert err.value.before == ["cleanup", "fuse_attention"]
    assert isinstance(err.value.cause, ConfigError)
    assert "not worth it on xeon-spr: merged estimated" in str(err.value)


@pytest.mark.parametrize("mode, reason", [
    ("causal", "causal attention (a decoder): merging would mix future tokens into past ones"),
    ("padding", "masked attention (padding mask): merged tokens would cross the mask"),
    ("cross", "cross-attention (8 queries, 5 keys)"),
])
def test_attention_it_must_not_merge_is_refused_with_the_reason(mode, reason):
    args, kwargs = _block_inputs(mode)
    gm = capture_example(_Block(mode).eval(), args, kwargs)
    with pytest.raises(PassError, match="expected \\['blocks_merged'\\] > 0") as err:
        run_pass("merge_tokens", gm, args, kwargs, options={"r": 2, "gate": False})
    assert reason in str(err.value)


def test_the_same_block_unmasked_merges():
    # the positive twin of the refusals above: the graph itself is mergeable
    args, kwargs = _block_inputs("plain")
    gm = capture_example(_Block("plain").eval(), args, kwargs)
    run = run_pass("merge_tokens", gm, args, kwargs, options={"r": 2, "gate": False})
    assert run.result.counts == {"blocks_merged": 1, "tokens_merged": 2}
    assert run.result.details["blocks"][0]["tokens_out"] == 6
    assert run.histogram_after["optim.merge_tokens"] == 1


def test_bad_options_are_config_errors(vit):
    gm, z = vit
    with pytest.raises(ConfigError, match="r and schedule entries must be >= 0"):
        run_pass("merge_tokens", gm, z.example_args, options={"r": -1})
    with pytest.raises(ConfigError, match="Did you mean 'schedule'"):
        run_pass("merge_tokens", gm, z.example_args, options={"schedul": [1]})
