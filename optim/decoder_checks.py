"""A generation-optimized decoder checked and timed against the original model: greedy tokens
against transformers' `generate` (with the original's logit margin where they differ),
perplexity through the KV cache, and prefill and decode latency measured in one interleaved
run against `generate` eager."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from optim import generation
from optim.capture import weight_bytes
from optim.measure import measure
from optim.report import LatencyRow

if TYPE_CHECKING:
    from optim.decoder import OptimizedDecoder


def hf_generate(model, ids: Tensor, mask: Tensor, new_tokens: int, tokens: dict) -> Tensor:
    """Hugging Face greedy `generate` on the original model (its own attention and cache)."""
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                              do_sample=False, pad_token_id=tokens["pad"],
                              eos_token_id=tokens["eos"] or None)


def greedy_agreement(model, fast: OptimizedDecoder, ids: Tensor, mask: Tensor,
                     new_tokens: int) -> dict:
    """Greedy tokens against Hugging Face's on the same prompts. Where a sequence first differs,
    the original model's logit margin between its token and ours says whether that was a tie
    within float rounding (a margin near 1e-6) or a real change."""
    ref = hf_generate(model, ids, mask, new_tokens, fast.special_tokens)[:, ids.shape[1]:]
    ours = fast.generate(ids, new_tokens, attention_mask=mask)[:, ids.shape[1]:]
    n = min(ref.shape[1], ours.shape[1])
    same = (ref[:, :n] == ours[:, :n])
    first = [int((~row).nonzero()[0]) if (~row).any() else n for row in same]
    margins = [_margin(model, ids[i], mask[i], ref[i, :at], int(ref[i, at]), int(ours[i, at]))
               for i, at in enumerate(first) if at < n]
    return {"tokens": int(same.numel()), "agreement": float(same.float().mean()),
            "identical": bool(same.all()) and ref.shape == ours.shape,
            "first_difference": first, "margins_at_difference": margins,
            "against": "transformers generate (greedy), same prompts"}


def _margin(model, ids: Tensor, mask: Tensor, before: Tensor, theirs: int, ours: int) -> float:
    """The original model's logit of its greedy token minus that of ours, after `before`."""
    full = torch.cat([ids, before])[None]
    m = torch.cat([mask, torch.ones_like(before)])[None]
    with torch.no_grad():
        logits = model(input_ids=full, attention_mask=m,
                       position_ids=generation.positions(m)).logits[0, -1]
    return float(logits[theirs] - logits[ours])


def perplexities(model, fast: OptimizedDecoder, batches: list[Tensor]) -> dict:
    """Perplexity of the original (one forward) and the optimized model (through its cache)."""
    total = count = 0.0
    for ids in batches:
        with torch.no_grad():
            logits = model(input_ids=ids).logits[:, :-1]
        n = logits.shape[0] * logits.shape[1]
        total, count = total + math.log(generation.perplexity(logits, ids)) * n, count + n
    original = math.exp(total / count)
    optimized = fast.perplexity(batches)
    return {"original": original, "optimized": optimized,
            "relative_change": optimized / original - 1, "batches": len(batches),
            "tokens": int(count)}


def measure_generation(model, fast: OptimizedDecoder, ids: Tensor, mask: Tensor, new_tokens: int,
                       backend: str, say) -> tuple[list[LatencyRow], dict, dict]:
    """Interleaved: Hugging Face prefill and generate (eager, its dynamic cache) against ours;
    per-token latency is (generate - prefill) / (new tokens - 1) of the medians."""
    say("measuring generation (transformers eager vs optimized, interleaved)")
    n = max(new_tokens, 2)
    tokens = fast.special_tokens
    no_stop = {"stop_tokens": ()}
    pos = generation.positions(mask)
    empty = generation.empty_cache(fast.layout, ids.shape[0])

    def hf_gen():
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n,
                                  min_new_tokens=n, do_sample=False, pad_token_id=tokens["pad"])

    def hf_prefill():
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                         logits_to_keep=1)

    m = measure({"original prefill": hf_prefill,
                 "optimized prefill": lambda: fast._run(ids, mask, pos, *empty),
                 "original generate": hf_gen,
                 "optimized generate": lambda: fast.generate(ids, n, attention_mask=mask,
                                                             **no_stop)},
                min_runs=3, max_runs=20, budget_s=20.0)
    rows = [LatencyRow.measured(f"{k} ({n} tokens)" if "generate" in k else k,
                                "torch eager" if k.startswith("original") else backend, v)
            for k, v in m.items()]
    per = {who: (m[f"{who} generate"]["median_ms"] - m[f"{who} prefill"]["median_ms"]) / (n - 1)
           for who in ("original", "optimized")}
    b = ids.shape[0]
    measured = {"batch": b, "prompt_tokens": ids.shape[1], "new_tokens": n,
                **{f"{who}_{k}": v for who in per for k, v in {
                    "ttft_ms": round(m[f"{who} prefill"]["median_ms"], 3),
                    "per_token_ms": round(per[who], 3),
                    "tokens_per_s": round(b * 1e3 / per[who], 1) if per[who] > 0 else None
                }.items()},
                "memory": {"weights_bytes": weight_bytes(fast.step.graph),
                           "cache_bytes": fast.layout.bytes_per_token() * b
                           * (ids.shape[1] + n)}}
    speedup = {"decode_tokens_per_s": per["original"] / per["optimized"],
               "time_to_first_token": m["original prefill"]["median_ms"]
               / m["optimized prefill"]["median_ms"],
               "basis": "ratio of medians measured in the same interleaved run"}
    return rows, speedup, measured
