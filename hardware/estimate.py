"""Estimate a post-pass graph on a target and turn it into report data.

    est = estimate(gm, spec, calibration)       # Estimate: seconds, bound, per-kernel rows
    section = report_section(stage_kernels, target, memory_bytes=...)   # target: a Target

Pure functions of (kernels, spec, calibration): the calibration is always passed in (the
driver's `optim.targets.resolve_target` chooses it), never read from a cache here.

Every figure says what it is: `estimated` (cost model with a named calibration), `bound` (pure
datasheet roofline, a lower bound), or `measured` (only ever from optim.measure).
"""

from __future__ import annotations

from torch.fx import GraphModule

from hardware.costmodel import Calibration, Estimate, estimate_kernels
from hardware.opcost import Kernel, graph_kernels
from hardware.spec import HardwareSpec
from hardware.target import Target

# what float math runs in when deployed on each kind, unless the caller says otherwise
DEFAULT_PRECISION = {"gpu": "fp16", "tpu": "bf16", "fpga": "fp16", "soc": "fp16", "cpu": "graph"}


def estimate(graph: GraphModule | list[Kernel], spec: HardwareSpec, calibration: Calibration,
             *, precision: str | None = None) -> Estimate:
    """Estimated latency of `graph` (an FX graph with meta["val"], or its kernels) on `spec`."""
    kernels = graph if isinstance(graph, list) else graph_kernels(graph)
    return estimate_kernels(kernels, spec, calibration, precision or DEFAULT_PRECISION[spec.kind])


def by_label(est: Estimate) -> str:
    cal = est.calibration
    fitted = f"fitted ({cal.source})" if cal.fit else cal.source
    return f"optim cost model (roofline x efficiency, {est.precision} float math), calibration: " \
           f"{fitted}"


def report_section(stages: dict[str, list[Kernel]], target: Target, *,
                   memory_bytes: float = 0.0, precision: str | None = None, top: int = 5) -> dict:
    """The per-target block of a report: latency after each pipeline stage (what each pass
    bought), the final estimate's bound, bytes by class, top kernels, memory fit and energy."""
    spec = target.spec
    ests = {name: estimate(k, spec, target.calibration, precision=precision)
            for name, k in stages.items()}
    final = list(ests.values())[-1]
    first = list(ests.values())[0]
    cap = spec.mem_capacity.value
    energy = final.seconds * spec.tdp.value if spec.tdp else None
    prev = None
    stage_rows = []
    for name, e in ests.items():
        stage_rows.append({"after": name, "estimated_ms": e.seconds * 1e3,
                           "bound_ms": e.roofline_s * 1e3,
                           "gain_vs_previous": (prev / e.seconds) if prev else None})
        prev = e.seconds
    return {
        "target": spec.name, "kind": spec.kind, "description": spec.description,
        "provenance": spec.provenance(), "status": "estimated", "by": by_label(final),
        "validated": (f"calibrated on measurements here: {final.calibration.source}"
                      if final.calibration.fit else
                      "not validated: no such device here; spec fractions and assumed fall-off"),
        "precision": final.precision,
        "estimated_ms": final.seconds * 1e3, "bound_ms": final.roofline_s * 1e3,
        "speedup_vs_captured": first.seconds / final.seconds,
        "throughput_per_s": 1.0 / final.seconds,
        "bound": final.bound,
        "time_by_bound_ms": {k: v * 1e3 for k, v in final.time_by("bound").items()},
        "time_by_kind_ms": {k: v * 1e3 for k, v in final.time_by("kind").items()},
        "bytes_by_class": final.bytes_by_class(),
        "memory": {"needed_bytes": memory_bytes, "capacity_bytes": cap,
                   "fits": memory_bytes <= cap if memory_bytes else None},
        "energy_j": energy,
        "energy_basis": "estimated latency x TDP (an upper bound on energy)" if energy else
                        "no published power figure",
        "stages": stage_rows,
        "top_kernels": [e.to_dict() | {"module": e.kernel.module} for e in final.top(top)],
        "notes": final.notes(),
    }
