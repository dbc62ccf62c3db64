"""distill_outputs: the float linears' weights and biases, as earlier lossy passes left them
(heads and neurons pruned, factorized, masked), are trained so that the graph's outputs match the
original model's on calibration data: output-matching distillation, the step that follows
post-training pruning in published recipes, here on calibration batches only.

Same graph, same shapes, same cost: only constant values change. Weights that carry a sparsity
mask (mostly exact zeros, from `prune_weights`) keep their zeros. A quarter of the calibration
batches is held out; the trained weights are kept only if the held-out output error falls, and
otherwise the graph is left exactly as it was. Numerics: lossy (it exists to lower the error
the earlier passes caused; its report gives the held-out error before and after).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx

from optim.errors import ConfigError
from optim.pass_base import Lossy, PassContext, register_pass
from passes.common.graph_runner import split_held_out
from passes.common.linears import constant_linears
from passes.common.width_distill import distill


@dataclass(frozen=True)
class DistillOutputsConfig:
    """Options for distill_outputs."""

    steps: int = 100  # Adam steps, one calibration batch each
    lr: float = 1e-4
    seed: int = 0

    def validate(self) -> None:
        if self.steps < 1:
            raise ValueError("steps must be >= 1")
        if not 0 < self.lr < 1:
            raise ValueError("lr must be in (0, 1)")


@register_pass("distill_outputs", config=DistillOutputsConfig,
               numerics=Lossy("cosine_min", 0.0), teacher=True)
def distill_outputs(gm: torch.fx.GraphModule, cfg: DistillOutputsConfig,
                    ctx: PassContext) -> None:
    """Train the float linears so the graph's outputs match the original model's."""
    batches = ctx.calibration or [ctx.example_inputs]
    if not constant_linears(gm):
        ctx.skip("graph", "no float linear with constant weights left to train")
        return
    if not all(id(b) in ctx.teacher for b in batches):
        raise ConfigError("distill_outputs needs the original model's outputs on the "
                          "calibration batches: run it through optim.optimize or a pipeline "
                          "file, which record them before the first pass")
    train, held = split_held_out(batches)
    if len(batches) == 1:
        ctx.skip("calibration", "only one calibration batch: the error is measured on the "
                                "batch it was trained on (give more batches to hold some out)")
    result = distill(gm, None, [1.0], train, held, cfg.steps, cfg.lr, cfg.seed, ctx.teacher)
    before, after = result["relative_error_before"][1.0], result["relative_error_after"][1.0]
    if result["kept"]:
        ctx.record("weights_trained", result["weights_trained"])
    else:
        ctx.skip("weights", "training did not lower the held-out output error; the weights "
                            "are unchanged (try more steps, another lr, or more calibration data)")
    ctx.details.update(relative_error_before=before, relative_error_after=after,
                       kept=result["kept"], steps=cfg.steps, train_batches=len(train),
                       held_out_batches=len(held))
