"""Save and load optimized models: data only, checked, replaced atomically.

A saved directory holds `manifest.json` (format, backend, input/output pytree specs as JSON,
and the SHA-256 of every other file), `report.json`, and the files the backend's artifact
writes (`Artifact.save`): `model.onnx` (onnxruntime), `program.json` + `program.safetensors`
(torch: the exported graph as JSON, tensors in safetensors; `optim.program_files`) or
`model.so` + `params.safetensors` (tvm). With nested widths, `graph.json` + `graph.safetensors`
keep the post-pass graph they are built from.

Loading never runs code from the directory unless asked: nothing is unpickled, every file the
manifest names must lie inside the directory and match its checksum (the error names the file
that changed), and a compiled library (tvm's `model.so`, which loading would dlopen) is loaded
only with `trust_compiled_code=True`. Writing goes to a temporary sibling that is swapped in
by renames, so a failure or a kill leaves the old save or the new one, never neither; a killed
writer's leftovers are removed by the next save.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import torch
from torch.utils._pytree import treespec_dumps, treespec_loads

import backends  # noqa: F401  (registers every backend's loader)
import optim.ops  # noqa: F401  (saved graphs refer to torch.ops.optim)
from optim.errors import OptimError
from optim.program_files import load_program, save_program
from optim.registry import BACKENDS
from optim.report import Report
from optim.shapes import ShapeSpec, export_program

FORMAT = "optim.saved/1"


def save(om, directory: Path) -> Path:
    return _write_atomically(Path(directory), lambda tmp: _write_model(om, tmp, om.report))


def save_parts(parts: dict, meta: dict, report: Report, directory: Path, extra=None) -> Path:
    """Several models that work together (a decoder's prefill and decode step), each in its own
    subdirectory, under one manifest (`meta` plus the part names) and one report; `extra(tmp)`
    may write more data files (checksummed with the rest)."""
    def fill(tmp: Path) -> None:
        for name, om in parts.items():
            (tmp / name).mkdir()
            _write_model(om, tmp / name, None)
        if extra is not None:
            extra(tmp)
        report.save(tmp / "report.json")
        (tmp / "manifest.json").write_text(json.dumps(
            {"format": FORMAT, **meta, "parts": list(parts)}, indent=2))

    return _write_atomically(Path(directory), fill)


def _write_atomically(directory: Path, fill) -> Path:
    """`fill(tmp)` writes into a temporary sibling; the files' checksums go into its manifest;
    then it replaces `directory` by two renames (the old save is moved aside first and removed
    last, so a kill between them leaves it recoverable under `.optim-old-*`)."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise OptimError(f"{directory} is a file; choose a directory to save into")
    if (directory.exists() and any(directory.iterdir())
            and not (directory / "manifest.json").exists()):
        raise OptimError(f"{directory} exists and is not an optim save; choose an empty directory")
    directory.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(directory)
    tag = f".optim-{{}}-{directory.name}-{os.getpid()}-"
    tmp = Path(tempfile.mkdtemp(prefix=tag.format("save"), dir=directory.parent))
    old = None
    try:
        fill(tmp)
        found = json.loads((tmp / "manifest.json").read_text())
        found["files"] = checksums(tmp)
        (tmp / "manifest.json").write_text(json.dumps(found, indent=2))
        if directory.exists():
            old = Path(tempfile.mkdtemp(prefix=tag.format("old"), dir=directory.parent))
            directory.rename(old / "save")
        tmp.rename(directory)
    except BaseException:
        if old is not None and not directory.exists():
            (old / "save").rename(directory)  # put the old save back
        raise
    finally:
        for leftover in (tmp, old):
            if leftover is not None and leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)
    return directory


def _remove_leftovers(directory: Path) -> None:
    """Remove what killed writers of `directory` left behind (their process is gone); a save
    moved aside by a writer killed mid-swap is put back if nothing replaced it."""
    for path in directory.parent.glob(f".optim-*-{directory.name}-*"):
        kind, _, rest = path.name[len(".optim-"):].partition("-")
        if not rest.startswith(directory.name + "-"):
            continue  # another save's (whose name ends like this one's)
        pid = rest[len(directory.name) + 1:].partition("-")[0]
        if kind not in ("save", "old") or not pid.isdigit() or _alive(int(pid)):
            continue
        if kind == "old" and (path / "save").is_dir() and not directory.exists():
            (path / "save").rename(directory)
        shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def checksums(directory: Path) -> dict[str, str]:
    """SHA-256 of every file under `directory` but the top manifest, by relative path."""
    out = {}
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory).as_posix()
        if path.is_file() and rel != "manifest.json":
            out[rel] = _sha256(path)
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify(directory: Path, found: dict) -> None:
    """Every file the manifest lists lies inside `directory` and has its recorded checksum."""
    files = found.get("files")
    if not isinstance(files, dict) or not files:
        raise OptimError(f"{directory}: the manifest records no checksums (written by an older "
                         f"optim, or edited); optimize the model again and save it")
    root = directory.resolve()
    for rel, digest in files.items():
        path = inside(directory, rel)
        if not path.is_file():
            raise OptimError(f"{directory}: {rel} is missing; the save is incomplete, save the "
                             f"model again")
        if _sha256(path) != digest:
            raise OptimError(f"{directory}: {rel} has changed since it was saved (checksum "
                             f"mismatch): it is damaged or was replaced; save the model again")
    for path in directory.rglob("*"):
        rel = path.relative_to(directory).as_posix()
        if path.is_file() and rel not in files and path.name != "manifest.json":
            raise OptimError(f"{directory}: {rel} was not part of the save; remove it or save "
                             f"the model again")
        if path.is_symlink() and not path.resolve().is_relative_to(root):
            raise OptimError(f"{directory}: {rel} links outside the save directory")


def inside(directory: Path, name) -> Path:
    """`directory / name`, refusing a name that leads outside `directory`."""
    if not isinstance(name, str) or not name or Path(name).is_absolute():
        raise OptimError(f"{directory}: the manifest names the file {name!r}, which is not a "
                         f"relative path inside the save; the save is damaged")
    path = directory / name
    if not path.resolve().is_relative_to(directory.resolve()):
        raise OptimError(f"{directory}: the manifest names {name!r}, outside the save "
                         f"directory; refusing to read it")
    return path


def _write_model(om, tmp: Path, report: Report | None) -> None:
    info = getattr(om.graph._graph._codegen, "pytree_info", None) if om.graph is not None else None
    manifest = {"format": FORMAT, "backend": om.backend,
                "in_spec": treespec_dumps(info.in_spec) if info else None,
                "out_spec": treespec_dumps(info.out_spec) if info else None,
                "shapes": om.shapes.to_dict() if om.shapes is not None else None}
    manifest.update(om.artifact.save(tmp))
    if om.report.pass_details("dynamic_width").get("plan") and om.graph is not None:
        args, kwargs = om.example  # nested widths are built from the graph
        manifest["graph"] = save_program(export_program(om.graph, args, kwargs), tmp,
                                         "graph")  # with its example inputs and dynamic axes
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


def manifest(directory: Path, check: bool = True) -> dict:
    """The manifest of a save, checked for format and (`check`) every file against its
    checksum."""
    directory = Path(directory)
    try:
        found = json.loads((directory / "manifest.json").read_text())
    except FileNotFoundError:
        raise OptimError(f"{directory} has no manifest.json; it was not written by "
                         f"OptimizedModel.save") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise OptimError(f"{directory}/manifest.json cannot be read ({e}); the save is damaged, "
                         f"save the model again") from e
    if not isinstance(found, dict) or found.get("format") != FORMAT:
        got = found.get("format") if isinstance(found, dict) else type(found).__name__
        raise OptimError(f"{directory}: unknown save format {got!r} (this optim reads "
                         f"{FORMAT!r})")
    _check_schema(directory, found)
    if check:
        verify(directory, found)
    return found


def _check_schema(directory: Path, found: dict) -> None:
    schema = json.loads(resources.files("optim").joinpath("schemas/saved.schema.json")
                        .read_text())
    error = jsonschema.exceptions.best_match(
        jsonschema.Draft202012Validator(schema).iter_errors(found))
    if error is not None:
        where = ".".join(str(k) for k in error.absolute_path) or "(top level)"
        raise OptimError(f"{directory}/manifest.json: {where}: {error.message}; the save is "
                         f"damaged, save the model again")


@contextmanager
def damaged(directory: Path, what: str = "manifest"):
    """Errors from reading what a save's `what` describes (a value of the right type that
    makes no sense, such as an edited input structure) become an error naming the save."""
    try:
        yield
    except OptimError:
        raise
    except Exception as e:
        raise OptimError(f"{directory}: the {what} is damaged ({type(e).__name__}: "
                         f"{str(e).strip()[:200]}); save the model again") from e


def load(directory: Path, trust_compiled_code: bool = False, found: dict | None = None
         ) -> Saved:
    """A single model's save (`found`: its manifest, if already read by `manifest`)."""
    directory = Path(directory)
    found = manifest(directory) if found is None else found
    return _load_model(directory, found, Report.load(directory / "report.json"),
                       trust_compiled_code)


def load_parts(directory: Path, found: dict, trust_compiled_code: bool = False
               ) -> tuple[dict[str, Saved], Report]:
    """The parts `save_parts` wrote, and their report (`found`: the checked top manifest)."""
    report = Report.load(Path(directory) / "report.json")
    parts = {}
    for name in found.get("parts", []):
        if not isinstance(name, str) or not name.isidentifier():
            raise OptimError(f"{directory}: the manifest names a part {name!r}; the save is "
                             f"damaged")
        sub = Path(directory) / name
        parts[name] = _load_model(sub, manifest(sub, check=False), report, trust_compiled_code)
    return parts, report


def _load_model(directory: Path, manifest: dict, report: Report,
                trust_compiled_code: bool = False) -> Saved:
    if manifest.get("backend") not in BACKENDS:
        raise OptimError(f"{directory}: unknown backend {manifest.get('backend')!r}")
    backend = BACKENDS.get(manifest["backend"])
    if backend.runs_code and not trust_compiled_code:
        raise OptimError(f"{directory} holds a compiled {backend.name} library, and loading it "
                         f"runs its code. Load it only if you trust where it came from: "
                         f"optim.load(path, trust_compiled_code=True)")
    _check_names(directory, manifest)
    with damaged(directory):
        in_spec, out_spec = _treespec(manifest, "in_spec"), _treespec(manifest, "out_spec")
        shapes = ShapeSpec.from_dict(manifest["shapes"]) if manifest.get("shapes") else None
    with damaged(directory, f"{backend.name} artifact"):
        artifact = backend.load(directory, manifest, in_spec, out_spec)
    saved = Saved(artifact, report, getattr(artifact, "source", None), shapes=shapes)
    if manifest.get("graph"):
        with damaged(directory, "saved graph"):
            ep = load_program(directory, manifest["graph"])
            saved.graph, saved.example = ep.module(), ep.example_inputs
            names = _name_map(saved.graph, manifest["graph_nodes"])
            saved.width_plan = _translated(report.pass_details("dynamic_width")["plan"], names)
    return saved


def _check_names(directory: Path, manifest: dict) -> None:
    """Every file a loader will open lies inside the save (and so was checksummed)."""
    names = [manifest.get("artifact"), manifest.get("params")]
    for key in ("graph", "program"):
        entry = manifest.get(key)
        if entry is not None:
            if not isinstance(entry, dict):
                raise OptimError(f"{directory}: the manifest's {key!r} entry is damaged")
            names += [entry.get("graph"), entry.get("tensors")]
    for name in names:
        if name is not None and not inside(directory, name).is_file():
            raise OptimError(f"{directory}: {name} is missing; the save is incomplete")


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
