"""Token generation over a prefill and a decode step (`optim.decoder_steps`), whichever backend
runs them: the KV cache preallocated for the whole call, the prompt's keys and values written
once, then one decode step per token that reads the cache in place and adds one slot.

Batches of prompts are left-padded (as Hugging Face `generate` does for decoders): positions
count real tokens only, padding slots are masked. Greedy by default; sampling applies
temperature, then top-k, then top-p (Hugging Face's order) and draws with a seeded generator.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from optim.decoder_steps import CacheLayout
from optim.errors import ConfigError
from optim.kv_cache import CachePolicy, KVCache

# step(input_ids, attention_mask, position_ids, cache_mask, keys, values) -> (last logits,
# new keys, new values): `optim.decoder_steps.DecoderStep` as lowered by a backend
Step = Callable[..., tuple]


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_tokens: tuple[int, ...] = ()  # a sequence ends after emitting one of these
    pad_token_id: int = 0  # emitted by sequences that have ended, while others go on

    def check(self) -> Sampling:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be a positive integer, got "
                              f"{self.max_new_tokens!r}")
        if self.do_sample:
            if not self.temperature > 0:
                raise ConfigError(f"temperature must be > 0 when sampling, got "
                                  f"{self.temperature!r} (use do_sample=False for greedy)")
            if self.top_k is not None and self.top_k < 1:
                raise ConfigError(f"top_k must be >= 1, got {self.top_k!r}")
            if self.top_p is not None and not 0 < self.top_p <= 1:
                raise ConfigError(f"top_p must be in (0, 1], got {self.top_p!r}")
        return self


@dataclass
class Timing:
    """Wall times of the last call: the prefill (time to first token) and each decode step."""

    prefill_s: float = 0.0
    steps_s: list[float] = field(default_factory=list)


def left_pad(prompts: list[list[int]] | Tensor, attention_mask: Tensor | None,
             pad_token_id: int) -> tuple[Tensor, Tensor]:
    """(input_ids, attention_mask) [B, T], left-padded, from a tensor or a list of token lists.
    A right-padded mask is refused (its padding would sit between prompt and new tokens)."""
    if isinstance(prompts, Tensor):
        ids = prompts if prompts.dim() == 2 else prompts.unsqueeze(0)
        if ids.dtype not in (torch.int64, torch.int32):
            raise ConfigError(f"input_ids must be integer token ids, got {ids.dtype}")
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(ids.dtype)
        if mask.shape != ids.shape:
            raise ConfigError(f"attention_mask has shape {tuple(mask.shape)}, input_ids "
                              f"{tuple(ids.shape)}: they must match")
        if (mask[:, -1] == 0).any() and (mask.sum(-1) > 0).all():
            raise ConfigError("the attention mask pads on the right; decoders generate after "
                              "the last token, so pad prompts on the left (or pass a list of "
                              "token lists)")
        if (mask.sum(-1) == 0).any():
            raise ConfigError("a prompt has no tokens (its attention mask is all zeros)")
        return ids.long(), mask.long()
    if not prompts or not all(isinstance(p, (list, tuple)) and p for p in prompts):
        raise ConfigError("prompts must be a non-empty list of non-empty token-id lists")
    t = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), t), pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), t, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, t - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, t - len(p):] = 1
    return ids, mask


def positions(mask: Tensor) -> Tensor:
    """Each token's position counting real tokens only (padding gets 1, as in transformers)."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


def empty_cache(layout: CacheLayout, batch: int) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """A one-slot cache with nothing in it: what a prompt's step reads."""
    keys, values = layout.allocate(batch, 1)
    return torch.zeros(batch, 1, dtype=torch.bool), keys, values


PREFILL_CHUNK = 256  # prompt tokens per step when a prompt is prefilled in chunks


def prefill(step: Step, layout: CacheLayout, cache: KVCache, ids: Tensor, mask: Tensor,
            pos: Tensor) -> Tensor:
    """Run the prompt into `cache`; returns the last token's logits [B, V]. A prompt longer
    than `PREFILL_CHUNK` goes in chunks, each a step over the slots the chunks before it
    filled (chunked prefill): a step's attention scores are [chunk, filled] instead of
    [prompt, prompt], which bounds memory (batch 8 x 1,024 tokens on ONNX Runtime held 11.6 GB
    after one-shot prefills, 4.9 GB chunked) and skips the keys a chunk cannot see (causal:
    about half the one-shot attention work). Window and Keyformer caches get the same chunks
    through a staging cache of the whole prompt, then keep their share of it."""
    b, t = ids.shape
    if t <= PREFILL_CHUNK:
        logits, new_k, new_v, mass = step(ids, mask, pos, *empty_cache(layout, b))
        cache.fill(new_k, new_v, mass[:, -t:], pos, mask)
        return logits
    full = cache.policy.method == "full"
    # a bounded cache keeps a share of the prompt, chosen on the whole prompt's attention:
    # the chunks go into a staging cache of every prompt token, their attention mass summed
    # per key (the same column sums as one step over the prompt), then the policy chooses
    staging = cache if full else KVCache(layout, b, t, CachePolicy())
    total = None if full else torch.zeros(b, t)
    for start in range(0, t, PREFILL_CHUNK):
        end = min(t, start + PREFILL_CHUNK)
        past = empty_cache(layout, b) if start == 0 else (  # the slots filled so far
            staging.mask[:, :start], [k[:, :, :start] for k in staging.keys],
            [v[:, :, :start] for v in staging.values])
        logits, new_k, new_v, mass = step(ids[:, start:end], mask[:, start:end],
                                          pos[:, start:end], *past)
        staging.write(new_k, new_v, pos[:, start:end], mask[:, start:end], start)
        if total is not None:
            if start:
                total[:, :start] += mass[:, :start]
            total[:, start:end] += mass[:, -(end - start):]
    if not full:
        cache.fill(staging.keys, staging.values, total, pos, mask)
    return logits


def stream(step: Step, layout: CacheLayout, input_ids: Tensor, attention_mask: Tensor,
           cfg: Sampling, max_length: int, timing: Timing | None = None,
           decode: Step | None = None, policy: CachePolicy | None = None) -> Iterator[Tensor]:
    """Yield the next token of every sequence ([B] int64), step by step. `decode` (default
    `step`) runs the one-token steps, e.g. with the cache bound in place; `policy` bounds the
    cache (`optim.kv_cache`)."""
    cfg.check()
    policy = policy or CachePolicy()
    decode = decode or step
    b, t = input_ids.shape
    total = t + cfg.max_new_tokens
    if total > max_length:
        raise ConfigError(f"a prompt of {t} tokens plus max_new_tokens={cfg.max_new_tokens} "
                          f"needs {total} positions; this model holds {max_length} (its "
                          f"position table); shorten the prompt or generate fewer tokens")
    timing = timing if timing is not None else Timing()
    rng = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
    cache = KVCache(layout, b, policy.slots(t, cfg.max_new_tokens), policy, cfg.max_new_tokens)
    pos = positions(attention_mask)
    t0 = time.perf_counter()
    logits = prefill(step, layout, cache, input_ids, attention_mask, pos)
    timing.prefill_s = time.perf_counter() - t0
    timing.steps_s = []
    done = torch.zeros(b, dtype=torch.bool)
    stops = torch.tensor(cfg.stop_tokens, dtype=torch.long)
    next_pos = pos[:, -1:] + 1
    one = torch.ones(b, 1, dtype=torch.long)
    for i in range(cfg.max_new_tokens):
        token = choose(logits, cfg, rng)
        token = torch.where(done, torch.full_like(token, cfg.pad_token_id), token)
        yield token
        if len(stops):
            done |= torch.isin(token, stops)
        if bool(done.all()) or i == cfg.max_new_tokens - 1:
            return
        t0 = time.perf_counter()
        logits, new_k, new_v, mass = decode(token[:, None], one, next_pos, cache.mask,
                                            cache.keys, cache.values)
        cache.add(new_k, new_v, mass, next_pos[:, 0])
        next_pos = next_pos + 1
        timing.steps_s.append(time.perf_counter() - t0)


def teacher_forced(step: Step, layout: CacheLayout, ids: Tensor, prompt: int = 1,
                   policy: CachePolicy | None = None) -> Tensor:
    """Logits [B, T - prompt, V] predicting tokens prompt..T-1 of `ids` (no padding), through
    the cache as generation reads it: the first `prompt` tokens in one step, then one step per
    token, with the cache bounded by `policy`."""
    policy = policy or CachePolicy()
    b, t = ids.shape
    cache = KVCache(layout, b, policy.slots(prompt, t - prompt), policy, t - prompt)
    mask = torch.ones(b, prompt, dtype=torch.long)
    pos = positions(mask)
    out = [prefill(step, layout, cache, ids[:, :prompt], mask, pos).clone()]
    one = torch.ones(b, 1, dtype=torch.long)
    for i in range(prompt, t - 1):
        logits, new_k, new_v, mass = step(ids[:, i:i + 1], one, one * i, cache.mask,
                                          cache.keys, cache.values)
        cache.add(new_k, new_v, mass, one[:, 0] * i)
        out.append(logits.clone())
    return torch.stack(out, 1)


def choose(logits: Tensor, cfg: Sampling, rng: torch.Generator | None) -> Tensor:
    """The next token per row of [B, V] logits: argmax, or a draw after the processors."""
    if not cfg.do_sample:
        return logits.argmax(-1)
    scores = logits.float() / cfg.temperature
    if cfg.top_k is not None and cfg.top_k < scores.shape[-1]:
        kth = scores.topk(cfg.top_k, -1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if cfg.top_p is not None and cfg.top_p < 1:
        ordered, order = scores.sort(-1)  # ascending, as transformers' TopPLogitsWarper
        drop = ordered.softmax(-1).cumsum(-1) <= 1 - cfg.top_p
        drop[:, -1] = False  # the most likely token always stays
        scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return torch.multinomial(scores.softmax(-1), 1, generator=rng).squeeze(-1)


def perplexity(logits: Tensor, ids: Tensor) -> float:
    """exp(mean cross-entropy) of `logits` [B, n, V] against the last n tokens of `ids`."""
    n = logits.shape[1]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                           ids[:, -n:].reshape(-1))
    return float(torch.exp(ce))
