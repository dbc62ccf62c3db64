"""Fit a target's `Calibration` to measured latencies, and score predictions against measurements.

The fit is least squares on log(predicted / measured) over whole-model latencies (each graph's
kernels from `opcost`), so a 1 ms and a 100 ms model weigh the same. Eight parameters: large-GEMM
efficiency for float and int8, the GEMM fall-off `d_half`, bandwidth efficiency, its fall-off
`b_half`, the per-launch cost, fused attention relative to a GEMM, and the unfused share. Fitted
calibrations are saved as JSON beside the cpu probe cache, keyed by target and backend; the
driver (`optim.targets`) passes them to `estimate`.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np

from hardware.costmodel import Calibration, default_calibration, estimate_kernels
from hardware.opcost import Kernel
from hardware.spec import HardwareSpec

_PARAMS = ("gemm_float", "gemm_int8", "d_half", "mem_eff", "b_half", "launch_s", "attn_eff",
           "unfused")


def _with(cal: Calibration, x: np.ndarray) -> Calibration:
    g_f, g_i, d_half, mem, b_half, launch, attn, unfused = np.exp(x)
    return replace(cal, gemm_eff={"*": float(g_f), "int8": float(g_i)}, d_half=float(d_half),
                   mem_eff=float(mem), b_half=float(b_half), launch_s=float(launch),
                   attn_eff=float(attn), unfused=float(unfused))


def fit(spec: HardwareSpec, graphs: list[list[Kernel]], measured_s: list[float],
        source: str, precisions: list[str] | None = None) -> Calibration:
    """Calibration minimising the log error of `estimate` over the given graphs (each run in
    its `precisions` entry, default the graph's own dtypes)."""
    from scipy.optimize import least_squares

    base = default_calibration(spec)
    x0 = np.log([base.gemm_eff.get("*", 0.5), base.gemm_eff.get("int8", 0.5), max(base.d_half, 1),
                 base.mem_eff, max(base.b_half, 1e3), base.launch_s, 1.0, 0.1])
    y = np.log(measured_s)

    prec = precisions or ["graph"] * len(graphs)

    def predict(cal):
        return [estimate_kernels(g, spec, cal, p).seconds for g, p in zip(graphs, prec)]

    def resid(x):
        return np.log(predict(_with(base, x))) - y

    # bounds keep every parameter physical: efficiencies in (0, 1.2], positive fall-offs
    lo = np.log([1e-3, 1e-3, 0.5, 1e-2, 1e2, 1e-7, 0.05, 1e-3])
    hi = np.log([1.2, 1.2, 4096, 1.5, 1e9, 1e-3, 5.0, 1.0])
    res = least_squares(resid, np.clip(x0, lo + 1e-9, hi - 1e-9), bounds=(lo, hi))
    cal = _with(base, res.x)
    train = score(predict(cal), measured_s)
    return replace(cal, source=source,
                   fit={"configs": len(graphs), "train": train,
                        "params": dict(zip(_PARAMS, map(float, np.exp(res.x))))})


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = _ranks(a), _ranks(b)
    if len(a) < 2 or np.std(ra) == 0 or np.std(rb) == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def _ranks(x: list[float]) -> np.ndarray:
    x = np.asarray(x, dtype=float)
    order = x.argsort()
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    for v in np.unique(x):  # average ties
        idx = x == v
        ranks[idx] = ranks[idx].mean()
    return ranks


def score(predicted: list[float], measured: list[float]) -> dict:
    """MAPE, share within +-10% / +-25%, geomean error ratio, Spearman rank correlation."""
    p, m = np.asarray(predicted), np.asarray(measured)
    rel = np.abs(p - m) / m
    return {"n": int(len(m)), "mape": float(rel.mean()), "within_10": float((rel <= 0.10).mean()),
            "within_25": float((rel <= 0.25).mean()),
            "geomean_ratio": float(math.exp(np.abs(np.log(p / m)).mean())),
            "spearman": spearman(list(p), list(m))}


def save(cal: Calibration, path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cal.to_dict(), indent=2))


def load(path) -> Calibration:
    return Calibration.from_dict(json.loads(Path(path).read_text()))


SHIPPED = Path(__file__).parent / "calibrations"  # fitted on real hardware, one per target


def shipped(spec: HardwareSpec) -> Calibration | None:
    """The calibration optim ships for `spec` (fitted on that hardware), if any."""
    path = SHIPPED / f"{spec.name}.json"
    return load(path) if path.exists() else None
