"""Throughput curves of one optimized all-MiniLM-L6-v2 (default pipeline, dynamic shapes) against
the eager model: over batch size at a fixed length, and over a length mix of real text.

Batch curve: real sentences padded to 64 tokens, batch 1, 8, 32, 128. Length mix: texts made
of 1, 4 and 16 real sentences joined (short, mixed, long up to 512 tokens), embedded with
`optim.encode` (both models through it, so only the model differs). Each point is timed
interleaved, eager against optim, in one run; sentences per second and the ratio.

    python benchmarks/dynamic_shapes_curves.py
"""

from __future__ import annotations

import argparse
import json
import random
import warnings
from pathlib import Path

from rich.console import Console
from rich.table import Table

import optim
from optim import zoo
from optim.measure import machine, measure
from optim.zoo.data import sentences


def mixes(pool: list[str], n: int) -> dict[str, list[str]]:
    rng = random.Random(0)

    def joined(k: int) -> list[str]:
        return [" ".join(rng.sample(pool, k)) for _ in range(n)]

    return {"short (1 sentence)": joined(1), "long (16 sentences)": joined(16),
            "mixed (1, 4 or 16)": [" ".join(rng.sample(pool, rng.choice((1, 4, 16))))
                                   for _ in range(n)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--texts", type=int, default=128)
    ap.add_argument("--out", default="benchmarks/results/dynamic_shapes_curves.json")
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    console = Console()
    z = zoo.load("minilm", batch=8, seq=64)
    tok, model = z.tokenizer, z.model
    fast = optim.optimize(model, "cpu", example_kwargs=z.example_kwargs, measure_latency=False)
    pool = sentences(512)
    rows = []
    for batch in (1, 8, 32, 128):
        enc = tok(pool[:batch], padding="max_length", truncation=True, max_length=64,
                  return_tensors="pt")
        kw = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        r = measure({"eager": lambda kw=kw: model(**kw), "optim": lambda kw=kw: fast(**kw)},
                    min_runs=5, budget_s=6)
        rows.append({"curve": "batch", "point": f"batch {batch} x 64 tokens", "items": batch,
                     **{k: v["median_ms"] for k, v in r.items()}})
        console.print(rows[-1])
    for name, texts in mixes(pool, a.texts).items():
        tokens = sum(len(x) for x in tok(texts, truncation=True, max_length=512)["input_ids"])
        r = measure({"eager": lambda t=texts: optim.encode(model, tok, t, max_length=512),
                     "optim": lambda t=texts: optim.encode(fast, tok, t, max_length=512)},
                    warmup=1, min_runs=3, budget_s=6)
        rows.append({"curve": "length mix", "point": f"{name}, {tokens / len(texts):.0f} "
                     f"tokens mean", "items": len(texts),
                     **{k: v["median_ms"] for k, v in r.items()}})
        console.print(rows[-1])
    m = machine()
    table = Table(title=f"MiniLM, one optimized model ({m['cpu']}, {m['threads']} threads)")
    for c in ("curve", "point", "eager items/s", "optim items/s", "optim / eager"):
        table.add_column(c)
    for r in rows:
        table.add_row(r["curve"], r["point"], f"{r['items'] / r['eager'] * 1e3:.0f}",
                      f"{r['items'] / r['optim'] * 1e3:.0f}", f"{r['eager'] / r['optim']:.2f}x")
    console.print(table)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"machine": m, "rows": rows}, indent=2))
    console.print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
