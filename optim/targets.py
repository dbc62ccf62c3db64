"""Targets resolved once: a name becomes a `hardware.target.Target` (spec, calibration, default
backend and pipeline). `cpu` is this machine: resolving it measures it once (cached, see
`hardware.cpu_probe`); every other target is estimated by the cost model from its sourced spec.
This is the one place that reads fitted calibrations from the cache directory."""

from __future__ import annotations

from pathlib import Path

from hardware import calibrate, cpu_probe
from hardware.costmodel import Calibration, default_calibration
from hardware.spec import HardwareSpec, load_spec, target_names
from hardware.target import Target
from optim.errors import UnknownNameError

__all__ = ["Target", "resolve_target", "target_names", "calibration_for", "calibration_path"]

# oneDNN's int8 GEMM must beat its fp32 GEMM by this much on the probe before int8 models run on
# the torch backend; below it (x86 without VNNI/AMX), ONNX Runtime's MLAS u8s8 GEMM is faster.
ONEDNN_INT8_GAIN = 2.0


def resolve_target(target: str | Target, backend: str = "onnxruntime") -> Target:
    """The `Target` for a name (`optim targets` lists them); a `Target` is returned as is.
    `backend` picks which fitted calibration the cost model uses (they are per backend)."""
    if isinstance(target, Target):
        return target
    if not isinstance(target, str) or target not in target_names():
        raise UnknownNameError("target", str(target), target_names())
    return _resolve(target, backend)


def _resolve(name: str, backend: str) -> Target:
    here = name == "cpu"
    machine = cpu_probe.probe() if here else None
    spec = load_spec(name, machine)
    default, why = cpu_backend(spec) if here else ("torch", "estimated targets run on torch here")
    return Target(name, spec, calibration_for(spec, backend, machine), here, default,
                  "cpu_default" if here else "estimate_default", why)


def calibration_path(spec: HardwareSpec, backend: str, machine: dict | None = None) -> Path:
    key = machine["cache_key"] if machine else "spec"
    return cpu_probe.cache_dir() / "calibration" / f"{spec.name}-{backend}-{key}.json"


def calibration_for(spec: HardwareSpec, backend: str = "onnxruntime",
                    machine: dict | None = None) -> Calibration:
    """A calibration fitted for this target and backend on this machine when one was saved,
    else one shipped with optim for the target (fitted on that hardware), else spec defaults."""
    candidates = [lambda: calibrate.load(calibration_path(spec, backend, machine)),
                  lambda: calibrate.shipped(spec)]
    for read in candidates:
        try:
            cal = read()
        except (FileNotFoundError, ValueError, TypeError, KeyError):
            continue  # missing or unreadable: fall back; the report names which was used
        if cal is not None:
            return cal
    return default_calibration(spec)


def cpu_backend(spec: HardwareSpec) -> tuple[str, str]:
    """This machine's default backend, decided from the probe's measured GEMM rates."""
    fp32, int8 = spec.peak.get("fp32"), spec.peak.get("int8")
    if fp32 is None or int8 is None:
        return "onnxruntime", "no measured int8/fp32 GEMM rates for this CPU"
    gain = int8.value / fp32.value
    if gain >= ONEDNN_INT8_GAIN:
        return "torch", (f"oneDNN int8 GEMM measured {gain:.1f}x its fp32 rate here "
                         f"(VNNI/AMX): the torch backend's int8 path is the fastest")
    return "onnxruntime", (f"oneDNN int8 GEMM measured only {gain:.1f}x its fp32 rate here "
                           f"(< {ONEDNN_INT8_GAIN:g}x): ONNX Runtime's kernels are used")
