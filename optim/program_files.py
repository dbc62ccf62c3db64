"""Exported programs on disk as data only: the graph as torch's JSON, every tensor (weights,
constants, example inputs) in safetensors, the input structure as JSON.

`torch.export.save` writes an archive that `torch.export.load` may unpickle (weights marked
`use_pickle`, constants, and example inputs it retries with `weights_only=False`), so loading a
crafted archive runs its payload. Nothing here unpickles: the files are parsed as JSON and
safetensors and handed to torch's deserializer as tensors.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch._export.serde.serialize import SerializedArtifact, deserialize, serialize
from torch.utils._pytree import tree_flatten, tree_unflatten, treespec_dumps, treespec_loads

from optim.errors import OptimError

_SCALARS = (bool, int, float, str, type(None))


def save_program(ep: torch.export.ExportedProgram, directory: Path, stem: str) -> dict:
    """Write `stem.json` (graph) and `stem.safetensors` (tensors); returns the manifest entry."""
    graph = serialize(ep, serialize_state_dict=False, serialize_constants=False,
                      serialize_example_inputs=False).exported_program
    tensors, aliases = {}, {}
    _collect(tensors, aliases, "state_dict", ep.state_dict)
    _collect(tensors, aliases, "constants", ep.constants)
    example = None
    if ep.example_inputs is not None:
        leaves, spec = tree_flatten(ep.example_inputs)
        values = []
        for i, leaf in enumerate(leaves):
            if isinstance(leaf, torch.Tensor):
                _collect(tensors, aliases, "example", {str(i): leaf})
                values.append({"tensor": str(i)})
            elif isinstance(leaf, _SCALARS):
                values.append({"value": leaf})
            else:
                raise OptimError(f"cannot save an example input of type {type(leaf).__name__}")
        example = {"spec": treespec_dumps(spec), "leaves": values}
    (directory / f"{stem}.json").write_bytes(graph)
    save_file(tensors, str(directory / f"{stem}.safetensors"))
    parameters = {k: v.requires_grad for k, v in ep.state_dict.items()
                  if isinstance(v, torch.nn.Parameter)}
    return {"graph": f"{stem}.json", "tensors": f"{stem}.safetensors", "aliases": aliases,
            "parameters": parameters, "example": example}


def _collect(tensors: dict, aliases: dict, group: str, named: dict) -> None:
    """Add `named` tensors under `group/name`; a tensor sharing storage with one already added
    (tied weights) is saved once and recorded as an alias."""
    seen = {(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype): k
            for k, t in tensors.items()}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise OptimError(f"cannot save {group} entry {name!r} of type {type(t).__name__}: "
                             f"only tensors are saved (no pickled objects)")
        key = f"{group}/{name}"
        t = t.detach()
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if ident in seen and t.numel():
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        tensors[key] = t.contiguous().clone() if not t.is_contiguous() else t.clone()


def load_program(directory: Path, entry: dict) -> torch.export.ExportedProgram:
    """The program `save_program` wrote, rebuilt without unpickling anything."""
    try:
        graph = (directory / entry["graph"]).read_bytes()
        tensors = load_file(str(directory / entry["tensors"]))
        for alias, source in (entry.get("aliases") or {}).items():
            tensors[alias] = tensors[source]
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise OptimError(f"{directory}: the saved program cannot be read ({e}); the save is "
                         f"damaged, optimize the model again") from e
    groups: dict[str, dict] = {"state_dict": {}, "constants": {}, "example": {}}
    for key, t in tensors.items():
        group, _, name = key.partition("/")
        if group not in groups:
            raise OptimError(f"{directory}: unexpected tensor {key!r} in {entry['tensors']}")
        groups[group][name] = t
    for name, grad in (entry.get("parameters") or {}).items():
        if name in groups["state_dict"]:
            groups["state_dict"][name] = torch.nn.Parameter(groups["state_dict"][name],
                                                            requires_grad=bool(grad))
    example = _example(entry.get("example"), groups["example"], directory)
    try:
        return deserialize(SerializedArtifact(graph, groups["state_dict"], groups["constants"],
                                              example))
    except Exception as e:  # torch's deserializer raises many types on a damaged graph
        raise OptimError(f"{directory}: the saved graph {entry['graph']} cannot be rebuilt "
                         f"({type(e).__name__}: {e}); the save is damaged or from another "
                         f"torch version, optimize the model again") from e


def _example(saved: dict | None, tensors: dict, directory: Path):
    if saved is None:
        return b""  # torch's "none saved" (an empty tuple would be bound as the inputs)
    try:
        leaves = [tensors[v["tensor"]] if "tensor" in v else v["value"] for v in saved["leaves"]]
        return tree_unflatten(leaves, treespec_loads(saved["spec"]))
    except (KeyError, TypeError, ValueError, NotImplementedError) as e:
        raise OptimError(f"{directory}: the saved example inputs cannot be rebuilt ({e}); the "
                         f"save is damaged") from e
