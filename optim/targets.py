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
    return Target(name, spec.kind, here, "onnxruntime" if here else "torch",
                  "cpu_default" if here else "estimate_default", spec.description,
                  spec.provenance())
