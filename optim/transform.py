"""② Passes: the pipeline run on the captured graph. After every step the graph's outputs are
compared with the original model's (an exact pass that moved them breaks its contract and
stops the run), and the cost model's kernels are kept, so estimates show what each pass bought."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from hardware.opcost import Kernel, graph_kernels
from optim import numerics
from optim.capture import Inputs, Original, token_mask
from optim.errors import NumericsError
from optim.ir import op_histogram
from optim.pass_base import Exact, PassContext
from optim.pipeline import Pipeline
from optim.report import PassRecord
from optim.targets import Target
from passes.common.graph_runner import run as run_graph


@dataclass
class Transformed:
    gm: torch.fx.GraphModule
    records: list[PassRecord]
    stages: dict[str, list[Kernel]]  # "captured", then one entry per pass
    histogram_before: dict[str, int]


def run_passes(original: Original, pipe: Pipeline, target: Target, inputs: Inputs,
               say=lambda msg: None) -> Transformed:
    gm = original.captured.gm
    histogram_before = op_histogram(gm)
    stages = {"captured": graph_kernels(gm)}
    ctx = PassContext(target=target, example_inputs=inputs.example,
                      calibration=inputs.calibration)
    (args, kwargs), ref = inputs.evals[0], original.refs[0]
    fidelity: dict[str, dict] = {}

    def check(step, result):
        fid = numerics.compare(ref, gm(*args, **kwargs), token_mask(kwargs))
        fidelity[step.name] = fid
        if isinstance(step.spec.numerics, Exact):
            scale = max(1.0, max((t.abs().max().item() for t in numerics.tensor_leaves(ref)),
                                 default=1.0))
            if fid["max_abs_error"] > step.spec.numerics.atol * scale:
                raise NumericsError(f"exact pass broke its contract: max abs error "
                                    f"{fid['max_abs_error']:.3g} > {step.spec.numerics.atol:g}")
        stages[step.name] = graph_kernels(gm)

    say(f"running passes: {', '.join(pipe.names) or '(none)'}")
    for step in pipe.inserted:
        say(f"  added {step.name}: {step.inserted_for} requires it")
    with torch.no_grad():
        if any(step.spec.teacher for step in pipe.steps):  # outputs before any pass ran
            ctx.teacher = {id(b): run_graph(gm, b) for b in ctx.calibration}
        results = pipe.run(gm, ctx, after_each=check)
    records = [PassRecord(r.name, r.changed, r.counts, [vars(s) for s in r.skipped], r.seconds,
                          r.details, s.spec.numerics.describe(), fidelity.get(s.name),
                          s.inserted_for)
               for r, s in zip(results, pipe.steps)]
    return Transformed(gm, records, stages, histogram_before)
