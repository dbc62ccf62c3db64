"""Named targets. `cpu` is this machine and the only target that runs today; others are estimated
once the hardware cost model lands (hardware/)."""

from __future__ import annotations

from dataclasses import dataclass

from optim.registry import Registry


@dataclass(frozen=True)
class Target:
    name: str
    kind: str  # "cpu" | "gpu" | "fpga"
    runs_here: bool
    default_backend: str
    default_pipeline: str
    description: str


TARGETS: Registry = Registry("target")
TARGETS.add("cpu", Target("cpu", "cpu", True, "onnxruntime", "cpu_default",
                          "this machine's CPU, measured"))


def get_target(name: str) -> Target:
    return TARGETS.get(name)
