"""distill_widths: a nested-width graph ⇒ the same graph with its linear weights trained so that
every width matches the original model (DynaBERT / MatFormer width-aware distillation).

`dynamic_width` only orders a model trained at one width; its narrow prefixes lose a lot. This
pass trains every linear's weight and bias on the calibration batches with the sandwich rule
(each step: the widest, the narrowest and one other width, all reading views of the same
weights) against the original full-width outputs (`passes.common.width_distill`). One batch in four
(at least one, when there are two or more) is held out; the trained weights are kept only if
the held-out error, summed over the widths, falls. Requires: dynamic_width. Numerics: lossy at
full width (the weights move); the report gives each width's held-out error before and after.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from optim.errors import ConfigError
from optim.pass_base import Lossy, PassContext, register_pass
from passes.common.graph_runner import split_held_out
from passes.common.width_distill import distill


@dataclass(frozen=True)
class DistillWidthsConfig:
    """Options for distill_widths."""

    widths: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25)  # the widths trained together
    steps: int = 100  # Adam steps (each runs up to three widths on one calibration batch)
    lr: float = 1e-4
    seed: int = 0

    def validate(self) -> None:
        if len(self.widths) < 2 or any(not (0 < w <= 1) for w in self.widths):
            raise ValueError("widths must be at least two numbers in (0, 1]")
        if self.steps < 1:
            raise ValueError("steps must be >= 1")
        if not 0 < self.lr < 1:
            raise ValueError("lr must be in (0, 1)")


@register_pass("distill_widths", config=DistillWidthsConfig, numerics=Lossy("cosine_min", 0.9),
               requires=("dynamic_width",))
def distill_widths(gm: torch.fx.GraphModule, cfg: DistillWidthsConfig, ctx: PassContext) -> None:
    """Train the linear weights so that every nested width matches the full model."""
    plan = gm.meta.get("width_plan")
    if plan is None:
        raise ConfigError("distill_widths found no nested widths: run dynamic_width before it "
                          "in the same pipeline (and check its report: it may have found no "
                          "heads or MLPs to nest)")
    batches = ctx.calibration or [ctx.example_inputs]
    train, held = split_held_out(batches)
    if len(batches) == 1:
        ctx.skip("calibration", "only one calibration batch: the error is measured on the "
                                "batch it was trained on (give more batches to hold some out)")
    widths = sorted(set(cfg.widths) | {1.0}, reverse=True)
    result = distill(gm, plan, widths, train, held, cfg.steps, cfg.lr, cfg.seed)
    if result["kept"]:
        ctx.record("weights_trained", result["weights_trained"])
    else:
        ctx.skip("weights", "training did not lower the held-out error; the weights are "
                            "unchanged (try more steps, another lr, or more calibration data)")
    ctx.details.update(result, held_out_batches=len(held), train_batches=len(train))
