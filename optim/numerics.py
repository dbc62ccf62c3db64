"""Fidelity metrics: how far an optimized model's outputs are from the original's."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils import _pytree as pytree


def tensor_leaves(out: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out)
            if isinstance(t, torch.Tensor) and t.is_floating_point()]


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10·log10(‖ref‖² / ‖ref − test‖²)."""
    ref, test = ref.double(), test.double()
    noise = (ref - test).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if noise == 0:
        return math.inf
    return 10 * math.log10(max(signal, 1e-300) / noise)


def compare(ref_out: Any, test_out: Any,
            token_mask: torch.Tensor | None = None) -> dict[str, float]:
    """Max abs error, mean cosine over rows of the last axis, and SQNR, over all float outputs.

    `token_mask` ([B, L], 1 = real token) drops padded positions from outputs shaped [B, L, ...]:
    what a model computes there is never read, so it would only add noise.
    """
    refs, tests = tensor_leaves(ref_out), tensor_leaves(test_out)
    if token_mask is not None:
        keep = token_mask.bool()
        refs = [r[keep] if r.shape[:2] == keep.shape else r for r in refs]
        tests = [t[keep] if t.shape[:2] == keep.shape else t for t in tests]
    if len(refs) != len(tests):
        raise ValueError(f"output structure changed: {len(refs)} tensors vs {len(tests)}")
    max_abs, cos, sq = 0.0, [], []
    for r, t in zip(refs, tests):
        if r.shape != t.shape:
            raise ValueError(f"output shape changed: {tuple(r.shape)} vs {tuple(t.shape)}")
        r, t = r.detach().float(), t.detach().float()
        max_abs = max(max_abs, (r - t).abs().max().item() if r.numel() else 0.0)
        rows_r, rows_t = (r.reshape(-1, r.shape[-1] if r.dim() else 1),
                          t.reshape(-1, t.shape[-1] if t.dim() else 1))
        cos.append(torch.nn.functional.cosine_similarity(rows_r, rows_t, dim=-1, eps=1e-12))
        sq.append(sqnr_db(r, t))
    cos_all = torch.cat(cos) if cos else torch.ones(1)
    return {"max_abs_error": max_abs, "cosine_mean": cos_all.mean().item(),
            "cosine_min": cos_all.min().item(), "sqnr_db": min(sq) if sq else math.inf}


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence-transformers mean pooling followed by L2 normalisation."""
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def embedding_fidelity(ref: torch.Tensor, test: torch.Tensor) -> dict[str, float]:
    """Compare two [N, D] sets of normalised sentence embeddings.

    cosine: per-sentence cosine between the two embeddings of the same sentence.
    neighbour_agreement: share of sentences whose nearest other sentence is the same under both.
    """
    cos = (ref * test).sum(-1) / (ref.norm(dim=-1) * test.norm(dim=-1)).clamp(min=1e-12)
    def nearest(e):
        s = e @ e.T
        s.fill_diagonal_(-math.inf)
        return s.argmax(-1)
    agree = (nearest(ref) == nearest(test)).float().mean().item() if len(ref) > 1 else 1.0
    return {"sentences": len(ref), "cosine_mean": cos.mean().item(),
            "cosine_min": cos.min().item(), "neighbour_agreement": agree}
