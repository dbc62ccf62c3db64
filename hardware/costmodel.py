"""Roofline with shape-dependent efficiency: kernels (from `opcost`) -> seconds on a target.

Per kernel::

    t = max(F / (P[dtype] * eta_c), B / (BW * eta_m)) + launches * t_launch
    eta_c = gemm_eff * s(M) * s(N) * s(K) * wave(M, N)    s(d) = d / (d + d_half)
    eta_m = mem_eff * B / (B + b_half)

A fused run of pointwise ops costs one launch per reduction; `unfused` (0 for fusing compilers,
fitted for ONNX Runtime's CPU executor, which fuses only known patterns) adds a share of a launch
for each further op. `gemm_eff`, `mem_eff` and `t_launch` start from the spec (sourced large-GEMM
and bandwidth fractions); `d_half` and `b_half` (how fast small shapes and small transfers fall
off) start as stated defaults. A `Calibration` fitted on measurements replaces them
(`hardware.calibrate`), and says so: every estimate names the calibration it used. `wave` is
tile quantization over the target's compute units (128x128 output tiles on GPUs).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from hardware.capability import place, sparse_scaling
from hardware.opcost import Kernel
from hardware.spec import HardwareSpec

GEMV_ROWS = 8


@dataclass(frozen=True)
class Calibration:
    gemm_eff: dict  # dtype -> fraction of peak for large GEMMs ("*" = any other dtype)
    d_half: float  # GEMM dimension at which that dimension's efficiency factor is 1/2
    mem_eff: float  # fraction of bandwidth for large transfers
    b_half: float  # bytes at which a transfer reaches half of that
    launch_s: float  # fixed cost per launch
    attn_eff: float = 1.0  # fused attention relative to a GEMM of the same shape
    unfused: float = 0.0  # share of a fused run's extra ops the backend still launches alone
    source: str = "spec defaults"
    fit: dict = field(default_factory=dict)  # how it was fitted: configs, error on held-out

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Calibration:
        return cls(**d)


def default_calibration(spec: HardwareSpec) -> Calibration:
    """From the spec's sourced fractions; the fall-off constants are stated assumptions:
    GPUs need ~64-wide tiles and MBs in flight, CPUs saturate earlier."""
    gpu_like = spec.kind in ("gpu", "tpu")
    return Calibration(
        gemm_eff={"*": spec.efficiency["gemm"].value},
        d_half=32.0 if gpu_like else 8.0,
        mem_eff=spec.efficiency["memory"].value,
        b_half=1e6 if gpu_like else 32e3,
        launch_s=spec.launch_overhead.value,
        source=f"{spec.name} spec: gemm {spec.efficiency['gemm'].provenance}, memory "
               f"{spec.efficiency['memory'].provenance}, fall-off assumed")


@dataclass
class KernelEstimate:
    kernel: Kernel
    seconds: float
    compute_s: float
    memory_s: float
    overhead_s: float
    bound: str  # compute | memory | overhead
    peak_dtype: str
    efficiency: float  # achieved fraction of the peak used
    note: str = ""

    def to_dict(self) -> dict:
        k = self.kernel
        return {"name": k.name, "kind": k.kind, "dtype": k.dtype, "peak_dtype": self.peak_dtype,
                "flops": k.flops, "bytes": k.bytes, "shape": list(k.shape),
                "seconds": self.seconds, "bound": self.bound,
                "compute_s": self.compute_s, "memory_s": self.memory_s,
                "overhead_s": self.overhead_s, "note": self.note}


def _s(d: float, half: float) -> float:
    return d / (d + half)


def _wave(spec: HardwareSpec, batch: int, m: int, n: int, k: int) -> float:
    """Fraction of the last wave of 128x128 output tiles that is busy; with fewer tiles than
    units, libraries split K (cuBLAS split-K, GEMV kernels), up to one 128-slice per tile."""
    if spec.kind != "gpu" or spec.compute_units is None:
        return 1.0
    units = int(spec.compute_units.value)
    tiles = batch * math.ceil(m / 128) * math.ceil(n / 128)
    if tiles < units:
        tiles *= min(units // tiles, max(1, k // 128))
    return tiles / (math.ceil(tiles / units) * units)


def kernel_time(k: Kernel, spec: HardwareSpec, cal: Calibration,
                precision: str = "graph") -> KernelEstimate:
    if k.kind in ("gemm", "attention"):
        p = place(spec, k.dtype, weight_format=k.weight_format, precision=precision)
        eff = cal.gemm_eff.get(p.peak_dtype, cal.gemm_eff.get("*", 0.5))
        if k.kind == "gemm":
            batch, m, n, kk = k.shape
        else:  # attention: Lq x Lk scores with head_dim contraction, per (batch, head)
            b, h, m, n, kk = k.shape
            batch = b * h
            eff *= cal.attn_eff
        # skinny GEMMs (a few rows: decode) run GEMV-style kernels that vectorize over N and K
        # and stream the weights, so their efficiency does not fall with M
        eff *= (_s(m, cal.d_half) if m > GEMV_ROWS else 1.0) * _s(n, cal.d_half) \
            * _s(kk, cal.d_half)
        eff *= _wave(spec, batch, m, n, kk)
        peak, dtype, note = p.peak_flops, p.peak_dtype, p.note
        flop_factor, byte_factor, sparse_note = sparse_scaling(k.weight_format, k.density, dtype)
        if flop_factor != 1.0 or byte_factor != 1.0:
            k = replace(k, flops=k.flops * flop_factor,
                        bytes={**k.bytes, "weights": k.bytes.get("weights", 0.0) * byte_factor})
        note = note or sparse_note
    else:  # pointwise/reduction/gather: vector units at the fp32 (non-tensor) peak
        dtype = "fp32" if "fp32" in spec.peak else next(iter(spec.peak))
        peak, eff, note = spec.peak[dtype].value, cal.gemm_eff.get("*", 0.5), ""
    compute = k.flops / (peak * max(eff, 1e-6)) if k.flops else 0.0
    # a 16-bit deployment of an fp32 graph stores its float tensors in 16 bits: half the bytes
    b = k.total_bytes * (0.5 if precision in ("fp16", "bf16") and k.dtype == "fp32" else 1.0)
    memory = b / (spec.mem_bandwidth.value * cal.mem_eff * _s(b, cal.b_half)) if b else 0.0
    overhead = (k.launches + cal.unfused * max(0, len(k.nodes) - k.launches)) * cal.launch_s
    body = max(compute, memory)
    bound = "overhead" if overhead > body else ("compute" if compute >= memory else "memory")
    return KernelEstimate(k, body + overhead, compute, memory, overhead, bound, dtype,
                          eff, note)


@dataclass
class Estimate:
    """A graph's estimated latency on one target, with the per-kernel breakdown."""

    target: str
    seconds: float
    kernels: list[KernelEstimate]
    calibration: Calibration
    precision: str
    roofline_s: float  # pure datasheet roofline (100% of peak, no overhead): a lower bound

    @property
    def bound(self) -> str:
        by: dict[str, float] = {}
        for e in self.kernels:
            by[e.bound] = by.get(e.bound, 0.0) + e.seconds
        return max(by, key=by.get) if by else "none"

    def time_by(self, attr: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for e in self.kernels:
            key = getattr(e, attr) if hasattr(e, attr) else getattr(e.kernel, attr)
            out[key] = out.get(key, 0.0) + e.seconds
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def bytes_by_class(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for e in self.kernels:
            for c, b in e.kernel.bytes.items():
                out[c] = out.get(c, 0.0) + b
        return out

    def notes(self) -> list[str]:
        return sorted({e.note for e in self.kernels if e.note})

    def top(self, n: int = 5) -> list[KernelEstimate]:
        return sorted(self.kernels, key=lambda e: -e.seconds)[:n]


def estimate_kernels(kernels: list[Kernel], spec: HardwareSpec, cal: Calibration | None = None,
                     precision: str = "graph") -> Estimate:
    cal = cal or default_calibration(spec)
    rows = [kernel_time(k, spec, cal, precision) for k in kernels]
    # the bound: every peak at 100%, or above where a fit found the backend beats the spec's
    # (measured) rate, so that it stays a lower bound on any estimate
    ideal = replace(cal, gemm_eff={d: max(1.0, e) for d, e in cal.gemm_eff.items()},
                    d_half=0.0, mem_eff=max(1.0, cal.mem_eff), b_half=0.0, launch_s=0.0,
                    attn_eff=max(1.0, cal.attn_eff), unfused=0.0)
    roof = sum(max((e := kernel_time(k, spec, ideal, precision)).compute_s, e.memory_s)
               for k in kernels)
    return Estimate(spec.name, sum(r.seconds for r in rows), rows, cal, precision, roof)
