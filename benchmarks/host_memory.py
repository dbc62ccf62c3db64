"""What keeping freed host memory (`optim.host_memory.keep_freed_memory`) does to a plain model.

all-MiniLM-L6-v2 at batch 8 × 128 (HF eager, and the graph optim builds with `cleanup,
fuse_attention`) is timed in fresh processes, alternating glibc's default with the setting, so
that the two see the same spells of this shared machine. The setting is process-wide, hence one
process per sample; each process reports the median of `--calls` calls after three warm-ups.

Usage: python benchmarks/host_memory.py [--pairs 4] [--calls 15]
       [--out benchmarks/results/host_memory.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from optim.measure import machine

CHILD = """
import json, sys, warnings
warnings.filterwarnings("ignore")
mode, form, calls = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode == "kept":
    from optim.host_memory import keep_freed_memory
    assert keep_freed_memory(), "not glibc"
import optim
from optim import zoo
from optim.measure import measure
z = zoo.load("minilm", batch=8, seq=128)
f = z.model
if form == "optimized":
    f = optim.optimize(z.model, "cpu", z.example_args, ["cleanup", "fuse_attention"],
                       example_kwargs=z.example_kwargs, backend="torch", measure_latency=False)
stats = measure({"f": lambda: f(*z.example_args, **z.example_kwargs)}, warmup=3,
                min_runs=calls, max_runs=calls)
print(json.dumps(stats["f"]["median_ms"]))
"""


def sample(mode: str, form: str, calls: int) -> float:
    out = subprocess.run([sys.executable, "-c", CHILD, mode, form, str(calls)], check=True,
                         capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--calls", type=int, default=15)
    ap.add_argument("--out", default="benchmarks/results/host_memory.json")
    args = ap.parse_args()
    rows = []
    for form in ("eager", "optimized"):
        ms = {"default": [], "kept": []}
        for i in range(args.pairs):
            for mode in ("default", "kept"):
                ms[mode].append(sample(mode, form, args.calls))
                print(f"{form} pair {i + 1}/{args.pairs}, {mode}: {ms[mode][-1]:.1f} ms",
                      flush=True)
        ratios = [d / k for d, k in zip(ms["default"], ms["kept"])]
        rows.append({"form": form, "ms": ms, "ratio_per_pair": ratios,
                     "ratio_of_medians": statistics.median(ms["default"])
                     / statistics.median(ms["kept"])})
    table = Table(title="MiniLM b8 × 128, glibc default vs freed memory kept "
                        f"({machine()['cpu']})")
    for c in ("form", "default ms (median)", "kept ms (median)", "default / kept",
              "per pair"):
        table.add_column(c)
    for r in rows:
        table.add_row(r["form"], f"{statistics.median(r['ms']['default']):.1f}",
                      f"{statistics.median(r['ms']['kept']):.1f}", f"{r['ratio_of_medians']:.2f}×",
                      " ".join(f"{x:.2f}" for x in r["ratio_per_pair"]))
    Console().print(table)
    Path(args.out).write_text(json.dumps({"machine": machine(), "calls": args.calls,
                                          "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
