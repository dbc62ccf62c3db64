"""Named targets, one per spec file in `hardware/specs/`. `cpu` is this machine: it runs and is
measured; every other target is estimated by the cost model (hardware/) from its sourced spec."""

from __future__ import annotations

from dataclasses import dataclass

from optim.errors import UnknownNameError


@dataclass(frozen=True)
class Target:
    name: str
    kind: str  # "cpu" | "gpu" | "tpu" | "fpga" | "soc"
    runs_here: bool
    default_backend: str  # what the optimized model runs on here (fidelity, measurement)
    default_pipeline: str
    description: str
    provenance: str
    backend_reason: str = ""  # why `default_backend` was chosen (cpu: from the probe's rates)


def target_names() -> list[str]:
    from hardware.spec import target_names as names

    return names()


def get_target(name: str) -> Target:
    """The target `name`; the spec (and for `cpu`, this machine's probe) loads on first use."""
    from hardware.spec import load_spec

    if not isinstance(name, str) or name not in target_names():
        raise UnknownNameError("target", str(name), target_names())
    spec = load_spec(name)
    here = name == "cpu"
    backend, why = cpu_backend(spec) if here else ("torch", "estimated targets run on torch here")
    return Target(name, spec.kind, here, backend,
                  "cpu_default" if here else "estimate_default", spec.description,
                  spec.provenance(), why)


# oneDNN's int8 GEMM must beat its fp32 GEMM by this much on the probe before int8 models run on
# the torch backend; below it (x86 without VNNI/AMX), ONNX Runtime's MLAS u8s8 GEMM is faster.
ONEDNN_INT8_GAIN = 2.0


def cpu_backend(spec) -> tuple[str, str]:
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
