"""Compare one model and pipeline across many targets in one report.

    om = optim.compare_targets(model, (ids,), targets=["cpu", "a100", "h100", "alveo-u280"])
    om.report["estimates"]        # one block per target: latency, bound, memory fit, energy, ...

The passes run once; the cost model estimates the post-pass graph (and the graph after each
pass, for what each pass bought) on every target. `cpu` is also measured when it is listed.
"""

from __future__ import annotations

from typing import Any

import torch

from optim.api import OptimizedModel, optimize
from optim.errors import ConfigError


def compare_targets(model: torch.nn.Module, example_inputs: Any = None, targets: list[str] = (),
                    pipeline: Any = None, **options: Any) -> OptimizedModel:
    """Optimize once, estimate on every target in `targets` (names from `optim targets`)."""
    targets = list(dict.fromkeys(targets))
    if not targets:
        raise ConfigError("compare_targets needs at least one target, e.g. ['cpu', 'a100']")
    first = "cpu" if "cpu" in targets else targets[0]
    rest = [t for t in targets if t != first]
    if pipeline is None and first == "cpu":
        pipeline = "cpu_default"
    return optimize(model, first, example_inputs, pipeline, estimate_targets=rest, **options)
