"""Save and load optimized models without pickle.

A saved directory holds `manifest.json` (format, backend, input/output pytree specs as JSON),
`report.json`, and the artifact: `model.onnx` (onnxruntime backend: one self-contained ONNX
file), `program.pt2` (torch backend: torch's export archive, graph as JSON and weights as raw
bytes; its sample-inputs record is emptied before saving) or `model.so` + `params.safetensors`
(tvm backend: the compiled library and the weights in call order).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import onnx
import torch
from torch.utils._pytree import treespec_dumps, treespec_loads

from optim.errors import BackendError, OptimError
from optim.report import Report

FORMAT = "optim.saved/1"


def save(om, directory: Path) -> Path:
    from backends.onnxruntime import OrtArtifact
    from backends.pytorch import TorchArtifact

    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()) and not (directory / "manifest.json").exists():
        raise OptimError(f"{directory} exists and is not an optim save; choose an empty directory")
    info = getattr(om.graph._graph._codegen, "pytree_info", None) if om.graph is not None else None
    manifest = {"format": FORMAT, "backend": om.backend,
                "in_spec": treespec_dumps(info.in_spec) if info else None,
                "out_spec": treespec_dumps(info.out_spec) if info else None}
    # write into a temporary sibling, then swap in, so a failure leaves nothing half-written
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".optim-save-", dir=directory.parent))
    try:
        art = om.artifact
        if isinstance(art, OrtArtifact):
            onnx.save_model(art.model, tmp / "model.onnx")
            manifest["artifact"] = "model.onnx"
        elif isinstance(art, TorchArtifact):  # the CPU fp32 graph, and how it was lowered
            args, kwargs = om.example
            ep = torch.export.export(art.source, args, kwargs, strict=False)
            if not art.options.get("cuda_graph"):  # a CUDA graph is recorded on them
                ep.example_inputs = None
            torch.export.save(ep, tmp / "program.pt2")
            manifest["artifact"] = "program.pt2"
            manifest["backend_options"] = art.options
        elif hasattr(art, "save_to"):  # tvm: compiled library + weights
            manifest.update(art.save_to(tmp))
        else:
            raise OptimError(f"cannot save an artifact of type {type(art).__name__}")
        if _has_widths(om) and om.graph is not None:  # nested widths are built from the graph
            args, kwargs = om.example
            torch.export.save(torch.export.export(om.graph, args, kwargs, strict=False),
                              tmp / "graph.pt2")  # with its example inputs
            manifest["graph"] = "graph.pt2"
            # the width plan names FX nodes; export renames them, so keep the names in order
            manifest["graph_nodes"] = [[n.name, str(n.target)] for n in om.graph.graph.nodes
                                       if n.op == "call_function"]
        if getattr(om, "cuda_source", None):  # generated for a GPU target
            (tmp / "kernels.cu").write_text(om.cuda_source)
            manifest["cuda_source"] = "kernels.cu"
        build = getattr(om, "cuda_build", None)
        if build is not None and build.executable is not None:  # runnable on a GPU machine
            (tmp / "cuda").mkdir()
            manifest["cuda"] = {"directory": "cuda", **build.save_to(tmp / "cuda")}
        om.report.save(tmp / "report.json")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        if directory.exists():
            shutil.rmtree(directory)
        tmp.rename(directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return directory


def load(directory: Path):
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
    om = _load_artifact(directory, manifest, report)
    if manifest.get("graph"):
        import optim.ops  # noqa: F401

        ep = torch.export.load(directory / manifest["graph"])
        om.graph, om.example = ep.module(), ep.example_inputs
        names = _name_map(om.graph, manifest["graph_nodes"])
        om.width_plan = _translated(om._width_plan(), names)
    return om


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


def _has_widths(om) -> bool:
    return any(p["name"] == "dynamic_width" and p["details"].get("plan")
               for p in om.report["passes"])


def _load_artifact(directory: Path, manifest: dict, report: Report):
    from optim.api import OptimizedModel

    in_spec = treespec_loads(manifest["in_spec"]) if manifest.get("in_spec") else None
    out_spec = treespec_loads(manifest["out_spec"]) if manifest.get("out_spec") else None
    if manifest["backend"] == "onnxruntime":
        from backends.onnxruntime import OrtArtifact

        art = OrtArtifact(onnx.load(directory / manifest["artifact"]), out_spec=out_spec,
                          in_spec=in_spec)
        return OptimizedModel(art, report)
    if manifest["backend"] == "torch":
        import optim.ops  # noqa: F401  (the archive refers to torch.ops.optim)
        from backends.pytorch import TorchArtifact

        ep = torch.export.load(directory / manifest["artifact"])
        gm = ep.module()
        options = manifest.get("backend_options") or {}
        if not options:
            return OptimizedModel(TorchArtifact(gm), report, gm)
        from backends.pytorch import lower

        args, kwargs = ep.example_inputs or ((), {})
        try:
            art = lower(gm, args, kwargs, **options)
        except BackendError as e:
            raise OptimError(f"{directory} was lowered with {options} and cannot be here: {e}. "
                             f"To run it on the CPU, optimize the model again with "
                             f"backend_options={{}}") from e
        return OptimizedModel(art, report, gm)
    if manifest["backend"] == "tvm":
        from backends.tvm import TvmArtifact

        art = TvmArtifact.load_from(directory, manifest, in_spec, out_spec)
        return OptimizedModel(art, report)
    raise OptimError(f"{directory}: unknown backend {manifest['backend']!r}")
