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
