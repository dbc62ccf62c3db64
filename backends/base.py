"""The backend contract. A backend is a name, an options dataclass and

    lower(graph, example, target, options, progress) -> Artifact

registered with `@register_backend`. An `Artifact` runs like the model (`__call__`), says what it
is (`info()`), writes itself into a directory (`save(dir) -> manifest entries`), and its
backend's `load(dir, manifest, in_spec, out_spec)` reads it back in a fresh process. The driver
and `optim.saving` only ever go through this contract; they never name a backend.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.fx

from hardware.target import Target
from optim.pass_base import config_from_dict
from optim.registry import BACKENDS

Batch = tuple[tuple, dict]
Progress = Callable[[str], None]


class Artifact:
    """What a backend's `lower` returns. Subclasses implement `__call__`, `info` and `save`."""

    backend: str = ""

    def __call__(self, *args, **kwargs):
        raise NotImplementedError

    def info(self) -> dict:
        """The report's backend section: runtime, version, threads, ops, build facts."""
        raise NotImplementedError

    def save(self, directory: Path) -> dict:
        """Write the artifact's files into `directory`; returns the manifest entries `load`
        reads back."""
        raise NotImplementedError

    binds_buffers: bool = False  # implements `run_bound`

    def run_bound(self, inputs: list, outputs: list) -> None:
        """One run on the flat tensor inputs (traced order), writing the flat outputs into the
        preallocated, contiguous `outputs` without copies (e.g. ONNX Runtime's I/O binding)."""
        raise NotImplementedError

    def measured_latency(self) -> list[dict]:
        """Latency rows this artifact measured while lowering (e.g. on a GPU); default none."""
        return []


@dataclass(frozen=True)
class Backend:
    name: str
    options: type  # a dataclass: the options users may pass (`backend_options=`)
    lower: Callable[[torch.fx.GraphModule, Batch, Target, Any, Progress], Artifact]
    load: Callable[[Path, dict, Any, Any], Artifact]
    summary: str
    dynamic: bool = False  # runs the dynamic axes of `gm.meta["shapes"]` (optim.shapes)
    runs_code: bool = False  # loading a save runs compiled code from it (a shared library)

    def make_options(self, options: Any) -> Any:
        return config_from_dict(self.options, options, f"backend {self.name!r}")

    def option_names(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self.options)]


def register_backend(name: str, *, options: type, load: Callable, dynamic: bool = False,
                     runs_code: bool = False):
    """Register `lower(gm, example, target, options, progress) -> Artifact` as backend `name`;
    the docstring's first line is its summary. `dynamic`: the artifact runs every shape in the
    ranges of `gm.meta["shapes"]` (otherwise the driver captures static shapes for it).
    `runs_code`: its saves hold compiled code that loading executes (`optim.load` asks for
    `trust_compiled_code=True`)."""

    def deco(lower):
        summary = (lower.__doc__ or "").strip().splitlines()[0] if lower.__doc__ else name
        BACKENDS.add(name, Backend(name, options, lower, load, summary, dynamic, runs_code))
        return lower

    return deco


def pytree_specs(gm: torch.fx.GraphModule) -> tuple[Any, Any]:
    """(in_spec, out_spec) of a captured graph, or (None, None)."""
    info = getattr(gm._graph._codegen, "pytree_info", None)
    return (info.in_spec, info.out_spec) if info else (None, None)
