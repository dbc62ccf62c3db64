"""torch backend: runs the rewritten FX graph eagerly (optim's ops run their CPU kernels)."""

from __future__ import annotations

import torch
import torch.fx

from optim.ir import op_histogram
from optim.registry import BACKENDS


class TorchArtifact:
    def __init__(self, gm: torch.fx.GraphModule):
        self.gm = gm

    def __call__(self, *args, **kwargs):
        with torch.inference_mode():
            return self.gm(*args, **kwargs)

    def info(self) -> dict:
        return {"runtime": f"torch {torch.__version__}", "threads": torch.get_num_threads(),
                "ops": op_histogram(self.gm)}


def lower(gm: torch.fx.GraphModule, args: tuple, kwargs: dict) -> TorchArtifact:
    return TorchArtifact(gm)


BACKENDS.add("torch", lower)
