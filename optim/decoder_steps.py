"""A causal LM as two traceable graphs around a preallocated KV cache: `PrefillStep` (the prompt,
every layer's keys and values out) and `DecodeStep` (one new token per sequence; the cache in,
the new token's keys and values out). Both wrap the user's `transformers` model without changing
it: for the length of a call its config names optim's attention function, which every
`transformers` decoder calls through `AttentionInterface` after `Cache.update`.

The cache is one [batch, kv_heads, length, head_dim] tensor per layer for keys and one for
values, preallocated to the longest sequence a `generate()` call can reach; `cache_mask`
[batch, length] says which slots hold a real token (left padding, unwritten and evicted slots
are False). Decode attention reads the cache where it lies (`optim::attention_decode`: two
blocks, the cache and the new token, one softmax), so no step copies the cache; the runtime
writes the new token's keys and values into their slot. Grouped-query attention stays grouped.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import DynamicCache
from transformers.modeling_utils import AttentionInterface

import optim.ops  # noqa: F401  (torch.ops.optim.attention, attention_decode)
from optim.errors import CaptureError

ATTENTION = "optim_kv"  # the name optim's attention function is registered under

_STEP: contextvars.ContextVar[_StepState | None] = contextvars.ContextVar("optim_step",
                                                                         default=None)


@dataclass
class _StepState:
    prefill_mask: Tensor | None  # [B, 1, T, T] bool (prefill)
    cache_mask: Tensor | None  # [B, S] bool (decode)
    past_keys: tuple = ()
    past_values: tuple = ()


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


_UNSUPPORTED = ("sliding_window", "softcap", "s_aux", "sinks")


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
        out = torch.ops.optim.attention(query, key, value, state.prefill_mask, scale, False)
    else:
        layer = module.layer_idx
        out = torch.ops.optim.attention_decode(query, key, value, state.past_keys[layer],
                                               state.past_values[layer], state.cache_mask,
                                               scale)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, _attention)


@contextlib.contextmanager
def modes_kept(model: torch.nn.Module):
    """Every submodule's train/eval flag as it was, whatever ran in between."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


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


def prefill_mask(attention_mask: Tensor) -> Tensor:
    """[B, T] padding mask (1 = token) -> [B, 1, T, T] bool: causal, real keys only; a padding
    query attends to itself alone (a finite row: its keys and values land in the cache)."""
    t = attention_mask.shape[1]
    pos = torch.arange(t, device=attention_mask.device)
    causal = pos[None, :] <= pos[:, None]  # [T(query), T(key)]
    real = attention_mask.bool()[:, None, None, :]
    return (causal[None, None] & real) | torch.eye(t, dtype=torch.bool)[None, None]


class PrefillStep(torch.nn.Module):
    """(input_ids, attention_mask, position_ids) [B, T] -> (logits of the last position [B, V],
    keys, values: one [B, kv_heads, T, head_dim] per layer)."""

    def __init__(self, model: torch.nn.Module, layers: int):
        super().__init__()
        self.model, self.layers = model, layers
        self.training = model.training  # a wrapper's train()/eval() reaches the model

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor):
        state = _StepState(prefill_mask(attention_mask), None)
        cache = _StepCache(self.layers, 0)
        with _optim_attention(self.model, state):
            out = self.model(input_ids=input_ids, position_ids=position_ids,
                             attention_mask=attention_mask, past_key_values=cache,
                             use_cache=True, logits_to_keep=1)
        return (out.logits[:, -1], *_split(cache))


class DecodeStep(torch.nn.Module):
    """(input_ids, position_ids) [B, 1], cache_mask [B, S] and the cache (keys, values: one
    [B, kv_heads, S, head_dim] per layer) -> (next-token logits [B, V], the new token's keys and
    values [B, kv_heads, 1, head_dim] per layer)."""

    def __init__(self, model: torch.nn.Module, layers: int):
        super().__init__()
        self.model, self.layers = model, layers
        self.training = model.training  # a wrapper's train()/eval() reaches the model

    def forward(self, input_ids: Tensor, position_ids: Tensor, cache_mask: Tensor,
                past_keys: tuple, past_values: tuple):
        state = _StepState(None, cache_mask, tuple(past_keys), tuple(past_values))
        cache = _StepCache(self.layers, past_keys[0].shape[2])
        # the model's own mask is not used (optim's attention reads cache_mask); it is passed
        # so that models deriving positions from it see the right length
        mask = torch.ones(input_ids.shape[0], cache.past + 1, dtype=torch.long)
        with _optim_attention(self.model, state):
            out = self.model(input_ids=input_ids, position_ids=position_ids,
                             attention_mask=mask, past_key_values=cache, use_cache=True,
                             logits_to_keep=1)
        return (out.logits[:, -1], *_split(cache))


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
    step = PrefillStep(model, layers)
    one = torch.zeros(1, 1, dtype=torch.long)
    with torch.no_grad():
        _, keys, values = step(one, torch.ones(1, 1, dtype=torch.long), one)
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
