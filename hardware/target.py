"""A target resolved once: its spec, the calibration the cost model uses for it, and what runs
for it here. The driver builds one (`optim.targets.resolve_target`) and hands the same object to
passes, backends and the cost model; nothing below the driver resolves a name again."""

from __future__ import annotations

from dataclasses import dataclass

from hardware.costmodel import Calibration
from hardware.spec import HardwareSpec


@dataclass(frozen=True)
class Target:
    name: str
    spec: HardwareSpec
    calibration: Calibration  # what `hardware.estimate` uses for this target
    runs_here: bool  # `cpu`: this machine, measured; every other target is estimated
    default_backend: str  # what the optimized model runs on here (fidelity, measurement)
    default_pipeline: str
    backend_reason: str = ""  # why `default_backend` was chosen (cpu: from the probe's rates)

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def description(self) -> str:
        return self.spec.description

    @property
    def provenance(self) -> str:
        return self.spec.provenance()

    @property
    def cuda_arch(self) -> str | None:
        return self.spec.cuda_arch
