"""The optimization report: versioned JSON data first; `render.py` turns it into text and HTML."""

from __future__ import annotations

import json
import math
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


class Report:
    """A dict that follows `schemas/report.schema.json`, with load/save and validation."""

    def __init__(self, data: dict):
        self.data = _jsonable(data)

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
