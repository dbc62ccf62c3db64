"""LLM prefill and decode estimates from a config, without weights: the decoder is captured on the
meta device (fake tensors carry only shapes and dtypes) and the cost model in `hardware.llm`
scales its second layer to every layer.

    from optim.llm import estimate_llm
    r = estimate_llm("llama2-7b", "a100", batch=1, prompt_len=512, context_len=1024)
    r["decode"]["tokens_per_s"]

The model is a preset (`llama2-7b`, `falcon-7b`, `gemma-7b`, `gpt2-xl`, ...), any causal-LM
family `transformers` knows (`"falcon"`, `"qwen2"`: its default config), or a config object;
`overrides={"num_hidden_layers": 60}` changes the config. The shape comes from the model itself:
a meta-device instance gives the parameter count (tied weights once) and its KV cache gives the
KV heads and head width; the kernels come from a 2-layer copy of the same architecture.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
from dataclasses import replace
from functools import lru_cache

import torch
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, LlamaConfig, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

import passes  # noqa: F401  (registers cleanup and fuse_attention)
from hardware import llm
from hardware.llm_shape import CONFIGS, LLAMA2, LLMShape
from hardware.opcost import Kernel, graph_kernels
from optim.errors import ConfigError, PassError, UnknownNameError
from optim.ir import capture
from optim.pass_base import PassContext
from optim.pipeline import Pipeline
from optim.targets import Target, resolve_target

__all__ = ["estimate_llm", "decoder_kernels", "captured_decoder", "llm_config", "llm_shape",
           "llm_names"]

PARAMETER_TOLERANCE = 0.03  # the shape's formula vs the model's own count


def llm_names() -> list[str]:
    """Every name `llm_config` takes: the presets, then the causal-LM families of transformers."""
    return [*LLAMA2, *CONFIGS, *sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)]


def llm_config(model: str | PretrainedConfig, **overrides) -> PretrainedConfig:
    """A transformers config: a preset name, a causal-LM family name (its defaults) or a config
    (copied), with `overrides` (config attribute names) applied."""
    if isinstance(model, PretrainedConfig):
        cfg = copy.deepcopy(model)
        for key, value in overrides.items():
            setattr(cfg, key, value)
        return _causal(cfg, model.model_type)
    if not isinstance(model, str):
        raise ConfigError(f"an LLM is a name, a transformers config or an LLMShape, not "
                          f"{type(model).__name__}")
    if model in LLAMA2:
        return _llama_config(LLAMA2[model], **overrides)
    if model in CONFIGS:
        family, preset = CONFIGS[model]
        return CONFIG_MAPPING[family](**{**preset, **overrides})
    if model in CONFIG_MAPPING:
        return _causal(CONFIG_MAPPING[model](**overrides), model)
    raise UnknownNameError("LLM", model, llm_names())


def _causal(cfg: PretrainedConfig, name: str) -> PretrainedConfig:
    """`cfg` if transformers has a decoder-only causal LM for it, else a ConfigError."""
    if cfg.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or cfg.is_encoder_decoder:
        kind = "an encoder-decoder" if cfg.is_encoder_decoder else "not a causal LM"
        raise ConfigError(
            f"{name!r} ({type(cfg).__name__}) is {kind}: prefill/decode estimates need a "
            f"decoder-only model that AutoModelForCausalLM builds (e.g. llama, falcon, gemma, "
            f"gpt2, qwen2, mistral, phi3, opt)")
    return cfg


def _llama_config(shape: LLMShape, **overrides) -> LlamaConfig:
    """A Llama config of `shape` (the Llama-2 presets, and bare LLMShapes for the capture)."""
    return LlamaConfig(**{**dict(
        hidden_size=shape.hidden, intermediate_size=shape.ffn, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim, vocab_size=shape.vocab, tie_word_embeddings=shape.tied,
        max_position_embeddings=4096), **overrides})


def llm_shape(model: str | PretrainedConfig | LLMShape, **overrides) -> LLMShape:
    """The shape of `model` (see `llm_config`) taken from a meta-device instance of it; an
    LLMShape is used as given (`overrides` then replace its fields)."""
    if isinstance(model, LLMShape):
        return replace(model, **overrides) if overrides else model
    cfg = llm_config(model, **overrides)
    name = model if isinstance(model, str) else (cfg.name_or_path or cfg.model_type)
    return _shape_of(cfg.to_json_string(use_diff=True), name)


def _config(config_json: str, layers: int | None = None, **attrs) -> PretrainedConfig:
    """The config serialized in an LLMShape, optionally cut to its first `layers` layers."""
    d = json.loads(config_json)
    cfg = CONFIG_MAPPING[d["model_type"]].from_dict(d)
    if layers is not None:
        cfg.num_hidden_layers = layers
        if isinstance(getattr(cfg, "layer_types", None), list):  # per-layer kinds (Gemma-2)
            cfg.layer_types = cfg.layer_types[:layers]
    for key, value in attrs.items():
        setattr(cfg, key, value)
    return cfg


def _meta_model(cfg: PretrainedConfig, **kwargs) -> torch.nn.Module:
    """`cfg`'s causal LM on the meta device: shapes and dtypes only, no memory, no weights."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(cfg, **kwargs).eval()
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise ConfigError(f"could not build a {cfg.model_type} causal LM on the meta device "
                          f"({type(e).__name__}: {str(e)[:300]}); estimate it from an "
                          f"LLMShape you build instead") from e


@lru_cache(maxsize=32)
def _shape_of(config_json: str, name: str) -> LLMShape:
    """The shape of the model `config_json` describes, from a meta-device instance of it:
    parameters (tied weights once), tied LM head, KV heads and head width of its cache, gated
    or plain MLP from the first layer's weights; checked against the model's count."""
    cfg = _config(config_json)
    model = _meta_model(cfg)
    kv_heads, head_dim = _cache_layout(config_json)
    shape = replace(LLMShape.from_config(cfg, name), kv_heads=kv_heads, head_size=head_dim,
                    tied=_tied(model), params=sum(p.numel() for p in model.parameters()),
                    config=config_json)
    shape = replace(shape, gated_mlp=_mlp_matrices(model, shape) > 2.5)
    _check_parameters(shape)
    return shape


def _cache_layout(config_json: str) -> tuple[int, int]:
    """(KV heads, head width) of the KV cache a 2-layer copy of the model keeps."""
    model = _meta_model(_config(config_json, layers=2, use_cache=True))
    ids = torch.zeros(1, 2, dtype=torch.long, device="meta")
    try:
        with torch.no_grad():
            cache = model(ids, use_cache=True).past_key_values
    except Exception as e:  # the family's forward, on fake tensors: any failure is its own
        raise ConfigError(f"a {model.config.model_type} forward on the meta device failed "
                          f"({type(e).__name__}: {str(e)[:300]}); estimate it from an "
                          f"LLMShape you build instead") from e
    layers = getattr(cache, "layers", None)
    if not layers:
        raise ConfigError(f"{model.config.model_type} kept no KV cache on a forward: it is not "
                          f"a decoder the prefill/decode estimate applies to")
    _, kv_heads, _, head_dim = layers[0].keys.shape
    return int(kv_heads), int(head_dim)


def _tied(model: torch.nn.Module) -> bool:
    """Whether the LM head is the embedding matrix itself."""
    out, emb = model.get_output_embeddings(), model.get_input_embeddings()
    return out is not None and getattr(out, "weight", None) is emb.weight


def _mlp_matrices(model: torch.nn.Module, shape: LLMShape) -> float:
    """How many hidden x ffn matrices the first decoder layer's MLP holds: its matrices less
    the attention's, over hidden x ffn (2: up, down; 3: gate, up, down)."""
    first = sum(p.numel() for n, p in model.named_parameters()
                if p.dim() >= 2 and next((x for x in n.split(".") if x.isdigit()), None) == "0")
    attention = shape.layer_weights() - (3 if shape.gated_mlp else 2) * shape.hidden * shape.ffn
    return (first - attention) / (shape.hidden * shape.ffn)


def _check_parameters(shape: LLMShape) -> None:
    """The shape must account for the model's own parameters, else its costs would be wrong."""
    formula, own = shape.formula_parameters(), shape.params
    if abs(formula - own) > PARAMETER_TOLERANCE * own:
        raise ConfigError(
            f"{shape.name}: its shape accounts for {formula / 1e9:.3f}B of the model's "
            f"{own / 1e9:.3f}B parameters; its layers are not the dense attention + MLP decoder "
            f"the cost model scales (mixture of experts, shared layers?): estimate it from an "
            f"LLMShape you build instead")


@lru_cache(maxsize=16)
def captured_decoder(shape: LLMShape, batch: int, seq: int) -> tuple[Kernel, ...]:
    """Kernels of a 2-layer meta-device copy of the decoder (the shape's own architecture, or a
    Llama of the shape when it has no config), after cleanup + fuse_attention."""
    model = _two_layers(shape, seq).to(torch.float16)
    ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    # only the last position's logits are needed to pick the next token
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(
        model.forward).parameters else {}
    cap = capture(model, (ids,), keep)
    try:
        Pipeline.build(["cleanup", "fuse_attention"]).run(cap.gm, PassContext(
            target=resolve_target("a100"), example_inputs=((ids,), keep), calibration=[]))
    except PassError as e:
        raise ConfigError(f"{shape.name}: its attention does not fuse into one kernel "
                          f"({e.cause}), so decode's KV-cache reads cannot be costed; estimate "
                          f"it from an LLMShape you build instead") from e
    return tuple(graph_kernels(cap.gm))


def _two_layers(shape: LLMShape, seq: int) -> torch.nn.Module:
    """A 2-layer meta copy of `shape`'s model, positions for `seq` tokens, SDPA attention
    where the family has it (else eager, which fuse_attention also fuses)."""
    config_json = shape.config or _llama_config(shape).to_json_string(use_diff=True)
    cfg = _config(config_json, layers=2, use_cache=False)
    if getattr(cfg, "max_position_embeddings", None):
        cfg.max_position_embeddings = max(cfg.max_position_embeddings, seq)
    try:
        return _meta_model(cfg, attn_implementation="sdpa")
    except ConfigError:
        return _meta_model(cfg, attn_implementation="eager")


def decoder_kernels(shape: LLMShape, **options) -> list[Kernel]:
    """All kernels of one forward of `shape` (see `hardware.llm.decoder_kernels`)."""
    return llm.decoder_kernels(shape, captured_decoder, **options)


def estimate_llm(model, target: str | Target, *, backend: str = "torch",
                 overrides: dict | None = None, **options) -> dict:
    """Prefill and decode of `model` (a preset or family name, a transformers config or an
    LLMShape; `overrides` change its config) on `target`. Options: `hardware.llm.estimate_llm`."""
    tgt = resolve_target(target, backend)
    shape = llm_shape(model, **(overrides or {}))
    return llm.estimate_llm(shape, tgt.spec, tgt.calibration, captured_decoder, **options)
