"""The KV cache a generation runs on, and the policies that bound it.

`KVCache` holds a fixed number of slots per sequence: keys and values per layer
([batch, kv_heads, slots, head_dim]), which slots hold a token (`mask`), each token's position
and its accumulated score. A new token goes into a free slot; when none is free, the policy
evicts one. Attention does not care where a token sits: positions are already in the keys
(rotary) or the hidden states (learned), so a slot is reused in place, nothing is compacted.

Policies (`CachePolicy.method`):
- `full`: a slot for every token (prompt + new tokens); nothing is evicted.
- `window`: the first `sinks` tokens (attention sinks, StreamingLLM) and the most recent ones.
- `keyformer`: the most recent `recent` share of the budget, and the key tokens: those with the
  highest accumulated Keyformer score, softmax((log a + g) / τ) of the attention a each token
  received at each step (summed over layers and heads), with Gumbel noise g and τ rising from
  τ_init to τ_end over the generation (Adnan et al., Keyformer, MLSys 2024). The prompt's
  tokens are scored on the prompt's own attention, then cut to the budget.
The budget is a share of the prompt (a float, Keyformer's convention) or a token count (int).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from optim.decoder_steps import CacheLayout
from optim.errors import ConfigError


@dataclass(frozen=True)
class CachePolicy:
    method: Literal["full", "window", "keyformer"] = "full"
    budget: float | int = 1.0  # a share of the prompt (float) or tokens (int)
    recent: float = 0.5  # keyformer: share of the budget kept for the most recent tokens
    sinks: int = 4  # window: the first tokens, always kept
    tau: tuple[float, float] = (1.0, 2.0)  # keyformer: temperature at the first and last step
    seed: int = 0  # keyformer: Gumbel noise

    def check(self) -> CachePolicy:
        if self.method not in ("full", "window", "keyformer"):
            raise ConfigError(f"cache method {self.method!r} is not one of full, window, "
                              f"keyformer")
        if isinstance(self.budget, bool) or not (
                isinstance(self.budget, int) and self.budget >= 2
                or isinstance(self.budget, float) and 0 < self.budget <= 1):
            raise ConfigError(f"cache budget must be a share of the prompt in (0, 1] or a "
                              f"token count >= 2, got {self.budget!r}")
        if not 0 < self.recent < 1:
            raise ConfigError(f"cache recent must be in (0, 1), got {self.recent!r}")
        return self

    def slots(self, prompt: int, new_tokens: int) -> int:
        """Slots per sequence for a prompt of `prompt` tokens and `new_tokens` more."""
        if self.method == "full":
            return prompt + new_tokens
        budget = self.budget if isinstance(self.budget, int) else round(self.budget * prompt)
        return max(2, min(budget, prompt + new_tokens))

    @classmethod
    def parse(cls, value) -> CachePolicy:
        if value is None:
            return cls()
        if isinstance(value, CachePolicy):
            return value.check()
        if isinstance(value, dict):
            unknown = set(value) - set(cls.__dataclass_fields__)
            if unknown:
                raise ConfigError(f"cache: unknown options {sorted(unknown)}; it takes "
                                  f"{sorted(cls.__dataclass_fields__)}")
            return cls(**value).check()
        raise ConfigError(f"cache must be a CachePolicy or a dict, got {type(value).__name__}")


class KVCache:
    """The slots of one generation (see the module docstring)."""

    def __init__(self, layout: CacheLayout, batch: int, slots: int, policy: CachePolicy,
                 steps: int = 1):
        self.policy, self.steps, self.step_no = policy, max(steps, 1), 0
        self.keys, self.values = layout.allocate(batch, slots)
        self.mask = torch.zeros(batch, slots, dtype=torch.bool)
        self.position = torch.full((batch, slots), -1, dtype=torch.long)
        self.score = torch.zeros(batch, slots)
        self.rng = torch.Generator().manual_seed(policy.seed)

    @property
    def slots(self) -> int:
        return self.mask.shape[1]

    def fill(self, new_k, new_v, mass: Tensor, positions: Tensor, real: Tensor) -> None:
        """Write a prompt's keys and values (`real` [B, T]: its tokens, not padding), keeping
        at most `slots` per sequence as the policy chooses."""
        b, t = real.shape
        real = real.bool()
        score = self._score(mass, real) if self.policy.method == "keyformer" else \
            torch.zeros(b, t)
        keep = select(real, positions, score, self.slots, self.policy)  # [B, kept] indices
        kept_ok = torch.gather(real, 1, keep)
        n = keep.shape[1]
        rows = torch.arange(b)[:, None]
        for cache, new in zip(self.keys + self.values, list(new_k) + list(new_v)):
            cache[:, :, :n] = new.permute(0, 2, 1, 3)[rows, keep].permute(0, 2, 1, 3)
        self.mask[:, :n] = kept_ok
        self.position[:, :n] = torch.where(kept_ok, torch.gather(positions, 1, keep), -1)
        self.score[:, :n] = torch.gather(score, 1, keep) * kept_ok

    def write(self, new_k, new_v, positions: Tensor, real: Tensor, start: int) -> None:
        """Write a block of T tokens into slots start..start + T - 1 as they are (a chunk of a
        prompt into the full cache: nothing is chosen or evicted)."""
        t = real.shape[1]
        if start + t > self.slots:
            raise ConfigError(f"the KV cache has {self.slots} slots; cannot write tokens "
                              f"{start}..{start + t - 1}")
        for cache, new in zip(self.keys + self.values, list(new_k) + list(new_v)):
            cache[:, :, start:start + t] = new
        real = real.bool()
        self.mask[:, start:start + t] = real
        self.position[:, start:start + t] = torch.where(real, positions, -1)
        self.score[:, start:start + t] = 0

    def add(self, new_k, new_v, mass: Tensor, position: Tensor) -> None:
        """Write one new token per sequence (after a decode step that read this cache; `mass`
        [B, slots + 1] is the attention each slot and the new token received)."""
        if self.policy.method == "keyformer":
            step = self._score(mass, torch.cat([self.mask, torch.ones_like(self.mask[:, :1])],
                                               1))
            self.score += step[:, :-1] * self.mask
            new_score = step[:, -1]
        else:
            new_score = torch.zeros(self.mask.shape[0])
        slot = self._victims()
        rows = torch.arange(self.mask.shape[0])
        for cache, new in zip(self.keys + self.values, list(new_k) + list(new_v)):
            cache[rows, :, slot] = new[:, :, 0]
        self.mask[rows, slot] = True
        self.position[rows, slot] = position
        self.score[rows, slot] = new_score
        self.step_no += 1

    def _victims(self) -> Tensor:
        """Per sequence, the slot the next token goes into: a free one, else the policy's."""
        free = ~self.mask
        first_free = free.float().argmax(1)
        if bool(free.any(1).all()):
            return first_free
        p = self.policy
        if p.method == "full":
            raise ConfigError("the KV cache is full")  # sized for every token: never happens
        recent = _recent(self.position, self.mask, self._recent_count())
        if p.method == "window":  # the oldest token that is neither a sink nor recent
            order = torch.where(recent | (self.position < p.sinks) | ~self.mask,
                                torch.iinfo(torch.long).max, self.position)
            victim = order.argmin(1)
        else:  # the lowest accumulated score outside the recent window
            victim = torch.where(recent, torch.inf, self.score).argmin(1)
        return torch.where(free.any(1), first_free, victim)

    def _recent_count(self) -> int:
        """Cached tokens that count as recent (the incoming token is the most recent one)."""
        p = self.policy
        if p.method == "window":
            return max(0, self.slots - p.sinks - 1)
        return max(0, round(p.recent * self.slots) - 1)

    def _score(self, mass: Tensor, valid: Tensor) -> Tensor:
        """Keyformer's score of one step: softmax((log a + g) / τ) over the valid keys."""
        lo, hi = self.policy.tau
        tau = lo + (hi - lo) * min(self.step_no / max(self.steps - 1, 1), 1.0)
        u = torch.rand(mass.shape, generator=self.rng).clamp_(1e-9, 1 - 1e-9)
        gumbel = -torch.log(-torch.log(u))
        logits = (torch.log(mass.clamp(min=1e-30)) + gumbel) / tau
        return torch.softmax(logits.masked_fill(~valid, float("-inf")), -1).nan_to_num_(0.0)


def select(real: Tensor, positions: Tensor, score: Tensor, budget: int,
           policy: CachePolicy) -> Tensor:
    """Indices [B, min(budget, T)] of the prompt tokens to keep, per sequence: every real
    token when they fit; else the policy's choice (recent and sinks, or recent and the best
    scored). Padding is never chosen while a real token is left out."""
    b, t = real.shape
    n = min(budget, t)
    if policy.method == "full" or t <= budget:
        return torch.arange(t - n, t).expand(b, n)
    if policy.method == "window":
        keep = _recent(positions, real, n - policy.sinks) | (real & (positions < policy.sinks))
    else:
        recent = _recent(positions, real, max(1, round(policy.recent * n)))
        rest = torch.where(recent | ~real, -torch.inf, score)
        top = rest.topk(n - int(recent.sum(1).max()), 1).indices
        keep = recent.clone()
        keep.scatter_(1, top, torch.gather(real & ~recent, 1, top))
    # real tokens first (in order), then fill with the rest so every row has n indices
    order = torch.argsort((~keep).float() * 2 + (~real).float(), dim=1, stable=True)
    return order[:, :n].sort(1).values


def _recent(positions: Tensor, valid: Tensor, count: int) -> Tensor:
    """[B, S] bool: the `count` valid entries with the highest positions, per row."""
    ranked = torch.where(valid, positions, -1)
    count = max(0, min(count, ranked.shape[1]))
    if count == 0:
        return torch.zeros_like(valid)
    cut = ranked.topk(count, 1).values[:, -1:]
    return valid & (ranked >= cut)
