"""Multi-device estimates: tensor parallel (Megatron-style) and pipeline parallel, with an
interconnect model (LLMCompass-style ring all-reduce over the spec's link).

Tensor parallel over `tp` devices splits every weight GEMM and attention's heads (FLOPs, weight
and KV bytes / tp); norms and residual adds stay replicated, and each layer adds two all-reduces
of its activations (after attention's output projection and after the MLP)::

    t_allreduce = 2 (tp - 1) / tp * bytes / link_bw + 2 (tp - 1) * link_latency

Pipeline parallel over `pp` stages splits the layers; one request crosses pp - 1 links (latency
adds up), while a full pipeline of micro-batches runs at the slowest stage's rate (throughput).
"""

from __future__ import annotations

from dataclasses import replace

from hardware.opcost import Kernel
from hardware.spec import HardwareSpec
from optim.errors import ConfigError


def check_parallel(spec: HardwareSpec, tp: int, pp: int) -> None:
    if tp < 1 or pp < 1:
        raise ConfigError(f"tp and pp must be >= 1, got tp={tp}, pp={pp}")
    if tp * pp == 1:
        return
    if spec.interconnect is None:
        raise ConfigError(f"{spec.name} has no interconnect in its spec; multi-device estimates "
                          f"need one (add `interconnect:` to {spec.path or 'its spec file'})")
    if tp > spec.interconnect.max_devices:
        raise ConfigError(f"tp={tp} exceeds the {spec.interconnect.max_devices} devices "
                          f"{spec.name}'s {spec.interconnect.name} connects; use pp for more")


def shard_tp(kernels: list[Kernel], tp: int) -> list[Kernel]:
    """One device's share of each kernel under tensor parallelism."""
    if tp == 1:
        return kernels
    out = []
    for k in kernels:
        if k.kind == "gemm" and k.bytes.get("weights", 0) > 0:
            batch, m, n, kk = k.shape
            out.append(replace(k, flops=k.flops / tp, shape=(batch, m, max(1, n // tp), kk),
                               bytes={c: b / tp if c == "weights" else b
                                      for c, b in k.bytes.items()}))
        elif k.kind == "attention":
            b, h, lq, lk, d = k.shape
            out.append(replace(k, flops=k.flops / tp, shape=(b, max(1, h // tp), lq, lk, d),
                               bytes={c: v / tp for c, v in k.bytes.items()}))
        else:
            out.append(k)
    return out


def allreduce_s(spec: HardwareSpec, nbytes: float, devices: int) -> float:
    if devices == 1:
        return 0.0
    ic = spec.interconnect
    return (2 * (devices - 1) / devices * nbytes / ic.bandwidth.value
            + 2 * (devices - 1) * ic.latency.value)


def p2p_s(spec: HardwareSpec, nbytes: float) -> float:
    ic = spec.interconnect
    return nbytes / ic.bandwidth.value + ic.latency.value
