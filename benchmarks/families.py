"""Families outside the zoo (tests/test_families.py): attention fused / expected, the exact
error of fusion, and the default cpu pipeline's speed ratio measured here (original eager vs
optimized, one interleaved run per row) with its fidelity, at the test size and a larger one.

    .venv/bin/python benchmarks/families.py [--shapes 2x16,8x128]
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import optim  # noqa: E402
from optim.measure import machine  # noqa: E402
from tests.test_families import FAMILIES, _family, _inputs  # noqa: E402


def row(name: str, batch: int, seq: int) -> dict:
    model, kwargs = _family(name), _inputs(name, batch, seq)
    fused = optim.optimize(model, "cpu", (), example_kwargs=kwargs,
                           pipeline="cleanup,fuse_attention", backend="torch",
                           measure_latency=False)
    layers = model.config.num_hidden_layers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        default = optim.optimize(model, "cpu", (), example_kwargs=kwargs, pipeline="cpu_default")
    undone = [p["name"] for p in default.report["passes"]
              if p["details"].get("measured_here", {}).get("reverted")]
    return {"family": name, "shape": f"{batch}x{seq}",
            "fused": f"{fused.report['passes'][1]['counts'].get('attention_fused', 0)}/{layers}",
            "exact_err": fused.report["fidelity"]["outputs"]["max_abs_error"],
            "speed": default.report["speedup"]["optimized_vs_original"],
            "cosine_min": default.report["fidelity"]["outputs"]["cosine_min"],
            "undone": ", ".join(undone) or "-", "backend": default.report["backend"]["name"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="2x16,8x128")
    ap.add_argument("--families", default=",".join(sorted(FAMILIES)))
    a = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    shapes = [tuple(int(x) for x in s.split("x")) for s in a.shapes.split(",")]
    table = Table(title=f"families outside the zoo: {machine()['cpu']}, "
                        f"{torch.get_num_threads()} threads")
    for col in ("family", "shape", "attention fused", "fusion max abs err",
                "default pipeline x eager", "cosine min", "passes undone (slower here)",
                "backend"):
        table.add_column(col)
    for name in a.families.split(","):
        for batch, seq in shapes:
            r = row(name, batch, seq)
            table.add_row(r["family"], r["shape"], r["fused"], f"{r['exact_err']:.1e}",
                          f"{r['speed']:.2f}x", f"{r['cosine_min']:.4f}", r["undone"],
                          r["backend"])
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
