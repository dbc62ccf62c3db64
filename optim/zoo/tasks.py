"""Task-level fidelity: what a user of the model would notice, measured on real data."""

from __future__ import annotations

from collections.abc import Callable

import torch

from optim.numerics import embedding_fidelity, mean_pool


def sentence_batches(tokenizer, sentences: list[str], batch: int,
                     seq: int) -> list[tuple[tuple, dict]]:
    """Tokenized `(args, kwargs)` batches of exactly `batch` × `seq` (static shapes)."""
    out = []
    for i in range(0, len(sentences) - batch + 1, batch):
        enc = tokenizer(sentences[i:i + batch], padding="max_length", truncation=True,
                        max_length=seq, return_tensors="pt")
        out.append(((), {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}))
    return out


def sentence_embedding_fidelity(batches: list[tuple[tuple, dict]]) -> Callable:
    """Mean-pooled, normalised sentence embeddings of original vs optimized: cosine per sentence
    (mean, min) and nearest-neighbour agreement across all sentences."""

    def metric(original: Callable, optimized: Callable) -> dict:
        ref, got = [], []
        for args, kwargs in batches:
            mask = kwargs["attention_mask"]
            ref.append(mean_pool(_hidden(original(*args, **kwargs)), mask))
            got.append(mean_pool(_hidden(optimized(*args, **kwargs)), mask))
        return embedding_fidelity(torch.cat(ref), torch.cat(got))

    return metric


def _hidden(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    return out[0]
