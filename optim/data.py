"""Small real data that ships with installed packages; nothing is downloaded.

- `sentences()`: English prose from the Python reference manual (`pydoc_data.topics`, part of
  every CPython install), split into sentences and filtered to look like prose.
- `digits()`: scikit-learn's bundled 8×8 handwritten digits, with a fixed stratified split.
"""

from __future__ import annotations

import random
import re

import torch

_CODEY = re.compile(r"[{}\[\]<>=|\\`_*#@$~^]|>>>|::|\(\)|\.\.\.|\bdef\b|\breturn\b")


def _all_sentences() -> list[str]:
    from pydoc_data.topics import topics

    out, seen = [], set()
    for key in sorted(topics):
        text = re.sub(r"\s+", " ", topics[key])
        for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
            s = s.strip()
            words = s.split()
            if not (6 <= len(words) <= 40) or not s.endswith(".") or _CODEY.search(s):
                continue
            if sum(w.isalpha() for w in words) < 0.7 * len(words) or not s[0].isupper():
                continue
            if s not in seen:
                seen.add(s)
                out.append(s)
    return out


def sentences(n: int = 256, seed: int = 0) -> list[str]:
    """`n` distinct real English sentences, the same for the same seed."""
    pool = _all_sentences()
    if n > len(pool):
        raise ValueError(f"only {len(pool)} sentences are available, asked for {n}")
    return random.Random(seed).sample(pool, n)


def digits(split: str = "train", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn digits as ([N, 1, 8, 8] float32 in [0, 1], [N] int64), stratified 80/20."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    idx = list(range(len(y)))
    tr, te = train_test_split(idx, test_size=0.2, random_state=seed, stratify=d.target)
    sel = torch.tensor(tr if split == "train" else te)
    return x[sel], y[sel]
