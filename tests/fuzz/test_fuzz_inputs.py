"""Fuzzing the artifact boundary on all three backends: saved models (torch, onnxruntime, tvm)
called in a separate process with wrong dtypes, ranks and shapes, out-of-range token ids,
NaN and inf, missing and unexpected inputs. Each call returns outputs or raises a project
error; a crash of the process, a hang or another exception type fails the case (issue 23).
"""

from __future__ import annotations

import math

import pytest
import torch
from fuzzing import PROFILE, TALLY, examples
from hypothesis import given
from hypothesis import strategies as st
from input_worker import Worker

import optim
from optim import zoo

BACKENDS = ("torch", "onnxruntime", "tvm")
MODELS = ("bert", "vit") if PROFILE == "fuzz" else ("bert",)  # the suite: token ids only
DTYPES = [torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool, torch.float32,
          torch.float16, torch.float64, torch.bfloat16, torch.complex64]


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    saves = {}
    for name in MODELS:
        z = zoo.load(name)
        for backend in BACKENDS:
            om = optim.optimize(z.model, "cpu", z.example_args, pipeline="cleanup",
                                example_kwargs=z.example_kwargs, backend=backend,
                                measure_latency=False)
            path = tmp_path_factory.mktemp("inputs") / f"{name}-{backend}"
            om.save(path)
            saves[f"{name}/{backend}"] = str(path)
    w = Worker(saves)
    yield w
    w.close()


def _values(name, dtype, shape, draw) -> torch.Tensor:
    kind = draw(st.sampled_from(["typical"] * 5 + ["edge"]))
    if dtype.is_floating_point or dtype.is_complex:
        t = torch.randn(shape).to(dtype)
        if kind != "typical" and t.numel():
            fill = draw(st.sampled_from([math.nan, math.inf, -math.inf, 1e30, -1e30]))
            flat = t.view(-1) if t.is_contiguous() else t.reshape(-1)
            flat[draw(st.integers(0, t.numel() - 1))] = fill
        return t
    if dtype is torch.bool:
        return torch.rand(shape) > 0.5
    info = torch.iinfo(dtype)
    edge = draw(st.sampled_from([-1, 0, 511, 512, 1000, 2**31 - 1, 10**6, info.min, info.max]))
    if kind == "typical":
        return torch.randint(0, 2 if "mask" in name else 100, shape).to(dtype)
    return torch.full(shape, max(info.min, min(info.max, edge)), dtype=dtype)


def _rarely(common, rare, one_in: int = 8):
    return st.integers(0, one_in - 1).flatmap(lambda i: rare if i == 0 else common)


@st.composite
def cases(draw):
    """One call: model, backend, and inputs near the traced ones with one or more things
    changed (dtype, rank, size, values, names)."""
    model = draw(st.sampled_from(MODELS))
    backend = draw(st.sampled_from(BACKENDS))
    if model == "bert":
        names, dtypes, ranks = ["input_ids", "attention_mask"], [torch.int64] * 2, [2, 2]
    else:
        names, dtypes, ranks = ["pixel_values"], [torch.float32], [4]
    kwargs = {}
    batch = draw(_rarely(st.integers(1, 4), st.sampled_from([0, 1000])))
    seq = draw(_rarely(st.integers(1, 20), st.sampled_from([0, 513, 5000])))
    for name, dtype, rank in zip(names, dtypes, ranks):
        if draw(st.integers(0, 9)) == 0:
            continue  # left out
        if draw(st.integers(0, 7)) == 0:
            dtype = draw(st.sampled_from(DTYPES))
        if draw(st.integers(0, 9)) == 0:
            rank = draw(st.integers(0, 5))
        shape = ([batch, seq] if model == "bert" else [batch, 3, 32, 32])[:rank]
        shape += [draw(st.integers(0, 4)) for _ in range(rank - len(shape))]
        if draw(st.integers(0, 9)) == 0 and shape:
            shape[draw(st.integers(0, len(shape) - 1))] = draw(st.integers(0, 40))
        value = _values(name, dtype, shape, draw)
        if draw(st.integers(0, 15)) == 0:
            array = (value.float() if value.dtype is torch.bfloat16 else value).numpy()
            value = draw(st.sampled_from([None, 3, "x", [1, 2], array]))
        kwargs[name] = value
    if draw(st.integers(0, 9)) == 0:
        kwargs[draw(st.sampled_from(["token_type_ids", "labels", "x"]))] = torch.zeros(2, 4)
    positional = model == "vit" and "pixel_values" in kwargs and draw(st.booleans())
    args = (kwargs.pop("pixel_values"),) if positional else ()
    return f"{model}/{backend}", args, kwargs


def _describe(args, kwargs) -> str:
    def one(v):
        if isinstance(v, torch.Tensor):
            finite = bool(torch.isfinite(v).all()) if v.is_floating_point() and v.numel() \
                else True
            span = f" {v.min().item()}..{v.max().item()}" if v.numel() and not v.is_complex() \
                else ""
            return f"{v.dtype} {list(v.shape)}{span}{'' if finite else ' non-finite'}"
        return repr(v)[:40]
    return ", ".join([one(a) for a in args] + [f"{k}={one(v)}" for k, v in kwargs.items()])


@pytest.mark.slow
@examples(1.0)
@given(case=cases())
def test_inputs_at_the_artifact_boundary(worker, case):
    key, args, kwargs = case
    result = worker.call(key, args, kwargs)
    TALLY[f"inputs: {key}"][result[0] if result[0] != "optim" else result[1]] += 1
    what = f"{key} called with {_describe(args, kwargs)}"
    assert result[0] != "crash", f"{what}: the process died (exit code {result[1]})"
    assert result[0] != "hang", f"{what}: no answer in {result[1]} s"
    assert result[0] != "other", f"{what}: {result[1]}: {result[2]}"
    if result[0] == "optim":
        assert result[2].strip(), f"{what}: {result[1]} without a message"
