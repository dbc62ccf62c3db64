"""The optimization report: typed records built by the driver, serialized to the versioned JSON
schema `schemas/report.schema.json`; `render.py` turns the JSON into text and HTML (so saved
reports from other runs and targets render the same way).

    ModelFacts   what was optimized (size, FLOPs, inputs, capture time)
    PassRecord   one pass: counts, skips, details, fidelity after it, seconds, why it ran
    LatencyRow   one latency: measured here / estimated for a target / bound, with its source
    Report       all of it; `report["passes"]` etc. is the JSON view users index
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema

from optim.errors import OptimError

SCHEMA_ID = "optim.report/1"


def _schema() -> dict:
    return json.loads(resources.files("optim").joinpath("schemas/report.schema.json").read_text())


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


@dataclass
class ModelFacts:
    name: str
    cls: str
    parameters: int
    flops: float
    weight_bytes: int
    weight_bytes_after: int
    inputs: list[dict]
    capture_seconds: float
    shapes: dict | None = None  # `optim.shapes.ShapeSpec.to_dict()`: dynamic axes and ranges

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["class"] = d.pop("cls")
        d["capture_seconds"] = round(self.capture_seconds, 3)
        if d["shapes"] is None:
            d.pop("shapes")
        return d


@dataclass
class PassRecord:
    name: str
    changed: bool
    counts: dict[str, int]
    skipped: list[dict]
    seconds: float
    details: dict[str, Any]
    numerics: str  # the pass's contract, e.g. "exact (max abs error <= 0.0001)"
    fidelity: dict | None = None  # outputs after this pass against the captured graph's
    inserted_for: str | None = None  # the pipeline added it as a prerequisite of this pass

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["seconds"] = round(self.seconds, 4)
        if self.inserted_for is None:
            d.pop("inserted_for")
        return d


@dataclass
class LatencyRow:
    label: str
    status: str  # "measured" (here) | "estimated" (cost model) | "bound" (datasheet roofline)
    median_ms: float
    by: str | None = None  # what an estimate or bound came from
    target: str | None = None
    backend: str | None = None
    extra: dict = field(default_factory=dict)  # measured: p10_ms, p90_ms, runs, threads, machine

    def to_dict(self) -> dict:
        d = {"label": self.label, "status": self.status, "median_ms": self.median_ms,
             **{k: v for k, v in (("by", self.by), ("target", self.target),
                                  ("backend", self.backend)) if v is not None}}
        return {**d, **self.extra}

    @classmethod
    def measured(cls, label: str, backend: str, m: dict) -> LatencyRow:
        """A row from `optim.measure.measure`'s result for one candidate."""
        extra = {k: v for k, v in m.items() if k not in ("status", "median_ms")}
        return cls(label, "measured", m["median_ms"], backend=backend, extra=extra)


@dataclass
class ReportData:
    """Everything `optimize()` found, typed; `to_dict()` is the `optim.report/1` JSON."""

    model: ModelFacts
    target: dict
    backend: dict
    pipeline: list[dict]
    passes: list[PassRecord]
    graph: dict
    fidelity: dict
    latency: list[LatencyRow]
    speedup: dict
    estimates: list[dict]  # one `hardware.estimate.report_section` per target
    advice: list[str]
    warnings: list[str]
    generation: dict | None = None  # causal LMs: cache, greedy agreement, tokens/s, memory
    created: str = field(default_factory=lambda: datetime.datetime.now(
        datetime.UTC).isoformat(timespec="seconds"))

    def to_dict(self) -> dict:
        return {"schema": SCHEMA_ID, "created": self.created, "optim_version": _version(),
                "model": self.model.to_dict(), "target": self.target, "backend": self.backend,
                "pipeline": self.pipeline, "passes": [p.to_dict() for p in self.passes],
                "graph": self.graph, "fidelity": self.fidelity,
                "latency": [r.to_dict() for r in self.latency], "speedup": self.speedup,
                "estimates": self.estimates, "advice": self.advice, "warnings": self.warnings,
                **({"generation": self.generation} if self.generation is not None else {})}


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("optim")
    except Exception:
        return "0+unknown"


class Report:
    """The JSON view of a report (`schemas/report.schema.json`), with load/save and validation.
    Built from a `ReportData` by the driver, or from a saved JSON file."""

    def __init__(self, data: dict | ReportData):
        self.typed = data if isinstance(data, ReportData) else None
        self.data = _jsonable(data.to_dict() if isinstance(data, ReportData) else data)

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def validate(self) -> Report:
        try:
            jsonschema.validate(self.data, _schema())
        except jsonschema.ValidationError as e:
            path = "/".join(str(p) for p in e.absolute_path) or "(root)"
            raise OptimError(f"report does not follow {SCHEMA_ID} at {path}: {e.message}") from None
        return self

    def to_json(self) -> str:
        return json.dumps(self.data, indent=2)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.validate().to_json())
        return path

    @classmethod
    def load(cls, path: str | Path) -> Report:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise OptimError(f"no report at {path}") from None
        except json.JSONDecodeError as e:
            raise OptimError(f"{path} is not JSON: {e}") from None
        if not isinstance(data, dict) or data.get("schema") != SCHEMA_ID:
            got = data.get("schema") if isinstance(data, dict) else type(data).__name__
            raise OptimError(f"{path} is not an optim report (schema {got!r}, "
                             f"expected {SCHEMA_ID!r})")
        return cls(data).validate()

    # convenience views
    def latency(self, label: str) -> dict | None:
        return next((r for r in self.data["latency"] if r["label"] == label), None)

    def pass_result(self, name: str) -> dict | None:
        return next((p for p in self.data["passes"] if p["name"] == name), None)

    def pass_details(self, name: str) -> dict:
        """The `details` of pass `name`, or {} when it did not run."""
        found = self.pass_result(name)
        return found["details"] if found else {}
