"""Real bundled data: sentences from installed docs, sklearn digits."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import sklearn
import torch

from optim.zoo import data


def _source_text() -> str:
    from pydoc_data.topics import topics

    descr = Path(sklearn.__file__).parent / "datasets" / "descr"
    texts = list(topics.values()) + [f.read_text() for f in descr.glob("*.rst")]
    return re.sub(r"\s+", " ", " ".join(texts))


def test_sentences_real_distinct_deterministic() -> None:
    s = data.sentences(512)
    assert len(s) == 512 and len(set(s)) == 512
    assert s == data.sentences(512)
    assert data.sentences(8) == s[:8]
    assert data.sentences(8, seed=1) != data.sentences(8, seed=0)
    assert len(data.sentences()) == 256
    source = _source_text()
    assert all(x in source for x in s)  # verbatim from installed package text


def test_sentences_look_like_prose() -> None:
    for x in data.sentences(512, seed=3):
        assert x.endswith(".") and 6 <= len(x.split()) <= 40
        assert x[0].isupper()
        assert not any(t in x for t in (">>>", "::", "{", "}", "`", "http"))


def test_sentences_too_many() -> None:
    with pytest.raises(ValueError, match="sentences available"):
        data.sentences(100_000)


def test_digits_split() -> None:
    x, y = data.digits("train")
    xt, yt = data.digits("test")
    assert x.shape == (1437, 1, 8, 8) and xt.shape == (360, 1, 8, 8)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert set(y.tolist()) == set(yt.tolist()) == set(range(10))
    # stratified: each class is about 20% test
    counts, tcounts = torch.bincount(y, minlength=10), torch.bincount(yt, minlength=10)
    assert ((tcounts / (counts + tcounts) - 0.2).abs() < 0.02).all()
    x2, y2 = data.digits("train")
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(data.digits("test", seed=1)[1], yt)


def test_digits_bad_split() -> None:
    with pytest.raises(ValueError, match="'train' or 'test'"):
        data.digits("val")
