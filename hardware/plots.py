"""Plots for reports, as PNG bytes (matplotlib figures drawn on the Agg canvas: no display, and
pyplot's global backend is left alone).

    a100 = resolve_target("a100")
    png = roofline_png(a100.spec, kernel_points(estimate(gm, a100.spec, a100.calibration)), "bert")
    png = stage_bars_png(report["estimates"])

Every figure is labelled with what its numbers are: kernel points and stage bars are
*estimated* (the cost model), ceilings and bound marks are the datasheet roofline (a *bound*).
This module imports neither torch nor the rest of `hardware`, so renderers can use it on saved
report JSON alone.
"""

from __future__ import annotations

import io
import math
from typing import Any

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

KIND_STYLE = {  # kernel kind -> (marker, colour)
    "gemm": ("o", "tab:blue"),
    "attention": ("^", "tab:red"),
    "fused": ("s", "tab:green"),
    "embedding": ("D", "tab:purple"),
}
OTHER_STYLE = ("x", "tab:gray")
INT_DTYPES = ("int8", "int4", "binary")


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    FigureCanvasAgg(fig)
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def kernel_points(est: Any) -> list[dict]:
    """Roofline points from an `Estimate` (all its kernels), or from a report's per-target
    estimate dict (only its `top_kernels`). Kernels with no FLOPs or no time are left out."""
    if isinstance(est, dict):
        rows = [{**k, "total_bytes": sum((k.get("bytes") or {}).values())}
                for k in est.get("top_kernels", [])]
    else:
        rows = [{**e.to_dict(), "module": e.kernel.module, "total_bytes": e.kernel.total_bytes}
                for e in est.kernels]
    out = []
    for r in rows:
        flops, seconds, nbytes = float(r.get("flops") or 0), float(r.get("seconds") or 0), \
            float(r["total_bytes"])
        if flops <= 0 or seconds <= 0:
            continue
        out.append({"name": r["name"], "module": r.get("module", ""), "kind": r["kind"],
                    "dtype": r.get("dtype"), "peak_dtype": r.get("peak_dtype"),
                    "bound": r.get("bound"), "flops": flops, "bytes": nbytes,
                    "intensity": flops / max(nbytes, 1.0), "seconds": seconds,
                    "achieved_flops": flops / seconds})
    return out


def _ceilings(spec: Any) -> tuple[str, dict[str, float], float]:
    """(name, dtype -> peak FLOP/s, bandwidth B/s) from a `HardwareSpec` or a plain dict
    {"name", "peak": {dtype: FLOP/s}, "mem_bandwidth": B/s}."""
    if isinstance(spec, dict):
        return spec.get("name", "target"), {k: float(v) for k, v in spec["peak"].items()}, \
            float(spec["mem_bandwidth"])
    return spec.name, {k: float(q.value) for k, q in spec.peak.items()}, \
        float(spec.mem_bandwidth.value)


def _rate(flops: float, dtypes: list[str]) -> str:
    unit = "OP/s" if all(d in INT_DTYPES for d in dtypes) else "FLOP/s"
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M")):
        if flops >= scale:
            return f"{flops / scale:.3g} {prefix}{unit}"
    return f"{flops:.3g} {unit}"


def roofline_png(spec: Any, kernel_points: list[dict], title: str = "") -> bytes:
    """Log-log roofline of `spec` (memory slope, one labelled ceiling per peak in the spec; equal
    peaks share one line) with `kernel_points` (from `kernel_points()`) as estimated points:
    x = arithmetic intensity (FLOP/byte), y = achieved FLOP/s, marker by kernel kind."""
    name, peaks, bw = _ceilings(spec)
    by_value: dict[float, list[str]] = {}
    for dtype, value in sorted(peaks.items(), key=lambda kv: kv[1]):
        if value > 0:
            by_value.setdefault(value, []).append(dtype)
    pts = [p for p in kernel_points if p.get("flops", 0) > 0 and p.get("seconds", 0) > 0]
    ridges = [v / bw for v in by_value] or [1.0]
    xs = [p["intensity"] for p in pts]
    ys = [p["achieved_flops"] for p in pts]
    x_lo = 10 ** math.floor(math.log10(min([*xs, min(ridges) / 10, 0.1])))
    x_hi = 10 ** math.ceil(math.log10(max([*xs, max(ridges) * 10])))
    top = max(by_value, default=bw * x_hi)
    y_lo = 10 ** math.floor(math.log10(min([*ys, bw * x_lo, top / 1e4])))

    fig = Figure(figsize=(7.5, 6))
    ax = fig.subplots()
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.plot([x_lo, max(ridges)], [bw * x_lo, bw * max(ridges)], color="black", lw=1.5,
            label=f"memory {bw / 1e9:.4g} GB/s (bound)")
    for value, dtypes in by_value.items():
        ridge = value / bw
        ax.plot([ridge, x_hi], [value, value], color="black", lw=1, ls="--")
        ax.text(x_hi, value, f"{'/'.join(dtypes)} {_rate(value, dtypes)} ", ha="right",
                va="bottom", fontsize=7.5)
    seen: set[str] = set()
    for p in pts:
        marker, colour = KIND_STYLE.get(p["kind"], OTHER_STYLE)
        label = None if p["kind"] in seen else f"{p['kind']} (estimated)"
        seen.add(p["kind"])
        ax.scatter(p["intensity"], p["achieved_flops"], marker=marker, color=colour, s=28,
                   alpha=0.75, label=label, zorder=3)
    ax.set_xlim(x_lo, x_hi)
    ax.set_ylim(y_lo, top * 3)
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("achieved FLOP/s (estimated)")
    ax.set_title(title or f"roofline: {name}", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.text(0.01, -0.02, "ceilings: datasheet peaks at 100% (bound); points: kernel FLOPs / "
             "estimated seconds", fontsize=7, color="dimgray")
    return _png(fig)


def stage_bars_png(estimates: list[dict], show_bound: bool = True) -> bytes:
    """Grouped bars: per target, estimated latency after each pipeline stage (each estimate's
    `stages`); a black tick marks the final roofline bound. Log y axis if values span > 100x."""
    stages: list[str] = []
    for e in estimates:
        for s in e.get("stages", []):
            if s["after"] not in stages:
                stages.append(s["after"])
    targets = [e["target"] for e in estimates]
    n = max(len(stages), 1)
    width = 0.8 / n
    fig = Figure(figsize=(max(5.0, 1.2 + len(targets) * (0.5 + 0.35 * n)), 4.5))
    ax = fig.subplots()
    values: list[float] = []
    palette = matplotlib.colormaps["tab10"]
    for j, stage in enumerate(stages):
        xs, hs = [], []
        for i, e in enumerate(estimates):
            ms = next((s["estimated_ms"] for s in e.get("stages", []) if s["after"] == stage),
                      None)
            if isinstance(ms, (int, float)) and ms > 0:
                xs.append(i - 0.4 + width * (j + 0.5))
                hs.append(ms)
        values += hs
        label = stage if stage == "captured" else f"after {stage}"
        ax.bar(xs, hs, width=width * 0.95, color=palette(j % 10), label=label)
    if show_bound:
        label = "roofline bound (final)"
        for i, e in enumerate(estimates):
            b = e.get("bound_ms")
            if isinstance(b, (int, float)) and b > 0:
                ax.hlines(b, i - 0.42, i + 0.42, color="black", lw=2, label=label)
                values.append(b)
                label = None
    if values and max(values) / min(values) > 100:
        ax.set_yscale("log")
    ax.set_xticks(range(len(targets)), targets)
    ax.set_ylabel("estimated latency (ms)")
    ax.set_title("estimated latency after each pipeline stage, per target", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.text(0.01, -0.03,
             "bars: estimated by the optim cost model; black ticks: datasheet roofline "
             "(a lower bound); nothing here is measured",
             fontsize=7, color="dimgray")
    return _png(fig)
