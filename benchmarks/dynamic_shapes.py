"""Sentence embeddings with all-MiniLM-L6-v2 on real sentences: what dynamic shapes buy.

Every row embeds the same sentences end to end from token ids to normalized mean-pooled
embeddings, timed interleaved in one run (median of `--repeats` passes over all sentences):
  - eager fp32, every batch padded to 128 tokens (a static-shape deployment);
  - eager fp32 and optim (default pipeline, int8) with dynamic shapes, sentences sorted by length
    and each batch padded to its longest (what sentence-transformers' encode() does);
  - optim int8 traced at one shape (static, padded to 128), the pre-issue-21 behaviour.
Fidelity: embedding cosine (mean, min) and nearest-neighbour agreement against eager fp32.

    python benchmarks/dynamic_shapes.py --sentences 256 --batch 8
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import optim
from optim import zoo
from optim.measure import machine
from optim.numerics import embedding_fidelity, mean_pool
from optim.zoo.data import sentences


def batches(tok, texts: list[str], batch: int, pad_to: int | None) -> list[dict]:
    order = sorted(range(len(texts)), key=lambda i: len(tok(texts[i])["input_ids"]))
    out = []
    for i in range(0, len(order), batch):
        chunk = [texts[j] for j in order[i:i + batch]] if pad_to is None else \
            texts[i:i + batch]
        enc = tok(chunk, padding="max_length" if pad_to else "longest", truncation=True,
                  max_length=pad_to or 512, return_tensors="pt")
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                    "index": order[i:i + batch] if pad_to is None else
                    list(range(i, min(i + batch, len(texts))))})
    return out


def embed(fn, plan: list[dict], n: int) -> torch.Tensor:
    out = torch.empty(n, 384)
    with torch.inference_mode():
        for b in plan:
            res = fn(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            hidden = res[0] if isinstance(res, (tuple, list)) else res.last_hidden_state
            e = torch.nn.functional.normalize(mean_pool(hidden, b["attention_mask"]), dim=-1)
            out[b["index"]] = e
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sentences", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/dynamic_shapes.json")
    a = ap.parse_args()
    torch.manual_seed(0)
    console = Console()
    z = zoo.load("minilm", batch=a.batch, seq=128)
    tok, model = z.tokenizer, z.model.eval()
    texts = sentences(a.sentences)
    padded, sorted_ = batches(tok, texts, a.batch, 128), batches(tok, texts, a.batch, None)
    real = sum(int(b["attention_mask"].sum()) for b in padded)
    console.print(f"{len(texts)} sentences, {real} real tokens; padded to 128: "
                  f"{len(texts) * 128}; sorted, padded per batch: "
                  f"{sum(b['input_ids'].numel() for b in sorted_)}")
    example = {k: padded[0][k] for k in ("input_ids", "attention_mask")}
    dyn = optim.optimize(model, "cpu", example_kwargs=example, measure_latency=False,
                         backend="torch")
    static = optim.optimize(model, "cpu", example_kwargs=example, measure_latency=False,
                            backend="torch", dynamic=False)
    rows = {"eager fp32, padded to 128": (model, padded),
            "eager fp32, sorted, dynamic": (model, sorted_),
            "optim int8, static 128": (static, padded),
            "optim int8, sorted, dynamic": (dyn, sorted_)}
    ref = embed(model, padded, len(texts))
    times: dict[str, list[float]] = {k: [] for k in rows}
    for _ in range(a.repeats):  # interleaved
        for name, (fn, plan) in rows.items():
            t0 = time.perf_counter()
            embed(fn, plan, len(texts))
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["eager fp32, padded to 128"])
    table = Table(title=f"MiniLM sentence embeddings, {len(texts)} real sentences, batch "
                        f"{a.batch} ({machine()['cpu']}, {torch.get_num_threads()} threads)")
    for c in ("row", "median s", "sentences/s", "vs eager padded", "cos mean", "cos min",
              "NN agree"):
        table.add_column(c)
    result = {"machine": machine(), "python": platform.python_version(),
              "threads": torch.get_num_threads(), "sentences": len(texts), "batch": a.batch,
              "real_tokens": real, "rows": {}}
    for name, (fn, plan) in rows.items():
        med = statistics.median(times[name])
        fid = embedding_fidelity(ref, embed(fn, plan, len(texts)))
        result["rows"][name] = {"median_s": med, "speedup": base / med, **fid}
        table.add_row(name, f"{med:.3f}", f"{len(texts) / med:.0f}", f"{base / med:.2f}x",
                      f"{fid['cosine_mean']:.4f}", f"{fid['cosine_min']:.4f}",
                      f"{fid['neighbour_agreement']:.1%}")
    console.print(table)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    console.print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
