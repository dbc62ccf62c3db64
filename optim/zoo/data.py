"""Small real data that ships with installed packages; nothing is downloaded.

- `sentences()`: English prose from the Python reference manual (`pydoc_data.topics`, part of
  every CPython install) and scikit-learn's dataset descriptions (`sklearn/datasets/descr/*.rst`),
  split into sentences and filtered to look like prose.
- `digits()`: scikit-learn's bundled 8x8 handwritten digits, with a fixed stratified 80/20 split.

Both are deterministic for a given seed and installed package versions.
"""

from __future__ import annotations

import functools
import importlib.util
import random
import re
from pathlib import Path

import torch

# Characters and tokens that mark code, markup or tables rather than prose.
_CODEY = re.compile(
    r"[{}\[\]<>=|\\`_*#@$~^]|>>>|::|\(\)|\.\.\.|\bdef\b|\breturn\b|https?:|www\.|\.rst\b|\.py\b|\s-\w\b"
)
# A sentence ends at . ! or ? followed by space and a capital, unless the full stop closes an
# initial ("R.A. Fisher") or a common abbreviation.
_SPLIT = re.compile(r"(?<!\b[A-Z]\.)(?<!e\.g\.)(?<!i\.e\.)(?<!\bvs\.)(?<!\bal\.)(?<=[.!?])\s+"
                    r"(?=[\"“]?[A-Z])")
_GLUED = re.compile(r"[a-z]\.[A-Z]")  # "details.Changing": two sentences with no space
_META = ("See also", "Changed in version", "Added in version", "New in version", "Deprecated")


def _prose_paragraphs_rst(text: str) -> list[str]:
    """Paragraphs of an .rst file that are running text (no lists, fields, tables, directives)."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        lines = para.split("\n")
        if not lines or not lines[0].strip() or lines[0][0].isspace():
            continue  # indented: block quote, directive body or reference list
        if lines[0].lstrip().startswith(("-", ":", "..", "*", "|", "=")):
            continue
        if any(re.fullmatch(r"[-=~^*]{3,}", ln.strip()) for ln in lines):
            continue  # a heading or a table
        out.append(para)
    return out


def _sources() -> list[str]:
    """Raw texts, in a fixed order: Python reference topics, then sklearn dataset DESCRs."""
    from pydoc_data.topics import topics

    texts = [topics[k] for k in sorted(topics)]
    spec = importlib.util.find_spec("sklearn")  # locate the files without importing sklearn
    if spec is not None and spec.origin is not None:
        descr = Path(spec.origin).parent / "datasets" / "descr"
        for f in sorted(descr.glob("*.rst")):
            texts.extend(_prose_paragraphs_rst(f.read_text(encoding="utf-8")))
    return texts


def _is_prose(s: str) -> bool:
    words = s.split()
    if not (6 <= len(words) <= 40) or not s.endswith(".") or not s[0].isupper():
        return False
    if _CODEY.search(s) or _GLUED.search(s) or s.startswith(_META):
        return False
    if re.fullmatch(r"[\d.()]+", words[-1]):  # a list marker ("... sequences. 3.")
        return False
    alpha = sum(w.strip(".,;:!?\"'()‘’“”").isalpha() for w in words)
    return alpha >= 0.8 * len(words)


@functools.lru_cache(maxsize=1)
def _pool() -> tuple[str, ...]:
    out: dict[str, None] = {}  # ordered set
    for text in _sources():
        for s in _SPLIT.split(re.sub(r"\s+", " ", text)):
            s = s.strip()
            if _is_prose(s):
                out.setdefault(s)
    return tuple(out)


def sentences(n: int = 256, seed: int = 0) -> list[str]:
    """`n` distinct real English sentences, the same for the same seed.

    The pool is shuffled with `seed` and the first `n` are returned, so `sentences(8)` is a
    prefix of `sentences(512)`. Raises `ValueError` if `n` exceeds the pool (about 770 sentences).
    """
    pool = list(_pool())
    if not 0 <= n <= len(pool):
        raise ValueError(f"n must be in [0, {len(pool)}] (sentences available), got {n}")
    random.Random(seed).shuffle(pool)
    return pool[:n]


def digits(split: str = "train", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn digits as ([N, 1, 8, 8] float32 in [0, 1], [N] int64).

    The split is stratified 80/20 (1437 train, 360 test images) and fixed by `seed`.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    tr, te = train_test_split(list(range(len(y))), test_size=0.2, random_state=seed,
                              stratify=d.target)
    sel = torch.tensor(tr if split == "train" else te)
    return x[sel].contiguous(), y[sel].contiguous()
