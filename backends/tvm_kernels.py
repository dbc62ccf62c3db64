"""Kernels no library ships, written in TVM (TE → TIR) and scheduled for this CPU.

- `binary_matmul`: sign-binarized operands packed 64 per uint64 word; the dot product of two
  ±1 rows of length K is `K - 2·popcount(a XOR b)`, so one XOR and one POPCNT do 64
  multiply-adds. Output `(K - 2·popcount) · a_scale[m] · w_scale[n]` (per-row scales).
  Schedule: 2×4 output register block, the word loop outside it (each A word feeds 4 outputs,
  each weight word 2), rows in parallel over the cores.
- `int8_matmul`: int8 × int8 → int32 accumulation, tiled with the output vectorized over AVX2.

Kernels are compiled once per shape and cached for the process. Both take `(rows, K)` layouts:
activations `[M, K]`, weights `[N, K]` (like `torch.nn.Linear`).
"""

from __future__ import annotations

import os
from functools import lru_cache

import numpy as np
import torch

from optim.errors import ConfigError

WORD = 64


def pack_signs(x: torch.Tensor) -> tuple[np.ndarray, int]:
    """Rows of `x` [R, K] as sign bits (1 = x >= 0) packed into uint64 words [R, ceil(K/64)].
    Padding bits are 0 in every operand, so they never count as a mismatch."""
    if x.dim() != 2:
        raise ConfigError(f"pack_signs takes a 2-D [rows, K] tensor, got shape {tuple(x.shape)}")
    rows, k = x.shape
    bits = (x.detach().cpu().numpy() >= 0).astype(np.uint8)
    words = -(-k // WORD)
    padded = np.zeros((rows, words * WORD), np.uint8)
    padded[:, :k] = bits
    packed = np.packbits(padded, axis=1, bitorder="little")  # [rows, words * 8] bytes
    return np.ascontiguousarray(packed).view(np.uint64), k


def _target():
    import tvm

    from backends.tvm import host_target

    return tvm.target.Target({**host_target(), "mattr": ["+popcnt"]})


def _contraction(m: int, n: int, k: int, dtype: str, term):
    """Schedule for `c[i, j] = sum_r term(a[i, r], b[j, r])` (int32) over a [m, k], b [n, k];
    returns the schedule, its block and the (i, j, r) loops."""
    from tvm import te
    from tvm.s_tir import Schedule

    a = te.placeholder((m, k), dtype, name="a")
    b = te.placeholder((n, k), dtype, name="b")
    r = te.reduce_axis((0, k), name="r")
    c = te.compute((m, n), lambda i, j: te.sum(term(a[i, r], b[j, r]), axis=r), name="c")
    sch = Schedule(te.create_prim_func([a, b, c]))
    blk = sch.get_sblock("c")
    return sch, blk, sch.get_loops(blk)


@lru_cache(maxsize=64)
def _binary_kernel(m: int, n: int, words: int):
    import tvm
    import tvm.tirx as tir

    sch, blk, (i, j, kk) = _contraction(
        m, n, words, "uint64", lambda x, w: tir.popcount(x ^ w).astype("int32"))
    io, ii = sch.split(i, [None, 2])
    jo, ji = sch.split(j, [None, 4])
    sch.reorder(io, jo, kk, ii, ji)
    sch.parallel(io)
    for loop in (kk, ii, ji):
        sch.unroll(loop)
    sch.decompose_reduction(blk, kk)
    return tvm.compile(sch.mod, target=_target())


def binary_mismatches(a_bits: np.ndarray, w_bits: np.ndarray) -> np.ndarray:
    """popcount(a XOR w) for every (row of a, row of w): int32 [M, N]."""
    if a_bits.shape[1] != w_bits.shape[1]:
        raise ConfigError(f"packed widths differ: {a_bits.shape[1]} vs {w_bits.shape[1]} words")
    m, n, words = a_bits.shape[0], w_bits.shape[0], a_bits.shape[1]
    fn = _binary_kernel(m, n, words)
    out = _empty((m, n))
    fn(_view(torch.from_numpy(a_bits)), _view(torch.from_numpy(w_bits)), out)
    return torch.from_dlpack(out).numpy()


def _view(t: torch.Tensor):
    """A TVM tensor sharing `t`'s memory (DLPack), or a copy when `t` is not 64-byte aligned."""
    import tvm

    t = t.contiguous()
    if t.data_ptr() % 64 == 0:
        return tvm.runtime.from_dlpack(t)
    return tvm.runtime.tensor(t.numpy(), tvm.cpu())


def _empty(shape: tuple):
    """An aligned TVM output tensor (int32); torch reads it back without a copy (DLPack)."""
    import tvm

    return tvm.runtime.empty(shape, "int32", tvm.cpu())


def binary_matmul(a_bits: np.ndarray, w_bits: np.ndarray, k: int,
                  a_scale: torch.Tensor | None = None,
                  w_scale: torch.Tensor | None = None) -> torch.Tensor:
    """sign(A)·sign(W)ᵀ scaled: `(K - 2·popcount) · a_scale[:, None] · w_scale[None, :]`."""
    dots = torch.from_numpy(k - 2 * binary_mismatches(a_bits, w_bits)).float()
    if a_scale is not None:
        dots = dots * a_scale.reshape(-1, 1)
    if w_scale is not None:
        dots = dots * w_scale.reshape(1, -1)
    return dots


@lru_cache(maxsize=64)
def _int8_kernel(m: int, n: int, k: int):
    import tvm

    sch, blk, (i, j, rr) = _contraction(
        m, n, k, "int8", lambda x, w: x.astype("int32") * w.astype("int32"))
    io, ii = sch.split(i, [None, 4])
    jo, ji = sch.split(j, [None, 16])
    ro, ri = sch.split(rr, [None, 4])
    sch.reorder(io, jo, ro, ri, ii, ji)
    sch.parallel(io)
    sch.unroll(ri)
    sch.unroll(ii)
    sch.vectorize(ji)
    sch.decompose_reduction(blk, ro)
    return tvm.compile(sch.mod, target=_target())


def int8_matmul(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """int8 [M, K] × int8 [N, K]ᵀ → int32 [M, N], accumulated exactly in int32."""
    if a.dtype != torch.int8 or w.dtype != torch.int8 or a.shape[1] != w.shape[1]:
        raise ConfigError(f"int8_matmul takes int8 [M, K] and int8 [N, K], got {a.dtype} "
                          f"{tuple(a.shape)} and {w.dtype} {tuple(w.shape)}")
    m, k = a.shape
    n = w.shape[0]
    out = _empty((m, n))
    _int8_kernel(m, n, k)(_view(a), _view(w), out)
    return torch.from_dlpack(out)
