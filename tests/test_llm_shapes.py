"""LLM shapes come from the model itself (meta device, no weights): KV heads and head width from
its KV cache, parameters from its own count (tied LM head once), gated or plain MLP from its
weights, and the kernels from a 2-layer copy of the family's own architecture."""

import pytest
import torch
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, GPT2Config
from typer.testing import CliRunner

from hardware.llm_shape import CONFIGS, LLMShape
from optim.cli import app
from optim.errors import ConfigError, UnknownNameError
from optim.llm import decoder_kernels, estimate_llm, llm_config, llm_shape

# (parameters from the released models, KV heads, head_dim, gated MLP): Falcon-7B is multi-query
# (1 KV head), Gemma-7B has 16 heads of 256 on a 3072 hidden and a GeGLU MLP, GPT-2-XL ties its
# LM head to the embedding
REAL = {"falcon-7b": (6.92e9, 1, 64, False), "gemma-7b": (8.54e9, 16, 256, True),
        "gpt2-xl": (1.56e9, 25, 64, False)}
FAMILIES = ["falcon", "gemma", "gpt2", "qwen2", "mistral", "phi3", "opt", "llama"]


def own_count(cfg) -> int:
    """The model's own parameter count: transformers dedupes tied weights in parameters()."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", REAL)
def test_real_sizes_get_their_own_heads_mlp_and_parameters(name):
    params, kv_heads, head_dim, gated = REAL[name]
    s = llm_shape(name)
    assert (s.kv_heads, s.head_dim, s.gated_mlp, s.tied) == (kv_heads, head_dim, gated, True)
    assert s.parameters() == pytest.approx(params, rel=0.01)
    assert s.parameters() == own_count(llm_config(name))
    assert s.formula_parameters() == pytest.approx(s.parameters(), rel=0.01)
    assert s.kv_bytes_per_token() == 2 * s.layers * kv_heads * head_dim * 2


def test_kv_cache_bytes_per_token():
    assert llm_shape("falcon-7b").kv_bytes_per_token() == 8192  # 2 x 32 layers x 1 x 64 x 2 B
    assert llm_shape("gemma-7b").kv_bytes_per_token() == 458752  # 2 x 28 x 16 x 256 x 2 B
    assert llm_shape("gpt2-xl").kv_bytes_per_token() == 307200  # 2 x 48 x 25 x 64 x 2 B
    assert llm_shape("llama2-70b").kv_bytes_per_token(1.0) == 163840  # GQA 8 KV heads, int8


def test_falcon_7b_estimate_uses_one_kv_head_and_its_own_kernels():
    r = estimate_llm("falcon-7b", "a100", prompt_len=16, context_len=2048)
    assert r["memory"]["kv_cache_bytes"] == 2048 * 8192  # 16.8 MB, not 1.19 GB with 71 KV heads
    assert r["decode"]["bytes_by_class"]["kv_cache"] == pytest.approx(2048 * 8192)
    assert r["memory"]["weights_bytes"] == pytest.approx(2 * 6.92e9, rel=0.01)
    assert r["shape"]["kv_heads"] == 1 and r["parameters"] == llm_shape("falcon-7b").params
    ks = decoder_kernels(llm_shape("falcon-7b"), batch=1, seq=1, context_len=2048)
    attention = [k for k in ks if k.kind == "attention"]
    assert len(attention) == 32 and attention[0].shape == (1, 71, 1, 2048, 64)
    # Falcon's own layer: fused QKV projection, parallel attention + MLP off one layer norm
    assert any(k.module.endswith("h.31.self_attention.query_key_value") for k in ks)
    assert not any("post_attention_layernorm" in k.module for k in ks)


@pytest.mark.parametrize("name,gate", [("gemma-7b", True), ("gpt2-xl", False)])
def test_decode_kernels_stream_exactly_the_models_weights(name, gate):
    s = llm_shape(name)
    ks = decoder_kernels(s, batch=1, seq=1, context_len=128)
    assert sum(k.bytes.get("weights", 0) for k in ks) == pytest.approx(2 * s.params, rel=0.01)
    assert any(k.module.endswith("mlp.gate_proj") for k in ks) is gate  # GeGLU vs GELU MLP
    assert sum(k.kind == "attention" for k in ks) == s.layers


@pytest.mark.parametrize("family", FAMILIES)
def test_any_family_name_builds_its_default_config(family):
    s = llm_shape(family)
    cfg = CONFIG_MAPPING[family]()
    assert s.params == own_count(cfg) and s.layers == cfg.num_hidden_layers
    assert s.formula_parameters() == pytest.approx(s.params, rel=0.03)
    assert s.kv_heads * s.head_dim <= s.heads * s.head_dim


def test_config_objects_and_overrides():
    xl = GPT2Config(n_embd=1600, n_layer=48, n_head=25, vocab_size=50257)
    assert llm_shape(xl).params == llm_shape("gpt2-xl").params
    assert llm_shape("falcon", num_hidden_layers=2).layers == 2
    assert llm_shape(llm_config("gemma-7b", num_hidden_layers=4)).layers == 4
    mini = LLMShape("mini", 2, 64, 4, 2, 128, 100)
    assert llm_shape(mini, layers=3).layers == 3  # an LLMShape is used as given


def test_attribute_reading_alone_gets_falcon_gemma_gpt2_right():
    """`LLMShape.from_config` (the hardware layer, no model) no longer gets them wrong either."""
    for name, (_, kv_heads, head_dim, gated) in REAL.items():
        family, overrides = CONFIGS[name]
        s = LLMShape.from_config(CONFIG_MAPPING[family](**overrides))
        assert (s.kv_heads, s.head_dim, s.gated_mlp, s.tied) == (kv_heads, head_dim, gated, True)


def test_errors_name_the_problem_and_the_fix():
    with pytest.raises(UnknownNameError, match="Did you mean 'falcon'.*gemma-7b"):
        llm_shape("falcom")
    with pytest.raises(ConfigError, match="encoder-decoder"):
        llm_shape("t5")
    with pytest.raises(ConfigError, match="not a causal LM"):
        llm_shape(CONFIG_MAPPING["vit"]())
    with pytest.raises(ConfigError, match="LLMShape, not int"):
        llm_shape(42)


def test_cli_llm_takes_family_names_and_overrides():
    result = CliRunner().invoke(app, ["llm", "gpt2", "--targets", "a100", "--prompt", "16",
                                      "--set", "n_layer=2"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "KV heads 12 x 64" in result.output and "2 layers" in result.output
    bad = CliRunner().invoke(app, ["llm", "falcom", "--targets", "a100"])
    assert bad.exit_code == 2 and "Did you mean 'falcon'" in bad.output
