"""A causal LM as one traceable step around a preallocated KV cache: `DecoderStep` takes T new
tokens per sequence and the cache, and returns the last position's logits and the new tokens'
keys and values. A prompt is a step over an empty cache (T = its length); each generated token
is a step with T = 1. One graph, one set of weights, one pipeline run for both phases. The step
wraps the user's `transformers` model without changing it: for the length of a call its config
names optim's attention function, which every `transformers` decoder calls through
`AttentionInterface` after `Cache.update`.

The cache is one [batch, kv_heads, length, head_dim] tensor per layer for keys and one for
values, preallocated to the longest sequence a `generate()` call can reach; `cache_mask`
[batch, length] says which slots hold a real token (left padding, unwritten and evicted slots
are False). Attention reads the cache where it lies (`optim::attention_decode`: two blocks,
the cache and the new tokens, one softmax), so no step copies the cache; the runtime writes
the new tokens' keys and values into their slots. Grouped-query attention stays grouped.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers import DynamicCache
from transformers.modeling_utils import AttentionInterface

import optim.ops  # noqa: F401  (torch.ops.optim.attention, attention_decode)
from optim.errors import CaptureError
from optim.model_state import modes_kept

ATTENTION = "optim_kv"  # the name optim's attention function is registered under

_STEP: contextvars.ContextVar[_StepState | None] = contextvars.ContextVar("optim_step",
                                                                         default=None)


@dataclass
class _StepState:
    new_mask: Tensor  # [B, T] 1 = a real new token
    cache_mask: Tensor | None  # [B, S] bool; None: no cache at all (a plain forward)
    past_keys: tuple = ()
    past_values: tuple = ()
    masses: dict = field(default_factory=dict)  # layer -> attention each key received
    biases: dict = field(default_factory=dict)  # made by the first layer, shared by all


class _StepCache(DynamicCache):
    """The `Cache` a step hands the model: `update` records each layer's new keys and values
    and returns them as they are (the attention function reads the past from the step)."""

    def __init__(self, layers: int, past: int):
        super().__init__()
        self.new: list[tuple[Tensor, Tensor] | None] = [None] * layers
        self.past = past

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if layer_idx >= len(self.new):
            raise CaptureError(f"layer {layer_idx} wrote to the KV cache, but the model has "
                               f"{len(self.new)} layers")
        self.new[layer_idx] = (key_states, value_states)
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.past

    def get_mask_sizes(self, query_length, layer_idx=0):
        return self.past + query_length, 0

    def __len__(self) -> int:
        return len(self.new)


# a sliding window is accepted because `optim.decoder` caps the cache at it (inside the window
# it masks nothing); these change the scores themselves
_UNSUPPORTED = ("softcap", "s_aux", "sinks")


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """optim's attention function: the prefill's causal mask, or the decode step's cache."""
    state = _STEP.get()
    if state is None:
        raise CaptureError("optim's attention function ran outside a decoder step")
    used = [k for k in _UNSUPPORTED if kwargs.get(k) is not None]
    if used:
        raise CaptureError(f"{type(module).__name__} asks for attention with {used}, which "
                           f"optim's KV-cache attention does not implement yet")
    scale = float(scaling if scaling is not None else query.shape[-1] ** -0.5)
    if state.cache_mask is None:
        mask = optim.ops._new_block_mask(state.new_mask, 1)  # [B, 1, T, T]
        out = torch.ops.optim.attention(query, key, value, mask, scale, False)
    else:
        layer = module.layer_idx
        if not state.biases:  # once per step, in the graph before the first attention
            state.biases["cache"] = optim.ops.cache_bias(state.cache_mask)
            state.biases["new"] = optim.ops.new_bias(state.new_mask,
                                                     query.shape[1] // key.shape[1])
        out, state.masses[layer] = torch.ops.optim.attention_decode(
            query, key, value, state.past_keys[layer], state.past_values[layer],
            state.biases["cache"], state.biases["new"], scale)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, _attention)


@contextlib.contextmanager
def _optim_attention(model: torch.nn.Module, state: _StepState):
    """The model's config names optim's attention for the call, then what it named before."""
    configs = {id(c): c for c in (getattr(m, "config", None) for m in model.modules())
               if c is not None and hasattr(c, "_attn_implementation_internal")}
    before = {k: c._attn_implementation_internal for k, c in configs.items()}
    token = _STEP.set(state)
    try:
        for c in configs.values():
            c._attn_implementation_internal = ATTENTION
        yield
    finally:
        for k, c in configs.items():
            c._attn_implementation_internal = before[k]
        _STEP.reset(token)


class DecoderStep(torch.nn.Module):
    """(input_ids, attention_mask, position_ids) [B, T] for T new tokens, cache_mask [B, S]
    and the cache (past_keys, past_values: one [B, kv_heads, S, head_dim] per layer) ->
    (logits of the last position [B, V], the new tokens' keys and values [B, kv_heads, T,
    head_dim] per layer, and the attention each key received [B, S + T], summed over layers,
    heads and queries: what KV-cache eviction scores tokens by)."""

    def __init__(self, model: torch.nn.Module, layers: int):
        super().__init__()
        self.model, self.layers = model, layers
        self.training = model.training  # a wrapper's train()/eval() reaches the model

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
                cache_mask: Tensor | None = None, past_keys: tuple = (),
                past_values: tuple = ()):
        state = _StepState(attention_mask, cache_mask, tuple(past_keys), tuple(past_values))
        past = past_keys[0].shape[2] if past_keys else 0
        cache = _StepCache(self.layers, past)
        # the model's own mask is not used (optim's attention reads the step's masks); it is
        # passed so that models deriving positions from it see the right length
        mask = torch.ones(input_ids.shape[0], past + input_ids.shape[1], dtype=torch.long)
        with _optim_attention(self.model, state):
            out = self.model(input_ids=input_ids, position_ids=position_ids,
                             attention_mask=mask, past_key_values=cache, use_cache=True,
                             logits_to_keep=1)
        keys, values = _split(cache)
        if cache_mask is None:
            return out.logits[:, -1], keys, values
        return out.logits[:, -1], keys, values, _total(state.masses, self.layers)


def _total(masses: dict, layers: int) -> Tensor:
    missing = [i for i in range(layers) if i not in masses]
    if missing:
        raise CaptureError(f"layers {missing} did not attend through optim's attention")
    total = masses[0]
    for i in range(1, layers):
        total = total + masses[i]
    return total


def _split(cache: _StepCache) -> tuple[tuple, tuple]:
    missing = [i for i, kv in enumerate(cache.new) if kv is None]
    if missing:
        raise CaptureError(f"layers {missing} never wrote keys and values to the cache; this "
                           f"model's attention does not go through transformers' Cache.update")
    return tuple(k for k, _ in cache.new), tuple(v for _, v in cache.new)


@dataclass(frozen=True)
class CacheLayout:
    """What one KV cache holds: per layer, keys and values [batch, kv_heads, length, head_dim]."""

    layers: int
    kv_heads: int
    head_dim: int
    value_dim: int
    dtype: str = "float32"

    def bytes_per_token(self) -> int:
        size = torch.empty((), dtype=getattr(torch, self.dtype)).element_size()
        return self.layers * self.kv_heads * (self.head_dim + self.value_dim) * size

    def allocate(self, batch: int, length: int) -> tuple[list[Tensor], list[Tensor]]:
        """Zeroed buffers (a slot never written is masked, and must not hold NaN)."""
        dt = getattr(torch, self.dtype)
        keys = [torch.zeros(batch, self.kv_heads, length, self.head_dim, dtype=dt)
                for _ in range(self.layers)]
        values = [torch.zeros(batch, self.kv_heads, length, self.value_dim, dtype=dt)
                  for _ in range(self.layers)]
        return keys, values

    def to_dict(self) -> dict:
        return dict(vars(self))


def probe_layout(model: torch.nn.Module) -> CacheLayout:
    """The cache a model writes, found by running one token through it (every family names its
    heads and dimensions differently; what `Cache.update` receives does not lie)."""
    layers = _layer_count(model)
    one = torch.zeros(1, 1, dtype=torch.long)
    with torch.no_grad(), modes_kept(model):
        _, keys, values = DecoderStep(model, layers).eval()(one, torch.ones_like(one), one)
    k, v = keys[0], values[0]
    return CacheLayout(layers, k.shape[1], k.shape[3], v.shape[3],
                       str(k.dtype).replace("torch.", ""))


def _layer_count(model: torch.nn.Module) -> int:
    cfg = getattr(model, "config", None)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    n = getattr(text, "num_hidden_layers", None)
    if not isinstance(n, int):
        raise CaptureError(f"{type(model).__name__}: its config names no num_hidden_layers; "
                           f"generation needs a transformers causal LM")
    return n
