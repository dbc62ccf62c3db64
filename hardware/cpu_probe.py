"""The `cpu` target: this machine, detected (cores, ISA, caches, memory) and measured (achieved
fp32 and int8 GEMM rate, streaming-read and copy bandwidth). Measured once per machine and
cached as JSON under `$OPTIM_CACHE_DIR` (default `~/.cache/optim`); `refresh=True` measures
again.

The peaks are achieved rates of the kernels the backends call (oneDNN/MKL fp32 GEMM, oneDNN
u8s8 GEMM), so the spec's large-GEMM efficiency is 1 by construction.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from pathlib import Path

import torch

from optim.files import write_json
from optim.kernels import binary_linear
from optim.ops import _packed

PROBE_VERSION = 3  # bump when measure() changes, so cached probes are measured again
GEMM_N = 1024
COPY_BYTES = 256 * 2**20


def cache_dir() -> Path:
    return Path(os.environ.get("OPTIM_CACHE_DIR", Path.home() / ".cache" / "optim"))


def _cpuinfo() -> dict:
    info: dict = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if ":" in line:
                k, v = (s.strip() for s in line.split(":", 1))
                info.setdefault(k, v)
    except OSError:
        pass
    return info


def _cache_bytes(level: int) -> int:
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for idx in base.glob("index*"):
        try:
            if int((idx / "level").read_text()) == level:
                size = (idx / "size").read_text().strip()
                mult = {"K": 2**10, "M": 2**20}.get(size[-1], 1)
                return int(size.rstrip("KM")) * mult
        except (OSError, ValueError):
            continue
    return 0


def _mem_total() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def detect() -> dict:
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    isa = sorted(flags & {"avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni",
                          "amx_int8", "amx_bf16", "avx512_vpopcntdq", "f16c", "sse4_2"})
    return {"model": info.get("model name", platform.processor() or "unknown"),
            "family": info.get("cpu family", ""), "model_id": info.get("model", ""),
            "cores": len(os.sched_getaffinity(0)), "isa": isa,
            "l2_bytes": _cache_bytes(2), "l3_bytes": _cache_bytes(3), "mem_bytes": _mem_total(),
            "torch": torch.__version__, "probe": PROBE_VERSION}


def _best(fn, repeats: int = 7) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure() -> dict:
    """Achieved fp32 GEMM, int8 GEMM (oneDNN u8s8), binary GEMM (optim's packed XNOR/popcount
    TVM kernel, counted as 2·M·N·K ops like a GEMM) and copy bandwidth, best of several runs."""
    n = GEMM_N
    torch.manual_seed(0)
    a, b = torch.randn(n, n), torch.randn(n, n)
    fp32 = 2 * n**3 / _best(lambda: torch.mm(a, b))
    q = torch.randint(1, 255, (n, n), dtype=torch.uint8)
    w = torch.randint(-63, 64, (n, n), dtype=torch.int8)
    packed, ws, zp = _packed(w), torch.ones(n), torch.zeros(n, dtype=torch.int64)
    int8 = 2 * n**3 / _best(lambda: torch.ops.onednn.qlinear_pointwise(
        q, 1.0, 128, packed, ws, zp, None, 1.0, 0, torch.float32, "none", [], ""))
    bits = torch.randint(-2**62, 2**62, (n, n // 64), dtype=torch.int64)
    ones = torch.ones(n, 1)
    bits_t = bits.T.contiguous()
    binary = 2 * n**3 / _best(lambda: binary_linear(bits, bits_t, n, ones, ones))
    src = torch.empty(COPY_BYTES // 4)
    dst = torch.empty_like(src)
    src.fill_(1.0)
    bw = 2 * COPY_BYTES / _best(lambda: dst.copy_(src), repeats=5)
    # streaming weights is a read: a reduction over a buffer far larger than the caches
    read = COPY_BYTES / _best(lambda: src.sum(), repeats=5)
    return {"fp32_flops": fp32, "int8_ops": int8, "binary_ops": binary, "copy_bytes_per_s": bw,
            "read_bytes_per_s": read,
            "threads": torch.get_num_threads(),
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}


def probe(refresh: bool = False) -> dict:
    """Detected facts plus measured rates for this machine, from the cache when it holds a
    valid probe of this machine (anything else, e.g. a torn or edited file, is measured again
    and replaced)."""
    facts = detect()
    key = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:12]
    path = cache_dir() / f"cpu-{key}.json"
    if path.exists() and not refresh:
        try:
            cached = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            cached = None
        if _valid(cached, key):
            return cached
    data = {**facts, "measured": measure(), "cache_key": key}
    write_json(path, data)
    return data


RATES = ("fp32_flops", "int8_ops", "binary_ops", "copy_bytes_per_s", "read_bytes_per_s")


def _valid(data, key: str) -> bool:
    """A probe this code wrote for this machine: the key matches and every rate is a positive
    finite number."""
    if not isinstance(data, dict) or data.get("cache_key") != key:
        return False
    measured = data.get("measured")
    return isinstance(measured, dict) and all(
        isinstance(measured.get(r), (int, float)) and not isinstance(measured.get(r), bool)
        and math.isfinite(measured[r]) and measured[r] > 0 for r in RATES)
