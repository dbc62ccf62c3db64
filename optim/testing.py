"""Run one pass on a small graph, for tests and for trying a pass out by hand.

    from optim.testing import capture_example, run_pass
    gm = capture_example(model, (ids,), {"attention_mask": mask})
    run = run_pass("fuse_attention", gm, (ids,), {"attention_mask": mask})
    run.result.counts, run.histogram_after, run.max_abs_error()

The graph is copied, so one captured graph serves many tests. Exact prerequisites the pass
requires (`cleanup` before `fuse_attention`) run first, as in a pipeline.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

import passes  # noqa: F401  (registers every pass)
from optim import numerics, shapes, zoo
from optim.ir import capture, op_histogram
from optim.pass_base import PassContext, PassResult
from optim.pipeline import Pipeline
from optim.targets import Target, resolve_target
from passes.common.graph_runner import run as run_graph

__all__ = ["capture_example", "capture_zoo", "histogram_diff", "run_pass", "PassRun"]


def capture_example(model: torch.nn.Module, args: tuple, kwargs: dict | None = None,
                    dynamic: Any = False) -> torch.fx.GraphModule:
    """`model` captured by torch.export at the example's shapes (the graph owns its weights);
    with `dynamic` (True or ranges, as `optimize` takes it) its batch and sequence axes stay
    symbolic, and `gm.meta["shapes"]` holds the accepted `optim.shapes.ShapeSpec`."""
    kwargs = dict(kwargs or {})
    if dynamic is False:
        return capture(model, args, kwargs).gm
    spec = shapes.infer(args, kwargs, dynamic)
    captured = capture(model, args, kwargs, shapes.export_shapes(spec, args, kwargs))
    captured.gm.meta["shapes"] = shapes.accepted(spec, captured.program)
    return captured.gm


def histogram_diff(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Ops whose count changed from `before` to `after` (op histograms), and by how much."""
    return {k: after.get(k, 0) - before.get(k, 0) for k in sorted(set(before) | set(after))
            if after.get(k, 0) != before.get(k, 0)}


def capture_zoo(name: str, **options) -> tuple[torch.fx.GraphModule, zoo.ZooModel]:
    """Zoo model `name` (`optim.zoo.load` options) and its graph captured at its example."""
    z = zoo.load(name, **options)
    return capture_example(z.model, z.example_args, z.example_kwargs), z


@dataclass
class PassRun:
    gm: torch.fx.GraphModule  # the graph after the pass
    result: PassResult  # the named pass's result
    results: list[PassResult]  # every step that ran (prerequisites first)
    before: list[torch.Tensor]  # float outputs on the example, before any step
    after: list[torch.Tensor]  # ... and after the last
    histogram_before: dict[str, int] = field(default_factory=dict)
    histogram_after: dict[str, int] = field(default_factory=dict)

    def max_abs_error(self) -> float:
        return max((float((a - b).abs().max()) for a, b in zip(self.after, self.before)),
                   default=0.0)

    def sqnr_db(self) -> float:
        ref = torch.cat([t.flatten() for t in self.before])
        got = torch.cat([t.flatten() for t in self.after])
        return numerics.sqnr_db(ref, got)

    def ops_added(self) -> dict[str, int]:
        return histogram_diff(self.histogram_before, self.histogram_after)


def run_pass(name: str, graph: torch.fx.GraphModule, args: tuple = (), kwargs: dict | None = None,
             *, options: dict | None = None, target: str | Target = "xeon-spr",
             calibration: list | None = None, prerequisites: bool = True,
             teacher: torch.fx.GraphModule | None = None, seed: int = 0,
             before: list | None = None, expect: bool = True) -> PassRun:
    """Run pass `name` with `options` on a copy of `graph` at the example `(args, kwargs)`.

    `calibration`: (args, kwargs) batches for passes that calibrate (default: the example).
    `target`: what the pass's cost-model gates read (default: a sourced spec, so no probe runs).
    `teacher`: the graph whose outputs a training pass matches (default: `graph` itself; give
    the original model's graph when `graph` already went through a lossy pass).
    `before`: pipeline entries to run first (a lossy prerequisite, which is never inserted).
    `expect`: the pass matching nothing is an error (a pipeline's default is to record it).
    """
    kwargs = dict(kwargs or {})
    gm = copy.deepcopy(graph)
    example = (tuple(args), kwargs)
    batches = list(calibration) if calibration else [example]
    entries: list[Any] = [*(before or []), {name: {"expect": expect, **(options or {})}}]
    pipe = Pipeline.build(entries, insert_prerequisites=prerequisites)
    ctx = PassContext(target=resolve_target(target), example_inputs=example,
                      calibration=batches, seed=seed)
    hist_before = op_histogram(gm)
    with torch.no_grad():
        before = run_graph(gm, example)
        if any(step.spec.teacher for step in pipe.steps):
            ctx.teacher = {id(b): run_graph(teacher or gm, b) for b in batches}
        results = pipe.run(gm, ctx)
        after = run_graph(gm, example)
    return PassRun(gm, results[-1], results, before, after, hist_before, op_histogram(gm))
