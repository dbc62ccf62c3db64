"""Latency measured here: interleaved runs of several candidates, medians and spread.

Machines are shared and noisy, so candidates are timed round-robin in one loop (A, B, A, B, …)
and every speedup is a ratio of medians taken in the same run.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from optim.ir import flatten_inputs

aten = torch.ops.aten


def machine() -> dict:
    """CPU name with family/model (an 'AMD EPYC' may be Zen 1 or Zen 3), ISA level, threads."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    cpu = fields.get("model name", platform.processor() or platform.machine())
    if "cpu family" in fields:
        cpu += f" (family {fields['cpu family']}, model {fields.get('model', '?')})"
    return {"cpu": cpu, "isa": torch.backends.cpu.get_cpu_capability(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}


def measure(candidates: dict[str, Callable[[], object]], *, warmup: int = 2, min_runs: int = 5,
            max_runs: int = 50, budget_s: float = 10.0, progress=None,
            keep_samples: bool = False) -> dict[str, dict]:
    """Time each zero-argument callable, interleaved; returns per-name stats in milliseconds
    (with every sample, `samples_ms`, when `keep_samples`)."""
    with torch.inference_mode():
        for fn in candidates.values():
            for _ in range(warmup):
                fn()
        times: dict[str, list[float]] = {k: [] for k in candidates}
        t_start = time.perf_counter()
        runs = 0
        while runs < max_runs and (runs < min_runs or time.perf_counter() - t_start < budget_s):
            for name, fn in candidates.items():
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1e3)
            runs += 1
            if progress:
                progress(runs)
    info = machine()
    out = {}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=10) if len(ts) >= 2 else [ts[0]] * 9
        out[name] = {"status": "measured", "median_ms": statistics.median(ts), "p10_ms": q[0],
                     "p90_ms": q[-1], "runs": len(ts), "threads": info["threads"],
                     "machine": f"{info['cpu']} ({info['cores']} cores)"}
        if keep_samples:
            out[name]["samples_ms"] = ts
    return out


def node_times(gm: torch.fx.GraphModule, args: tuple, kwargs: dict | None = None,
               runs: int = 5) -> dict[str, dict]:
    """Per-node profile of an FX graph measured here: for every call_function node, the median
    milliseconds over `runs` interpreted calls (after one warm-up call), the shapes of its tensor
    inputs, and its output's shape (None where it is not one tensor)."""
    times: dict[str, list[float]] = {}
    shapes: dict[str, tuple] = {}

    class Timed(torch.fx.Interpreter):
        def run_node(self, n):
            if n.op != "call_function":
                return super().run_node(n)
            t0 = time.perf_counter()
            out = super().run_node(n)
            times.setdefault(n.name, []).append((time.perf_counter() - t0) * 1e3)
            values = [self.env[a] for a in n.all_input_nodes]
            inputs = [tuple(v.shape) for v in values if isinstance(v, torch.Tensor)]
            shapes[n.name] = (inputs, tuple(out.shape) if isinstance(out, torch.Tensor) else None)
            return out

    flat = flatten_inputs(gm, args, kwargs or {})
    with torch.inference_mode():
        Timed(gm).run(*flat)
        times.clear()
        for _ in range(runs):
            Timed(gm).run(*flat)
    return {k: {"ms": statistics.median(ts), "inputs": shapes[k][0], "shape": shapes[k][1]}
            for k, ts in times.items()}


class GemmTimer(TorchDispatchMode):
    """Wall time (`ms`) and FLOPs (`flops`) of the matrix-product ops (aten mm, bmm, addmm,
    baddbmm) run under it, each timed inside the real call. CPU ops are synchronous; under
    `torch.inference_mode` a dispatch mode sees no ops, so run the code under `no_grad`."""

    GEMMS = frozenset({aten.mm, aten.bmm, aten.addmm, aten.baddbmm})

    def __init__(self):
        super().__init__()
        self.ms, self.flops = 0.0, 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket not in self.GEMMS:
            return func(*args, **(kwargs or {}))
        t0 = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        self.ms += (time.perf_counter() - t0) * 1e3
        a = args[1] if func.overloadpacket in (aten.addmm, aten.baddbmm) else args[0]
        self.flops += 2 * out.numel() * a.shape[-1]  # 2 · output elements · inner dimension
        return out
