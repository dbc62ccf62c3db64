"""The shape of a decoder LLM as the cost models need it: layers, widths, heads, KV heads, head
width, MLP kind, vocabulary, tied LM head and parameter count. No weights are involved.

`optim.llm.llm_shape` takes it from the model itself (a meta-device instance of any causal-LM
family `transformers` knows, its KV cache and its parameters); `LLMShape.from_config` here
reads a config's attributes only (no `transformers` needed) and is the approximation it starts
from. `LLAMA2` are the Llama-2 sizes as shapes (the FPGA model uses them directly); `CONFIGS`
are real-size configs of other families as data: (family, overrides of its config defaults).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from optim.errors import UnknownNameError

# families whose MLP has no gate (up, act, down), whatever their config calls the activation
UNGATED = {"gpt2", "falcon", "opt", "gpt_neox", "gptj", "bloom", "phi", "gpt_bigcode",
           "starcoder2", "codegen", "gpt_neo", "mpt", "biogpt", "xglm"}
GATED_ACTS = {"silu", "swiglu", "swish"}


@dataclass(frozen=True)
class LLMShape:
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int  # intermediate size of the MLP
    vocab: int
    gated_mlp: bool = True  # gate, up, down (SwiGLU/GeGLU: 3 matrices); GPT/Falcon: up, down (2)
    head_size: int = 0  # width of one head where it is not hidden // heads (Gemma-7B: 256)
    tied: bool = False  # the LM head is the embedding matrix (counted once)
    params: int = 0  # the model's own parameter count where it was built (else the formula)
    # the transformers config it came from (JSON, diff from the family defaults): the capture
    # builds a 2-layer copy of exactly this architecture; "" = a Llama of this shape
    config: str = field(default="", repr=False)

    @property
    def head_dim(self) -> int:
        return self.head_size or self.hidden // self.heads

    def layer_weights(self) -> int:
        """Weight elements of one decoder layer (projections only; norms, biases are small)."""
        q = self.heads * self.head_dim
        kv = self.kv_heads * self.head_dim
        attn = self.hidden * (q + 2 * kv) + q * self.hidden  # q, k, v in; o out
        mlp = (3 if self.gated_mlp else 2) * self.hidden * self.ffn
        return attn + mlp

    def formula_parameters(self) -> int:
        """Parameters from the shape: every layer, the embedding, and the LM head unless tied."""
        embeddings = (1 if self.tied else 2) * self.vocab * self.hidden
        return self.layers * self.layer_weights() + embeddings

    def parameters(self) -> int:
        """The model's own count where the shape came from a model, else the formula."""
        return self.params or self.formula_parameters()

    def kv_bytes_per_token(self, nbytes: float = 2.0) -> float:
        """KV-cache bytes one token adds over all layers: K and V, kv_heads x head_dim each."""
        return 2 * self.layers * self.kv_heads * self.head_dim * nbytes

    @classmethod
    def from_config(cls, cfg, name: str = "") -> LLMShape:
        """From a config's attributes alone (Llama, Mistral, Gemma, Falcon, GPT-2 and similar
        names); `optim.llm.llm_shape` checks them against the model it builds."""
        hidden = _first(cfg, "hidden_size", "n_embd", "d_model")
        heads = _first(cfg, "num_attention_heads", "n_head")
        layers = _first(cfg, "num_hidden_layers", "n_layer")
        ffn = _first(cfg, "intermediate_size", "ffn_hidden_size", "n_inner", "ffn_dim")
        family = getattr(cfg, "model_type", "")
        act = getattr(cfg, "hidden_act", None) or getattr(cfg, "activation_function", "gelu")
        gated = family not in UNGATED and (act in GATED_ACTS or family.startswith("gemma"))
        head_dim = getattr(cfg, "head_dim", None)
        return cls(name or family or "llm", layers, hidden, heads, _kv_heads(cfg, heads),
                   ffn or 4 * hidden, cfg.vocab_size, gated,
                   head_size=head_dim if isinstance(head_dim, int) else 0,
                   tied=bool(getattr(cfg, "tie_word_embeddings", False)))


def _first(cfg, *names: str):
    return next((v for v in (getattr(cfg, n, None) for n in names) if v), None)


def _kv_heads(cfg, heads: int) -> int:
    """KV heads from a config: Falcon's multi_query (1) unless new_decoder_architecture."""
    if getattr(cfg, "model_type", "") == "falcon" and not cfg.new_decoder_architecture:
        return 1 if cfg.multi_query else heads
    return _first(cfg, "num_key_value_heads", "num_kv_heads") or heads


# Llama-2 sizes from the released configs (meta-llama/Llama-2-{7,13,70}b-hf config.json).
LLAMA2 = {
    "llama2-7b": LLMShape("llama2-7b", 32, 4096, 32, 32, 11008, 32000),
    "llama2-13b": LLMShape("llama2-13b", 40, 5120, 40, 40, 13824, 32000),
    "llama2-70b": LLMShape("llama2-70b", 80, 8192, 64, 8, 28672, 32000),
}

# Real sizes of other families: (transformers family, overrides of its config defaults), from
# the released config.json files (tiiuae/falcon-7b, google/gemma-7b, openai-community/gpt2-xl).
CONFIGS: dict[str, tuple[str, dict]] = {
    # multi-query (1 KV head), parallel attention + MLP off one layer norm, tied LM head
    "falcon-7b": ("falcon", dict(hidden_size=4544, num_hidden_layers=32, num_attention_heads=71,
                                 multi_query=True, new_decoder_architecture=False,
                                 parallel_attn=True, bias=False, alibi=False, vocab_size=65024,
                                 max_position_embeddings=2048, tie_word_embeddings=True)),
    # head_dim 256 (16 x 256 = 4096 != hidden 3072), GeGLU gated MLP, tied LM head
    "gemma-7b": ("gemma", dict(hidden_size=3072, num_hidden_layers=28, num_attention_heads=16,
                               num_key_value_heads=16, head_dim=256, intermediate_size=24576,
                               hidden_act="gelu_pytorch_tanh", vocab_size=256000,
                               max_position_embeddings=8192, tie_word_embeddings=True)),
    # learned positions, GELU MLP (4 x 1600), tied LM head
    "gpt2-xl": ("gpt2", dict(n_embd=1600, n_layer=48, n_head=25, n_positions=1024,
                             vocab_size=50257, tie_word_embeddings=True)),
}


def llm_shape(name: str) -> LLMShape:
    """A Llama-2 size by name (`optim.llm.llm_shape` also takes configs and family names)."""
    try:
        return LLAMA2[name]
    except KeyError:
        raise UnknownNameError("LLM size", name, LLAMA2) from None
