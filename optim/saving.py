"""Save and load optimized models without pickle.

A saved directory holds `manifest.json` (format, backend, input/output pytree specs as JSON),
`report.json`, and the files the backend's artifact writes (`Artifact.save`): `model.onnx`
(onnxruntime), `program.pt2` (torch: torch's export archive, graph as JSON and weights as raw
bytes) or `model.so` + `params.safetensors` (tvm). With nested widths, `graph.pt2` keeps the
post-pass graph they are built from. Writing goes to a temporary sibling that is swapped in, so
a failure leaves nothing half-written.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils._pytree import treespec_dumps, treespec_loads

import backends  # noqa: F401  (registers every backend's loader)
import optim.ops  # noqa: F401  (saved graphs refer to torch.ops.optim)
from optim.errors import OptimError
from optim.registry import BACKENDS
from optim.report import Report

FORMAT = "optim.saved/1"


def save(om, directory: Path) -> Path:
    directory = Path(directory)
    if (directory.exists() and any(directory.iterdir())
            and not (directory / "manifest.json").exists()):
        raise OptimError(f"{directory} exists and is not an optim save; choose an empty directory")
    info = getattr(om.graph._graph._codegen, "pytree_info", None) if om.graph is not None else None
    manifest = {"format": FORMAT, "backend": om.backend,
                "in_spec": treespec_dumps(info.in_spec) if info else None,
                "out_spec": treespec_dumps(info.out_spec) if info else None}
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".optim-save-", dir=directory.parent))
    try:
        manifest.update(om.artifact.save(tmp))
        if om.report.pass_details("dynamic_width").get("plan") and om.graph is not None:
            args, kwargs = om.example  # nested widths are built from the graph
            torch.export.save(torch.export.export(om.graph, args, kwargs, strict=False),
                              tmp / "graph.pt2")  # with its example inputs
            manifest["graph"] = "graph.pt2"
            # the width plan names FX nodes; export renames them, so keep the names in order
            manifest["graph_nodes"] = [[n.name, str(n.target)] for n in om.graph.graph.nodes
                                       if n.op == "call_function"]
        om.report.save(tmp / "report.json")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        if directory.exists():
            shutil.rmtree(directory)
        tmp.rename(directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return directory


@dataclass
class Saved:
    artifact: Any
    report: Report
    graph: torch.fx.GraphModule | None = None
    example: tuple | None = None
    width_plan: dict | None = None


def load(directory: Path) -> Saved:
    directory = Path(directory)
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
    except FileNotFoundError:
        raise OptimError(f"{directory} has no manifest.json; it was not written by "
                         f"OptimizedModel.save") from None
    if manifest.get("format") != FORMAT:
        raise OptimError(f"{directory}: unknown save format {manifest.get('format')!r} "
                         f"(this optim reads {FORMAT!r})")
    report = Report.load(directory / "report.json")
    if manifest.get("backend") not in BACKENDS:
        raise OptimError(f"{directory}: unknown backend {manifest.get('backend')!r}")
    in_spec = treespec_loads(manifest["in_spec"]) if manifest.get("in_spec") else None
    out_spec = treespec_loads(manifest["out_spec"]) if manifest.get("out_spec") else None
    artifact = BACKENDS.get(manifest["backend"]).load(directory, manifest, in_spec, out_spec)
    saved = Saved(artifact, report, getattr(artifact, "source", None))
    if manifest.get("graph"):
        ep = torch.export.load(directory / manifest["graph"])
        saved.graph, saved.example = ep.module(), ep.example_inputs
        names = _name_map(saved.graph, manifest["graph_nodes"])
        saved.width_plan = _translated(report.pass_details("dynamic_width")["plan"], names)
    return saved


def _name_map(gm: torch.fx.GraphModule, saved: list) -> dict[str, str]:
    """Saved operation name -> the loaded graph's name for it (matched in order by target;
    export may rename operations and add its own, such as guards)."""
    calls = iter([n for n in gm.graph.nodes if n.op == "call_function"])
    out = {}
    for name, target in saved:
        node = next((n for n in calls if str(n.target) == target), None)
        if node is None:
            raise OptimError(f"saved graph has no operation {target} for {name!r}: the save is "
                             f"damaged; optimize the model again")
        out[name] = node.name
    return out


def _translated(plan, names: dict):
    """The width plan with every node name it holds mapped through `names`."""
    if isinstance(plan, dict):
        return {k: _translated(v, names) for k, v in plan.items()}
    if isinstance(plan, list):
        return [_translated(v, names) for v in plan]
    return names.get(plan, plan) if isinstance(plan, str) else plan
