"""merge_tokens (ToMe): the merge op, the graph rewrite on ViT and DiT, and its refusals."""

from __future__ import annotations

import copy

import pytest
import torch

import optim
from optim.errors import PassError
from optim.ops import merge_tokens, merged_count, unmerge_tokens


def _tome(z, opts, backend="torch"):
    opts = {"gate": False, **opts}  # the zoo's tiny models are below the gate's break-even
    return optim.optimize(copy.deepcopy(z.model), "cpu", z.example_args,
                          ["cleanup", "fuse_attention", {"merge_tokens": opts}],
                          example_kwargs=z.example_kwargs, backend=backend,
                          measure_latency=False)


@pytest.mark.parametrize("n,r,protect", [(17, 4, 1), (65, 32, 1), (16, 8, 0), (10, 3, 2)])
def test_merge_op_is_a_size_weighted_average(n, r, protect):
    torch.manual_seed(n)
    x, metric = torch.randn(2, n, 8), torch.randn(2, 3, n, 5)
    size = torch.randint(1, 4, (2, n, 1)).float()
    out, new_size, dest = merge_tokens(x, metric, size, r, protect)
    k = merged_count(n, r, protect)
    assert out.shape == (2, k, 8) and new_size.shape == (2, k, 1) and dest.shape == (2, n)
    assert torch.equal(dest[:, :protect], torch.arange(protect).expand(2, -1))
    torch.testing.assert_close(new_size.sum(1), size.sum(1))  # no token lost or counted twice
    for b in range(2):
        for j in range(k):
            members = (dest[b] == j).nonzero().flatten()
            assert len(members) >= 1
            w = size[b, members]
            torch.testing.assert_close(out[b, j], (x[b, members] * w).sum(0) / w.sum())
    back = unmerge_tokens(out, dest)
    assert back.shape == x.shape
    alone = torch.tensor([[(dest[b] == dest[b, i]).sum() == 1 for i in range(n)]
                          for b in range(2)])
    torch.testing.assert_close(back[alone], x[alone])  # unmerged tokens come back exactly


def test_merge_op_merges_the_most_similar_pair():
    # token 3 (set A) is a copy of token 4 (set B); everything else is far apart
    metric = torch.eye(8).unsqueeze(0)
    metric[0, 3] = metric[0, 4]
    x = torch.arange(8.0).reshape(1, 8, 1)
    out, size, dest = merge_tokens(x, metric, None, 1, 0)
    assert dest[0, 3] == dest[0, 4] and size[0, dest[0, 3], 0] == 2
    assert out[0, dest[0, 3], 0] == 3.5


def test_vit_blocks_merge_and_shrink(zoo_model):
    z = zoo_model("vit")  # 16 patches + CLS, 2 blocks
    om = _tome(z, {"r": 4})
    res = om.report.pass_result("merge_tokens")
    assert res["counts"] == {"blocks_merged": 2, "tokens_merged": 8}
    assert res["details"]["mode"] == "merge"
    assert [(b["tokens_in"], b["tokens_out"]) for b in res["details"]["blocks"]] == \
        [(17, 13), (13, 9)]
    assert om.report["graph"]["after"]["optim.merge_tokens"] == 2
    merges = [n for n in om.graph.graph.nodes if n.target is torch.ops.optim.merge_tokens.default]
    assert len(merges) == 2 and all(n.args[4] == 1 for n in merges)  # CLS found and protected
    out = om(*z.example_args)
    assert out[0].shape == z.model(*z.example_args).logits.shape


def test_schedule_and_proportional_attention(zoo_model):
    z = zoo_model("vit")
    om = _tome(z, {"schedule": [6], "proportional_attention": True})
    blocks = om.report.pass_result("merge_tokens")["details"]["blocks"]
    assert [b["r"] for b in blocks] == [6, 0]
    attn = [n for n in om.graph.graph.nodes if n.target is torch.ops.optim.attention.default]
    assert attn[0].args[3] is None and attn[1].args[3] is not None  # log(size) bias after merge
    plain = _tome(z, {"schedule": [6], "proportional_attention": False})
    a = om(*z.example_args)[0]
    b = plain(*z.example_args)[0]
    assert not torch.allclose(a, b)


def test_dit_falls_back_to_merge_then_unmerge(zoo_model):
    z = zoo_model("dit")  # tokens are un-patchified into a grid at the end
    om = _tome(z, {"r": 4})
    res = om.report.pass_result("merge_tokens")
    assert res["details"]["mode"] == "unmerge"
    assert "splits the token axis" in res["details"]["fallback"]
    unmerges = [n for n in om.graph.graph.nodes
                if n.target is torch.ops.optim.unmerge_tokens.default]
    assert len(unmerges) == 2
    assert om.report["fidelity"]["outputs"]["cosine_min"] > 0.99
    with pytest.raises(PassError, match="splits the token axis"):
        _tome(z, {"r": 4, "mode": "merge", "expect": True})


@pytest.mark.parametrize("name,reason", [("gpt2", "causal mask"), ("llama", "causal mask"),
                                          ("bert", "padding mask")])
def test_refuses_masked_and_causal_attention(name, reason, zoo_model):
    z = zoo_model(name)
    before = {k: v.clone() for k, v in z.model.state_dict().items()}
    with pytest.raises(PassError, match=reason):
        _tome(z, {"r": 2, "expect": True})  # without expect: recorded, and skipped
    assert all(torch.equal(v, z.model.state_dict()[k]) for k, v in before.items())


def test_bad_options_are_named(zoo_model):
    z = zoo_model("vit")
    with pytest.raises(optim.ConfigError, match="r and schedule entries must be >= 0"):
        _tome(z, {"r": -1})
    with pytest.raises(optim.ConfigError, match="Did you mean 'schedule'"):
        _tome(z, {"schedul": [1]})


def test_trained_digits_vit_keeps_accuracy_at_half_the_tokens():
    from optim import zoo
    from optim.zoo import digits_vit

    z = zoo.load("digits_vit", batch=360)  # the whole held-out set
    base = digits_vit.accuracy(z.model)
    assert base >= 95.0  # the shipped weights are really trained
    om = _tome(z, {"r": 8})  # 65 tokens -> 33 at the last block
    blocks = om.report.pass_result("merge_tokens")["details"]["blocks"]
    assert blocks[-1]["tokens_out"] <= 65 // 2 + 1
    assert digits_vit.accuracy(om) >= base - 1.0


def test_shipped_yaml_pipeline_runs(tmp_path):
    from optim.config import shipped_pipelines
    from optim.runner import run_pipeline_file

    report, = run_pipeline_file(shipped_pipelines()["vit_tome"], out=tmp_path)
    res = next(p for p in report["passes"] if p["name"] == "merge_tokens")
    assert res["counts"]["blocks_merged"] == 4 and res["details"]["mode"] == "merge"
    assert report["fidelity"]["outputs"]["cosine_min"] > 0.9
    assert (tmp_path / "vit_tome-cpu.html").exists()


@pytest.mark.parametrize("backend", ["onnxruntime", "tvm"])
def test_backends_without_a_merge_lowering_say_so(backend, zoo_model):
    z = zoo_model("vit")
    with pytest.raises(optim.BackendError, match="no lowering for optim::merge_tokens.*'torch'"):
        _tome(z, {"r": 2}, backend=backend)


def test_gate_skips_merging_that_the_cost_model_says_is_slower(zoo_model):
    from optim import zoo

    z = zoo_model("vit")  # 17 tokens, 64 wide: matching costs more than it saves
    with pytest.raises(optim.PassError, match="not worth it on cpu: merged estimated"):
        _tome(z, {"r": 4, "gate": True, "expect": True})
    big = zoo.load("digits_vit", batch=64)  # 65 tokens, batch 64: r=8 pays (measured 1.14x)
    res = _tome(big, {"r": 8, "gate": True}).report.pass_result("merge_tokens")
    est = res["details"]["estimated_ms"]
    assert est["merged"] < est["unmerged"] and res["counts"]["blocks_merged"] == 4
