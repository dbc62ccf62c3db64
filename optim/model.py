"""`OptimizedModel`: what `optimize()` returns and `optim.load` reads back. Callable like the
original, with the report, the post-pass graph (for estimates and nested widths) and `save`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree

from backends.base import Artifact
from hardware.estimate import estimate, report_section
from hardware.opcost import Kernel
from hardware.plots import kernel_points, roofline_png
from optim import saving
from optim.capture import Batch
from optim.errors import ConfigError
from optim.registry import BACKENDS
from optim.report import Report
from optim.shapes import ShapeSpec
from optim.targets import resolve_target
from optim.timing import kernels_at
from passes.common.nested_width import at_width, layer_widths


class OptimizedModel:
    """The result of `optimize()`: callable like the original model, with `.report`."""

    def __init__(self, artifact: Artifact, report: Report,
                 graph: torch.fx.GraphModule | None = None, example: Batch | None = None,
                 stages: dict[str, list[Kernel]] | None = None, backend_options: Any = None,
                 shapes: ShapeSpec | None = None):
        self.artifact = artifact
        self.report = report
        self.graph = graph
        self.example = example  # the (args, kwargs) it was traced with
        self.stages = stages or {}  # kernels after capture and after each pass (cost model)
        self.backend_options = backend_options  # how `artifact` was lowered (nested widths too)
        self.shapes = shapes  # the inputs it accepts: dtypes, ranks, dynamic ranges
        self._widths: dict = {}  # nested width -> artifact (dynamic_width)
        self.width_plan: dict | None = None  # dynamic_width's plan, when not the report's

    @property
    def backend(self) -> str:
        return self.report["backend"]["name"]

    @property
    def cuda_source(self) -> str | None:
        """CUDA C generated for a GPU target (tvm backend), else None."""
        return getattr(self.artifact, "cuda_source", None)

    def __call__(self, *args, **kwargs):
        if self.shapes is not None:  # a clear error instead of a backend's guard failure
            self.shapes.check(args, kwargs)
            kwargs = self.shapes.with_defaults(kwargs)
        with torch.inference_mode():
            return self.artifact(*args, **kwargs)

    def estimate(self, target: str, inputs: Batch | None = None, **options) -> dict:
        """The cost model's view of this model on `target` (any name `optim targets` lists):
        estimated latency after each pass, bound, bytes by class, memory fit, energy. With
        `inputs` (args, kwargs), the optimized graph alone, at those inputs' shapes (and, after
        remove_padding, their real token counts) instead of the example's."""
        if not self.stages:
            raise ConfigError("this model has no graph stages to estimate (loaded from disk?); "
                              "run optimize() again to estimate it")
        m = self.report["model"]
        memory = float(m.get("weight_bytes_after", m["weight_bytes"]))
        stages = self.stages
        if inputs is not None:
            if self.shapes is not None:
                self.shapes.check(*inputs)
            stages = {"optimized": kernels_at(self.graph, *inputs)}
        return report_section(stages, resolve_target(target), memory_bytes=memory, **options)

    def rooflines(self) -> dict[str, bytes]:
        """A roofline PNG per estimated target with every kernel of the optimized graph on it."""
        if self.graph is None:
            return {}
        out = {}
        for e in self.report.data.get("estimates", []):
            t = resolve_target(e["target"])
            out[t.name] = roofline_png(t.spec, kernel_points(estimate(self.graph, t.spec,
                                                                      t.calibration)),
                                       f"{self.report['model']['name']} on {t.name} (estimated)")
        return out

    def at_width(self, width) -> Callable:
        """The model at a nested width (after the `dynamic_width` pass): `width` in (0, 1] for
        every layer, or a list with one per layer (Mix'n'Match). Built once per width on the
        same backend and cached; the weights are views of this model's, not copies."""
        plan = self._width_plan()
        key = tuple(layer_widths(plan, width))
        if key not in self._widths:
            args, kwargs = self.example
            gm = at_width(self.graph, plan, list(key), args, kwargs)
            if self.shapes is not None:
                gm.meta["shapes"] = self.shapes
            backend = BACKENDS.get(self.backend)
            options = self.backend_options or backend.make_options(None)
            target = resolve_target(self.report["target"]["name"])
            self._widths[key] = backend.lower(gm, (args, kwargs), target, options, None)
        artifact = self._widths[key]

        def run(*args, **kwargs):
            if self.shapes is not None:
                self.shapes.check(args, kwargs)
            with torch.inference_mode():
                return artifact(*args, **kwargs)

        return run

    def timestep_widths(self, schedule: list[tuple[float, float]],
                        timestep: str = "timestep") -> Callable:
        """A callable that runs each call at the width the diffusion timestep asks for (DyDiT's
        timestep-wise width): `schedule` is [(t_min, width), ...]; a call whose keyword
        `timestep` is >= t_min (largest t_min first) runs at that width. A batch whose
        elements ask for different widths is split by width, each part run at its own, and the
        outputs put back in the batch's order."""
        steps = sorted(schedule, key=lambda s: -s[0])
        if not steps:
            raise ConfigError("timestep_widths needs at least one (t_min, width) pair")
        for _, w in steps:
            self.at_width(w)  # builds (and validates) every width up front

        def run(*args, **kwargs):
            if timestep not in kwargs:
                raise ConfigError(f"timestep_widths: the call has no {timestep!r} keyword")
            ts = torch.as_tensor(kwargs[timestep]).flatten().tolist()
            widths = [next((w for t_min, w in steps if t >= t_min), steps[-1][1]) for t in ts]
            if len(set(widths)) == 1:
                return self.at_width(widths[0])(*args, **kwargs)
            static = self.shapes is not None and "batch" not in self.shapes.ranges
            return _split_by_width(self.at_width, widths, args, kwargs, static)

        return run

    def _width_plan(self) -> dict:
        if self.width_plan is not None:  # set by optim.load (node names of the loaded graph)
            return self.width_plan
        if self.graph is None:
            raise ConfigError("this model has no graph (loaded from disk?); run optimize() again")
        plan = self.report.pass_details("dynamic_width").get("plan")
        if not plan:
            raise ConfigError("at_width needs the dynamic_width pass in the pipeline (it orders "
                              "heads and neurons so that every width is a prefix)")
        return plan

    def save(self, directory: str | Path) -> Path:
        """Write the compiled artifact and report to `directory` (no pickle)."""
        return saving.save(self, Path(directory))

    def __repr__(self) -> str:
        return (f"OptimizedModel({self.report['model']['name']}, "
                f"target={self.report['target']['name']}, backend={self.backend}, "
                f"passes={[p['name'] for p in self.report['passes']]})")


def load(directory: str | Path, trust_compiled_code: bool = False,
         found: dict | None = None) -> OptimizedModel:
    """Load a model written by `OptimizedModel.save` (in this or a fresh process); see
    `optim.load`."""
    saved = saving.load(Path(directory), trust_compiled_code, found)
    om = OptimizedModel(saved.artifact, saved.report, saved.graph, saved.example,
                        shapes=saved.shapes)
    om.width_plan = saved.width_plan
    return om


def _split_by_width(at_width, widths: list[float], args: tuple, kwargs: dict,
                    static_batch: bool = False):
    """Run each group of batch elements that asks for one width at that width; the outputs
    are concatenated back in the batch's order (every tensor with the batch as its first axis
    is split; other inputs go to every part). A model with a static batch runs each group
    filled up to the batch with copies of its first element, whose outputs are dropped."""
    batch = len(widths)
    parts, order = [], []
    for width in sorted(set(widths), reverse=True):
        rows = [i for i, w in enumerate(widths) if w == width]
        index = torch.tensor(rows + rows[:1] * (batch - len(rows)) if static_batch else rows)

        def take(x, index=index):
            return x.index_select(0, index) if isinstance(x, torch.Tensor) and x.dim() \
                and x.shape[0] == batch else x

        out = at_width(width)(*pytree.tree_map(take, args), **pytree.tree_map(take, kwargs))
        parts.append(pytree.tree_map(lambda t, n=len(rows): t[:n] if isinstance(
            t, torch.Tensor) and t.dim() and t.shape[0] == batch else t, out))
        order.append(index[:len(rows)])
    leaves = [pytree.tree_flatten(p) for p in parts]
    spec = leaves[0][1]
    restore = torch.argsort(torch.cat(order))
    merged = [torch.cat(group, 0).index_select(0, restore)
              if isinstance(group[0], torch.Tensor) and group[0].dim() else group[0]
              for group in zip(*[flat for flat, _ in leaves])]
    return pytree.tree_unflatten(merged, spec)
