"""② Passes: the pipeline run on the captured graph. After every step the graph's outputs are
compared with the original model's (an exact pass that moved them breaks its contract and
stops the run), and the cost model's kernels are kept, so estimates show what each pass bought."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from hardware.opcost import Kernel, graph_kernels
from optim import numerics
from optim.capture import Inputs, Original, capture_model, token_mask
from optim.errors import NumericsError, StaticShapeError
from optim.ir import op_histogram
from optim.pass_base import Exact, PassContext
from optim.pipeline import Pipeline
from optim.report import PassRecord
from optim.speed_gate import SpeedGate, required_later
from optim.targets import Target
from passes.common.graph_runner import run as run_graph


@dataclass
class Transformed:
    gm: torch.fx.GraphModule
    records: list[PassRecord]
    stages: dict[str, list[Kernel]]  # "captured", then one entry per pass
    histogram_before: dict[str, int]

    def notes(self) -> list[str]:
        """A line for every pass that matched nothing (it ran, and changed nothing)."""
        return [f"{r.name} matched nothing ({r.details['matched_nothing']['reasons']}); "
                f"the model went on without it" for r in self.records
                if r.details.get("matched_nothing")]


def capture_and_run(model: torch.nn.Module, inputs: Inputs, pipe: Pipeline, target: Target,
                    say=lambda msg: None, gate: bool = False) -> tuple[Original, Transformed]:
    """① capture and ② passes. A pass that bakes the traced size of a dynamic axis into the
    graph is found by the probe check; unless the user asked for that axis to be dynamic, the
    model is captured again with it static (the report's shapes say which pass needed it).
    `gate`: undo a pass that made the graph measurably slower here (`optim.speed_gate`)."""
    while True:
        original = capture_model(model, inputs, say)
        try:
            return original, run_passes(original, pipe, target, inputs, say, gate)
        except StaticShapeError as e:
            if inputs.dynamic_asked or e.axis not in original.shapes.ranges:
                raise
            say(f"{e.pass_name} needs a static {e.axis}; capturing again with it static")
            inputs = inputs.static(e.axis, f"{e.pass_name} needs it ({e.detail})")


def run_passes(original: Original, pipe: Pipeline, target: Target, inputs: Inputs,
               say=lambda msg: None, gate: bool = False) -> Transformed:
    gm = original.captured.gm
    histogram_before = op_histogram(gm)
    stages = {"captured": graph_kernels(gm)}
    ctx = PassContext(target=target, example_inputs=inputs.example,
                      calibration=inputs.calibration)
    (args, kwargs), ref = inputs.evals[0], original.refs[0]
    fidelity: dict[str, dict] = {}
    done: list = []  # results of the steps that passed their checks

    # an exact pass is held to its tolerance against the outputs just before it (a lossy pass
    # earlier in the pipeline may already have moved them); fidelity is against the original
    last = {"example": ref, **{label: out for label, _, out in original.probes}}

    def check(step, result):
        out = gm(*args, **kwargs)
        fid = numerics.compare(ref, out, token_mask(kwargs))
        fidelity[step.name] = fid
        _check_exact(step, last["example"], numerics.compare(last["example"], out,
                                                             token_mask(kwargs)), "")
        last["example"] = out
        stages[step.name] = graph_kernels(gm)
        _check_other_shapes(gm, step, original.probes, last, [r.name for r in done])

    speed = SpeedGate(gm, inputs.example, required_later(pipe.steps)) if gate else None
    kept: dict = {}

    def before(step):
        if speed is not None:
            speed.before(step)
            kept.update(last=dict(last), stages=stages[list(stages)[-1]])

    def after(step, result):
        check(step, result)
        if speed is not None and speed.after(step, result):  # undone: as before the pass
            say(f"  {step.name} made the graph slower here; undone")
            last.update(kept["last"])
            stages[step.name] = kept["stages"]
            fidelity[step.name] = fidelity.get(done[-1].name) if done else None
        done.append(result)

    say(f"running passes: {', '.join(pipe.names) or '(none)'}")
    for step in pipe.inserted:
        say(f"  added {step.name}: {step.inserted_for} requires it")
    with torch.no_grad():
        if any(step.spec.teacher for step in pipe.steps):  # outputs before any pass ran
            ctx.teacher = {id(b): run_graph(gm, b) for b in ctx.calibration}
        results = pipe.run(gm, ctx, after_each=after, before_each=before)
    records = [PassRecord(r.name, r.changed, r.counts, [vars(s) for s in r.skipped], r.seconds,
                          r.details, s.spec.numerics.describe(), fidelity.get(s.name),
                          s.inserted_for)
               for r, s in zip(results, pipe.steps)]
    return Transformed(gm, records, stages, histogram_before)


def _check_other_shapes(gm, step, probes: list, last: dict, before: list[str]) -> None:
    """The graph must still run at the probe shapes (one per dynamic axis) and give outputs of
    the original model's shapes there; an exact pass must also keep its tolerance there (`last`:
    the outputs at each probe before this pass, updated)."""
    for label, (args, kwargs), ref in probes:
        try:
            out = gm(*args, **kwargs)
            fid = numerics.compare(last[label], out, token_mask(kwargs))
            numerics.compare(ref, out, token_mask(kwargs))  # same structure and shapes
        except Exception as e:  # a size baked into a view, a guard, a shape mismatch
            detail = f"at {label}: {type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
            raise StaticShapeError(step.name, before, label.split()[0], detail) from e
        _check_exact(step, last[label], fid, f" at {label}")
        last[label] = out


def _check_exact(step, ref, fid: dict, where: str) -> None:
    """An exact pass keeps the outputs within its tolerance, relative to their magnitude."""
    if not isinstance(step.spec.numerics, Exact):
        return
    scale = max(1.0, max((t.abs().max().item() for t in numerics.tensor_leaves(ref)),
                         default=1.0))
    if fid["max_abs_error"] > step.spec.numerics.atol * scale:
        raise NumericsError(f"exact pass broke its contract{where}: max abs error "
                            f"{fid['max_abs_error']:.3g} > {step.spec.numerics.atol:g}")
