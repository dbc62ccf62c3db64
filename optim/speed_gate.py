"""The speed gate: a pass that made the graph measurably slower here is undone.

When the target is this machine and the backend runs the rewritten graph itself (torch), each
pass is timed: the graph before it and after it, interleaved in one run at the example's
shapes. A pass whose graph is slower by more than `SLOWER_BY` is reverted (its record keeps the
counts it would have had, and says why it was undone, with both times), unless a later pass
in the pipeline requires it (then it stays, and its record says that too). Estimates for other
targets do not gate: the cost model is not calibrated well enough on small models to veto a
pass (benchmarks/RESULTS.md). While a pass runs, a copy of the graph before it is kept, weights
included (twice the model's memory for a moment); `optimize(..., speed_gate=False)` skips all
of this.
"""

from __future__ import annotations

import copy

import torch.fx

from optim.measure import measure
from optim.pass_base import Skip

SLOWER_BY = 1.05  # after / before median time above this is slower, beyond noise
BUDGET_S = 1.0  # seconds of timing per pass


class SpeedGate:
    def __init__(self, gm: torch.fx.GraphModule, example: tuple, required_later: dict):
        self.gm, self.example, self.required_later = gm, example, required_later
        self.snapshot: torch.fx.GraphModule | None = None

    def before(self, step) -> None:
        self.snapshot = copy.deepcopy(self.gm)

    def after(self, step, result) -> bool:
        """Whether the pass was undone (it changed the graph and made it slower here)."""
        if not result.changed or self.snapshot is None:
            return False
        b, a = self._times()
        if a > b * SLOWER_BY:  # a second run must agree before a pass is undone
            b, a = self._times()
        verdict = {"before_ms": round(b, 4), "after_ms": round(a, 4),
                   "basis": "graph before and after the pass, interleaved, median"}
        result.details["measured_here"] = verdict
        if a <= b * SLOWER_BY:
            return False
        needed = self.required_later.get(step.name)
        if needed:
            verdict["kept"] = f"{', '.join(needed)} requires it"
            return False
        _restore(self.gm, self.snapshot)
        verdict["reverted"] = True
        result.changed = False
        result.skipped.append(Skip("graph", f"undone: the graph measured {a:.3g} ms after the "
                                            f"pass against {b:.3g} ms before it, here"))
        return True


    def _times(self) -> tuple[float, float]:
        args, kwargs = self.example
        before, after = self.snapshot, self.gm
        m = measure({"before": lambda: before(*args, **kwargs),
                     "after": lambda: after(*args, **kwargs)}, budget_s=BUDGET_S, max_runs=30)
        return m["before"]["median_ms"], m["after"]["median_ms"]


def _restore(gm: torch.fx.GraphModule, snapshot: torch.fx.GraphModule) -> None:
    """Make `gm` (the object every later stage holds) the snapshot taken before the pass."""
    gm.__class__ = snapshot.__class__  # a GraphModule's class carries its generated forward
    gm.__dict__ = snapshot.__dict__
    gm.graph.owning_module = gm


def required_later(steps: list) -> dict[str, list[str]]:
    """Pass name -> the later steps in the pipeline that require it."""
    out: dict[str, list[str]] = {}
    for i, step in enumerate(steps):
        for later in steps[i + 1:]:
            if step.name in later.spec.requires:
                out.setdefault(step.name, []).append(later.name)
    return out
