"""The shape of a decoder LLM (Llama/GPT-style) as the cost models need it, from a `transformers`
config or by name for the standard Llama-2 sizes. No weights are involved."""

from __future__ import annotations

from dataclasses import dataclass

from optim.errors import UnknownNameError


@dataclass(frozen=True)
class LLMShape:
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int  # intermediate size of the MLP
    vocab: int
    gated_mlp: bool = True  # Llama SwiGLU: gate, up, down (3 matrices); GPT: 2

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def layer_weights(self) -> int:
        """Weight elements of one decoder layer (projections only; norms are negligible)."""
        kv = self.kv_heads * self.head_dim
        attn = self.hidden * (self.hidden + 2 * kv) + self.hidden * self.hidden
        mlp = (3 if self.gated_mlp else 2) * self.hidden * self.ffn
        return attn + mlp

    def parameters(self) -> int:
        return self.layers * self.layer_weights() + 2 * self.vocab * self.hidden

    @classmethod
    def from_config(cls, cfg, name: str = "") -> LLMShape:
        """From a `transformers` LlamaConfig/MistralConfig/GPT2Config-like object."""
        hidden = getattr(cfg, "hidden_size", None) or cfg.n_embd
        heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        layers = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
        ffn = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * hidden
        gated = getattr(cfg, "hidden_act", "gelu") in ("silu", "swiglu")
        return cls(name or getattr(cfg, "model_type", "llm"), layers, hidden, heads, kv, ffn,
                   cfg.vocab_size, gated)


# Llama-2 sizes from the released configs (meta-llama/Llama-2-{7,13,70}b-hf config.json).
LLAMA2 = {
    "llama2-7b": LLMShape("llama2-7b", 32, 4096, 32, 32, 11008, 32000),
    "llama2-13b": LLMShape("llama2-13b", 40, 5120, 40, 40, 13824, 32000),
    "llama2-70b": LLMShape("llama2-70b", 80, 8192, 64, 8, 28672, 32000),
}


def llm_shape(name: str) -> LLMShape:
    try:
        return LLAMA2[name]
    except KeyError:
        raise UnknownNameError("LLM size", name, LLAMA2) from None
