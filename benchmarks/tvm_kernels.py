"""TVM custom kernels vs the fp32 matmul of the same shape, timed interleaved in one run.

    python benchmarks/tvm_kernels.py

Rows are transformer-sized linear layers (M tokens x K in -> N out). `binary` is the XNOR/
popcount kernel (scales and bias applied) on operands already packed (weights are packed once,
offline); packing the activations (x − τ → bits, β) is timed separately, and `binary op` is
the whole `optim::linear_binary` a binarized model runs (pack + kernel). `int8` is the plain
int8 x int8 -> int32 TIR kernel.
"""

from __future__ import annotations

import os

# TVM's worker threads spin after each call by default; in an interleaved run they would steal
# the cores from the fp32 matmul that runs next and flatter the ratio
os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")
# and torch's OpenMP workers spin after each GEMM unless told not to: the TVM kernel timed next
# would share the 2 cores with them (measured: 2.3x instead of 5.7x for the same kernel)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import statistics
import time

import numpy as np  # noqa: E402
import torch  # noqa: E402
from rich.console import Console
from rich.table import Table

import optim.ops  # noqa: F401,E402  (registers torch.ops.optim)
from optim.bits import group_mean_abs, pack_bits  # noqa: E402
from optim.kernels import _int8_kernel, binary_linear, int8_matmul, pack_rows  # noqa: E402

SHAPES = [(1024, 384, 1536), (1024, 1536, 384), (128, 768, 3072), (1024, 768, 768)]


def _timed(fns: dict, runs: int = 25) -> dict:
    for f in fns.values():
        f()
    out = {k: [] for k in fns}
    for _ in range(runs):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            out[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in out.items()}


def main() -> None:
    torch.manual_seed(0)
    t = Table(title=f"TVM kernels vs fp32 matmul (torch {torch.__version__}, "
                    f"{torch.get_num_threads()} threads; medians of 25 interleaved runs)")
    for c in ("M x K -> N", "fp32 torch ms", "binary kernel ms", "kernel speedup",
              "pack activations ms", "binary op ms", "op speedup", "int8 TVM ms", "int8 speedup"):
        t.add_column(c)
    for m, k, n in SHAPES:
        x, w, b = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
        tau = torch.zeros(k)
        wb, alpha = pack_bits(w).T.contiguous(), group_mean_abs(w, 1)
        xb, beta = pack_rows(x, tau)
        xq = torch.randint(-127, 128, (m, k), dtype=torch.int8)
        wq = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        _int8_kernel(m, n, k)  # compile outside the timing
        op = torch.ops.optim.linear_binary
        r = _timed({"fp32": lambda: torch.nn.functional.linear(x, w, b),
                    "binary": lambda: binary_linear(xb, wb, k, beta, alpha, b),
                    "pack": lambda: pack_rows(x, tau), "op": lambda: op(x, wb, alpha, b, tau, k),
                    "int8": lambda: int8_matmul(xq, wq)})
        t.add_row(f"{m} x {k} -> {n}", f"{r['fp32']:.2f}", f"{r['binary']:.2f}",
                  f"{r['fp32'] / r['binary']:.1f}x", f"{r['pack']:.2f}", f"{r['op']:.2f}",
                  f"{r['fp32'] / r['op']:.1f}x", f"{r['int8']:.2f}",
                  f"{r['fp32'] / r['int8']:.2f}x")
    Console(width=160).print(t)


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
