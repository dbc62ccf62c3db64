"""⑤ Latency: measured here (original and optimized interleaved in one run, so their ratio is
fair on a shared machine) and estimated for targets by the cost model (`hardware.estimate`).
Every row says which it is and where it came from."""

from __future__ import annotations

from collections.abc import Callable

import torch

from hardware.estimate import report_section
from hardware.opcost import Kernel, graph_kernels
from optim.capture import Batch
from optim.ir import refresh_meta, trial_copy
from optim.measure import measure
from optim.report import LatencyRow
from optim.targets import Target


def measure_here(model: torch.nn.Module, artifact: Callable, example: Batch, backend: str,
                 say=lambda msg: None) -> tuple[list[LatencyRow], dict]:
    say("measuring latency (original vs optimized, interleaved)")
    args, kwargs = example
    m = measure({"original": lambda: model(*args, **kwargs),
                 "optimized": lambda: artifact(*args, **kwargs)})
    rows = [LatencyRow.measured("original", "torch eager", m["original"]),
            LatencyRow.measured("optimized", backend, m["optimized"])]
    speedup = {"optimized_vs_original": m["original"]["median_ms"] / m["optimized"]["median_ms"],
               "basis": "ratio of medians measured in the same interleaved run"}
    return rows, speedup


SLOWER = 0.97  # a measured ratio below this is slower than the original, beyond noise


def slower_warning(speedup: dict, records: list) -> list[str]:
    """A line when the optimized model measured slower than the original here (never left
    for the user to find in a table)."""
    ratio = speedup.get("optimized_vs_original") if speedup else None
    if ratio is None or ratio >= SLOWER:
        return []
    changed = [r.name for r in records if r.changed]
    return [f"the optimized model measured {1 / ratio:.2f}x SLOWER than the original here "
            f"(same interleaved run); passes that changed it: {', '.join(changed) or 'none'}. "
            f"At these shapes the original may be the better choice: try fewer passes, or "
            f"larger inputs"]


def kernels_at(gm: torch.fx.GraphModule, args: tuple, kwargs: dict) -> list[Kernel]:
    """The kernels `gm` launches at these inputs (one real run on a copy of its graph: shapes,
    packed token counts and trimmed attention lengths as they are for these inputs)."""
    at = trial_copy(gm)  # shares the weights
    refresh_meta(at, args, kwargs)
    return graph_kernels(at)


def estimate_on(stages: dict[str, list[Kernel]], targets: list[Target],
                memory_bytes: float, say=lambda msg: None) -> list[dict]:
    """One cost-model section per target (each target once, in order)."""
    unique = list({t.name: t for t in targets}.values())
    say(f"estimating on {', '.join(t.name for t in unique)}")
    return [report_section(stages, t, memory_bytes=memory_bytes) for t in unique]


def estimate_rows(section: dict) -> list[LatencyRow]:
    """The main target's estimated latency before and after the passes, and its bound."""
    t = section["target"]
    return [LatencyRow(f"original @ {t}", "estimated", section["stages"][0]["estimated_ms"],
                       by=section["by"], target=t),
            LatencyRow(f"optimized @ {t}", "estimated", section["estimated_ms"], by=section["by"],
                       target=t, extra={"bound_kind": section["bound"]}),
            LatencyRow(f"optimized @ {t} (roofline bound)", "bound", section["bound_ms"],
                       by="datasheet peaks and bandwidth at 100%, no overhead: a lower bound",
                       target=t)]
