"""Running a graph on calibration batches, and the pieces every output-matching pass trains with:
the graph's float outputs on a batch, the relative output error against a teacher, a held-out
split of the batches, the training loss, and a constant swapped for a tensor that carries
gradients. Used by `linearize_attention` (stage 2), `binarize` (QAT), `distill_widths`,
`distill_outputs`, and by the driver to record the teacher's outputs.
"""

from __future__ import annotations

import torch
import torch.fx

from optim.ir import flatten_inputs
from optim.numerics import tensor_leaves


def run(gm: torch.fx.GraphModule, batch) -> list[torch.Tensor]:
    """The graph's floating-point outputs on one (args, kwargs) batch."""
    out = torch.fx.Interpreter(gm).run(*flatten_inputs(gm, *batch))
    return [t for t in tensor_leaves(out) if t.is_floating_point()]


def output_error(gm: torch.fx.GraphModule, batches: list, teacher: list) -> float:
    """Σ‖out − teacher‖² / Σ‖teacher‖² over `batches` (teacher: one output list per batch)."""
    num = den = 0.0
    with torch.no_grad():
        for batch, ref in zip(batches, teacher):
            for got, want in zip(run(gm, batch), ref):
                num += float((got - want).pow(2).sum())
                den += float(want.pow(2).sum())
    return num / max(den, 1e-30)


def split_held_out(batches: list) -> tuple[list, list]:
    """(train, held-out) calibration batches: a quarter held out (one of 2–3; none of 1, and
    then the error is measured on the training batch itself)."""
    n_held = len(batches) // 4 if len(batches) >= 4 else int(len(batches) >= 2)
    return batches[:len(batches) - n_held], batches[len(batches) - n_held:] or batches


def output_loss(outs: list, ref: list) -> torch.Tensor:
    """The training loss: each output's relative mean squared error, averaged."""
    return sum((o - r).pow(2).mean() / r.pow(2).mean().clamp_min(1e-30)
               for o, r in zip(outs, ref)) / max(len(ref), 1)


def swap_constant(gm: torch.fx.GraphModule, target: str, value: torch.Tensor) -> None:
    """Put `value` (possibly a non-leaf tensor carrying gradients) behind a get_attr target."""
    *path, leaf = target.split(".")
    mod = gm
    for p in path:
        mod = getattr(mod, p)
    mod._parameters.pop(leaf, None)
    mod._buffers[leaf] = value
