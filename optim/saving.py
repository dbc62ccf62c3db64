"""Save and load optimized models without pickle.

A saved directory holds `manifest.json` (format, backend, input/output pytree specs as JSON),
`report.json`, and the files the backend's artifact writes (`Artifact.save`): `model.onnx`
(onnxruntime), `program.pt2` (torch: torch's export archive, graph as JSON and weights as raw
bytes) or `model.so` + `params.safetensors` (tvm). With nested widths, `graph.pt2` keeps the
post-pass graph they are built from. Writing goes to a temporary sibling that is swapped in, so
a failure leaves nothing half-written.
"""

from __future__ import annotations

import importlib
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
from optim.shapes import ShapeSpec, export_program

FORMAT = "optim.saved/1"


def save(om, directory: Path) -> Path:
    return _write_atomically(Path(directory), lambda tmp: _write_model(om, tmp, om.report))


def save_parts(parts: dict, meta: dict, report: Report, directory: Path) -> Path:
    """Several models that work together (a decoder's prefill and decode step), each in its own
    subdirectory, under one manifest (`meta` plus the part names) and one report."""
    def fill(tmp: Path) -> None:
        for name, om in parts.items():
            (tmp / name).mkdir()
            _write_model(om, tmp / name, None)
        report.save(tmp / "report.json")
        (tmp / "manifest.json").write_text(json.dumps(
            {"format": FORMAT, **meta, "parts": list(parts)}, indent=2))

    return _write_atomically(Path(directory), fill)


def _write_atomically(directory: Path, fill) -> Path:
    """`fill(tmp)` writes into a temporary sibling, which then replaces `directory`."""
    if (directory.exists() and any(directory.iterdir())
            and not (directory / "manifest.json").exists()):
        raise OptimError(f"{directory} exists and is not an optim save; choose an empty directory")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".optim-save-", dir=directory.parent))
    try:
        fill(tmp)
        if directory.exists():
            shutil.rmtree(directory)
        tmp.rename(directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return directory


def _write_model(om, tmp: Path, report: Report | None) -> None:
    info = getattr(om.graph._graph._codegen, "pytree_info", None) if om.graph is not None else None
    manifest = {"format": FORMAT, "backend": om.backend,
                "in_spec": treespec_dumps(info.in_spec) if info else None,
                "out_spec": treespec_dumps(info.out_spec) if info else None,
                "shapes": om.shapes.to_dict() if om.shapes is not None else None}
    manifest.update(om.artifact.save(tmp))
    if om.report.pass_details("dynamic_width").get("plan") and om.graph is not None:
        args, kwargs = om.example  # nested widths are built from the graph
        torch.export.save(export_program(om.graph, args, kwargs),
                          tmp / "graph.pt2")  # with its example inputs and dynamic axes
        manifest["graph"] = "graph.pt2"
        # the width plan names FX nodes; export renames them, so keep the names in order
        manifest["graph_nodes"] = [[n.name, str(n.target)] for n in om.graph.graph.nodes
                                   if n.op == "call_function"]
    if report is not None:
        report.save(tmp / "report.json")
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))


@dataclass
class Saved:
    artifact: Any
    report: Report
    graph: torch.fx.GraphModule | None = None
    example: tuple | None = None
    width_plan: dict | None = None
    shapes: ShapeSpec | None = None


def manifest(directory: Path) -> dict:
    """The manifest of a save, checked for format."""
    directory = Path(directory)
    try:
        found = json.loads((directory / "manifest.json").read_text())
    except FileNotFoundError:
        raise OptimError(f"{directory} has no manifest.json; it was not written by "
                         f"OptimizedModel.save") from None
    if found.get("format") != FORMAT:
        raise OptimError(f"{directory}: unknown save format {found.get('format')!r} "
                         f"(this optim reads {FORMAT!r})")
    return found


def load(directory: Path) -> Saved:
    directory = Path(directory)
    return _load_model(directory, manifest(directory), Report.load(directory / "report.json"))


def load_parts(directory: Path, found: dict) -> tuple[dict[str, Saved], Report]:
    """The parts `save_parts` wrote, and their report."""
    report = Report.load(Path(directory) / "report.json")
    parts = {}
    for name in found.get("parts", []):
        if not isinstance(name, str) or not name.isidentifier():
            raise OptimError(f"{directory}: the manifest names a part {name!r}; the save is "
                             f"damaged")
        sub = Path(directory) / name
        parts[name] = _load_model(sub, manifest(sub), report)
    return parts, report


def _load_model(directory: Path, manifest: dict, report: Report) -> Saved:
    if manifest.get("backend") not in BACKENDS:
        raise OptimError(f"{directory}: unknown backend {manifest.get('backend')!r}")
    in_spec, out_spec = _treespec(manifest, "in_spec"), _treespec(manifest, "out_spec")
    artifact = BACKENDS.get(manifest["backend"]).load(directory, manifest, in_spec, out_spec)
    saved = Saved(artifact, report, getattr(artifact, "source", None))
    if manifest.get("shapes"):
        saved.shapes = ShapeSpec.from_dict(manifest["shapes"])
    if manifest.get("graph"):
        ep = torch.export.load(directory / manifest["graph"])
        saved.graph, saved.example = ep.module(), ep.example_inputs
        names = _name_map(saved.graph, manifest["graph_nodes"])
        saved.width_plan = _translated(report.pass_details("dynamic_width")["plan"], names)
    return saved


# packages whose output classes (e.g. transformers' ModelOutput) register themselves with
# torch's pytree when their module is imported; a saved spec may name only these
PYTREE_PACKAGES = ("transformers", "diffusers")


def _treespec(manifest: dict, key: str):
    """A saved input/output structure. A fresh process has not imported the model's output
    classes yet: their modules are imported first (from `PYTREE_PACKAGES` only, never a module
    the file names elsewhere)."""
    text = manifest.get(key)
    if not text:
        return None
    for name in _type_names(json.loads(text)):
        module = name.rpartition(".")[0]
        if module.split(".")[0] in PYTREE_PACKAGES:
            try:
                importlib.import_module(module)
            except ImportError as e:
                raise OptimError(f"the saved model returns {name}; importing {module} failed "
                                 f"({e}): install the package it came from") from e
    try:
        return treespec_loads(text)
    except NotImplementedError as e:
        raise OptimError(f"the saved {key} names a type this process cannot rebuild: {e}") from e


def _type_names(tree) -> list[str]:
    if isinstance(tree, list):
        return [n for item in tree for n in _type_names(item)]
    if isinstance(tree, dict):
        own = [tree["type"]] if isinstance(tree.get("type"), str) else []
        return own + _type_names(tree.get("children_spec", []))
    return []


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
