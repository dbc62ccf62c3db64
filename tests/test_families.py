"""Families outside the zoo, built from small `transformers` configs (issue 24): each through
`cleanup,fuse_attention` (every attention fused, exact, shapes still dynamic) on torch and ONNX
Runtime, and through the default cpu pipeline. Each family here once failed: a crash, an
attention form not matched, or linears a weight pass could not see."""

from __future__ import annotations

import pytest
import torch
import transformers as hf

import optim

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=100)
FAMILIES = {
    # an embedding projection (16 -> 32) feeds q, k and v directly: a quantized linear reading
    # another's output crashed quantize
    "albert": lambda: hf.AlbertModel(hf.AlbertConfig(embedding_size=16, intermediate_size=64,
                                                     **SMALL)),
    "electra": lambda: hf.ElectraModel(hf.ElectraConfig(embedding_size=16, intermediate_size=64,
                                                        **SMALL)),
    # ALiBi: scores from baddbmm(alibi, q, kᵀ) on [B·H, L, D], softmax viewed back to 3-D
    "bloom": lambda: hf.BloomModel(hf.BloomConfig(hidden_size=32, n_layer=2, n_head=4,
                                                  vocab_size=100)),
    # disentangled attention: content and relative-position scores summed in 3-D, masked fill
    "deberta_v2": lambda: hf.DebertaV2Model(hf.DebertaV2Config(
        intermediate_size=64, relative_attention=True, pos_att_type=["p2c", "c2p"],
        max_relative_positions=32, position_buckets=16, **SMALL)),
    # linears written as x @ W.T + b
    "falcon": lambda: hf.FalconModel(hf.FalconConfig(new_decoder_architecture=False,
                                                     multi_query=True, bias=True, **SMALL)),
    "mistral": lambda: hf.MistralModel(hf.MistralConfig(intermediate_size=64,
                                                        num_key_value_heads=2, **SMALL)),
}
DECODERS = {"bloom", "falcon", "mistral"}  # traced as one forward (use_cache=False)
_BUILT: dict = {}


def _family(name):
    if name not in _BUILT:
        torch.manual_seed(0)
        _BUILT[name] = FAMILIES[name]().eval()
    return _BUILT[name]


def _inputs(name, batch=2, seq=16, seed=0):
    ids = torch.randint(0, 100, (batch, seq), generator=torch.Generator().manual_seed(seed))
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return {**kwargs, "use_cache": False} if name in DECODERS else kwargs


# ONNX Runtime for the families whose attention is rewritten before it fuses (3-D forms, hand
# linears); the rest fuse as the zoo's models do, which tests/test_dynamic_shapes.py lowers
CASES = [(f, "torch") for f in sorted(FAMILIES)] + [
    (f, "onnxruntime") for f in ("bloom", "deberta_v2", "falcon")]


@pytest.mark.parametrize("family, backend", CASES)
def test_every_attention_fuses_exactly_and_shapes_stay_dynamic(family, backend):
    model = _family(family)
    fast = optim.optimize(model, "cpu", (), example_kwargs=_inputs(family),
                          pipeline="cleanup,fuse_attention", backend=backend,
                          measure_latency=False)
    fused = fast.report["passes"][1]
    assert fused["counts"]["attention_fused"] == 2, fused["skipped"]
    assert fast.report["model"]["shapes"]["static"] == {}
    assert fast.report["fidelity"]["outputs"]["max_abs_error"] < 1e-4
    other = _inputs(family, batch=3, seq=9, seed=1)  # another batch and length than traced
    got = fast(**other)[0]
    with torch.no_grad():
        want = model(**other)[0]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_default_pipeline_runs_and_reports_fidelity(family):
    fast = optim.optimize(_family(family), "cpu", (), example_kwargs=_inputs(family),
                          pipeline="cpu_default", backend="torch", measure_latency=False)
    counts = {p["name"]: p["counts"] for p in fast.report["passes"]}
    assert counts["fuse_attention"]["attention_fused"] == 2
    assert counts["quantize"]["linear_quantized"] >= 8  # every layer's linears, at least
    assert fast.report["fidelity"]["outputs"]["cosine_min"] > 0.98


def test_grouped_query_heads_go_a_key_value_group_at_a_time_or_say_why():
    """Mistral (4 query heads on 2 key/value heads): 30% rounds to no whole group, and the
    report says so; 50% removes one group, its two query heads with it."""
    model = _family("mistral")
    for sparsity, heads, said in ((0.3, "4/4", True), (0.5, "2/4", False)):
        fast = optim.optimize(model, "cpu", (), example_kwargs=_inputs("mistral"),
                              pipeline=f"cleanup,fuse_attention,sparsify{{sparsity={sparsity}}}",
                              backend="torch", measure_latency=False)
        step = fast.report["passes"][-1]
        assert [la["heads"] for la in step["details"]["layers"]] == [heads] * 2
        reasons = [s["reason"] for s in step["skipped"]]
        assert any("2 key/value groups" in r for r in reasons) == said


def test_pixart_cross_attention_projections_are_not_called_mlps():
    """dynamic_width on PixArt labelled cross-attention's `to_k` (it reads the caption
    projection through views only) an MLP outside a block; a projection read by a projection
    is not an MLP. Self- and cross-attention heads and the block MLPs nest."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    model = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
        num_layers=2, cross_attention_dim=32, caption_channels=24, sample_size=8, patch_size=2,
        norm_type="ada_norm_single", use_additional_conditions=False).eval()
    kwargs = {"hidden_states": torch.randn(2, 4, 8, 8), "timestep": torch.tensor([10, 500]),
              "encoder_hidden_states": torch.randn(2, 5, 24), "return_dict": False}
    fast = optim.optimize(model, "cpu", (), example_kwargs=kwargs,
                          pipeline="cleanup,fuse_attention,dynamic_width", backend="torch",
                          measure_latency=False)
    step = fast.report["passes"][-1]
    assert step["counts"]["layers_nested"] == 4
    assert not [s for s in step["skipped"] if "attn2" in s["where"]]
    assert {s["where"] for s in step["skipped"]} >= {"caption_projection.linear_2"}


def test_geglu_feed_forwards_nest_and_prune_their_halves_together():
    """diffusers' GEGLU (`a, g = proj(x).chunk(2); a * gelu(g)`, the UNet's and SD's
    feed-forward) was left whole with no reason: its projection is split into two linears,
    a gated MLP whose neuron i is row i of each half."""
    from diffusers.models.attention import BasicTransformerBlock

    torch.manual_seed(0)
    block = BasicTransformerBlock(dim=32, num_attention_heads=2, attention_head_dim=16,
                                  activation_fn="geglu").eval()
    x = torch.randn(2, 6, 32)
    nested = optim.optimize(block, "cpu", (x,), pipeline="cleanup,fuse_attention,dynamic_width",
                            backend="torch", measure_latency=False)
    assert nested.report["passes"][-1]["counts"]["mlp_neurons_ordered"] == 1
    with torch.no_grad():
        torch.testing.assert_close(nested.at_width(1.0)(x), block(x), atol=1e-5, rtol=1e-5)
    pruned = optim.optimize(block, "cpu", (x,),
                            pipeline="cleanup,fuse_attention,sparsify{sparsity=0.5}",
                            backend="torch", measure_latency=False)
    (layer,) = pruned.report["passes"][-1]["details"]["layers"]
    assert layer["neurons"] == "64/128"
    proj = [n for n in pruned.graph.graph.nodes if n.target is torch.ops.aten.linear.default]
    assert sorted(tuple(n.meta["val"].shape)[-1] for n in proj).count(64) == 2  # both halves


def test_a_lifted_attention_saves_and_runs_in_a_fresh_process_at_other_shapes(tmp_path):
    """BLOOM's attention, lifted from 3-D and fused (its graph reads sizes at run time), saved
    on torch and loaded by a new Python process at another batch and length."""
    import subprocess
    import sys

    model = _family("bloom")
    fast = optim.optimize(model, "cpu", (), example_kwargs=_inputs("bloom"),
                          pipeline="cleanup,fuse_attention", backend="torch",
                          measure_latency=False)
    fast.save(tmp_path / "bloom")
    other = _inputs("bloom", batch=3, seq=9, seed=1)
    torch.save({k: v for k, v in other.items() if isinstance(v, torch.Tensor)},
               tmp_path / "inputs.pt")
    with torch.no_grad():
        torch.save(model(**other)[0], tmp_path / "want.pt")
    script = (f"import torch, optim\nfast = optim.load({str(tmp_path / 'bloom')!r})\n"
              f"x = torch.load({str(tmp_path / 'inputs.pt')!r})\n"
              f"got = fast(**x, use_cache=False)[0]\n"
              f"want = torch.load({str(tmp_path / 'want.pt')!r})\n"
              f"print(float((got - want).abs().max()))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip().splitlines()[-1]) < 1e-4
