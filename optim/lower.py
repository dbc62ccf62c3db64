"""③ Lowering: the rewritten graph handed to a backend through the registry, which returns an
`Artifact` (`backends.base`). Nothing here names a backend."""

from __future__ import annotations

import time
from typing import Any

import torch.fx

import backends  # noqa: F401  (registers every backend)
from backends.base import Artifact, Backend
from optim.capture import Batch
from optim.registry import BACKENDS
from optim.shapes import ShapeSpec
from optim.targets import Target


def resolve_backend(name: str | None, target: Target, options: Any) -> tuple[Backend, Any]:
    """The backend (`name`, else the target's default) and its checked options."""
    backend = BACKENDS.get(name or target.default_backend)
    return backend, backend.make_options(options)


def lower(gm: torch.fx.GraphModule, example: Batch, target: Target, backend: Backend,
          options: Any, shapes: ShapeSpec | None = None,
          say=lambda msg: None) -> tuple[Artifact, float]:
    """`shapes` travels with the graph as `gm.meta["shapes"]`: a backend that runs more than
    one shape exports the dynamic axes it names."""
    say(f"lowering to {backend.name}")
    if shapes is not None:
        gm.meta["shapes"] = shapes
    t0 = time.perf_counter()
    artifact = backend.lower(gm, example, target, options, say)
    return artifact, time.perf_counter() - t0
