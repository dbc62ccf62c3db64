"""Llama-2 7B/13B/70B prefill and decode estimates across targets, without weights.

Prints one table (TTFT, decode ms/token, tokens/s, bound, memory per device, fits) and, per
model, the wall time and peak memory the estimate took here (the goal: < 60 s, < 4 GiB).

    python benchmarks/llm_estimates.py [--targets a100,h100,...] [--prompt 512] [--context 1024]
"""

from __future__ import annotations

import argparse
import resource
import time

from rich.console import Console
from rich.table import Table

from optim.llm import estimate_llm

# (model, weights, tp): 70B needs more than one 80 GB device in fp16
CASES = [("llama2-7b", "fp16", 1), ("llama2-7b", "int8", 1), ("llama2-7b", "int4", 1),
         ("llama2-13b", "fp16", 1), ("llama2-70b", "fp16", 8), ("llama2-70b", "int4", 2)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", default="a100,h100,h200,l4,rtx4090,tpu-v5e,xeon-spr,cpu")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1)
    a = ap.parse_args()
    c = Console(width=160)
    t = Table(title=f"Llama-2 estimates (batch {a.batch}, prompt {a.prompt}, KV cache "
                    f"{a.context}); all figures estimated, nothing here ran on these targets")
    for col in ("model", "weights", "target", "devices", "TTFT ms", "decode ms/tok", "tokens/s",
                "decode bound", "GB/device", "fits", "notes"):
        t.add_column(col)
    timing = []
    for model, weights, tp in CASES:
        t0 = time.perf_counter()
        for target in a.targets.split(","):
            try:
                r = estimate_llm(model, target, batch=a.batch, prompt_len=a.prompt,
                                 context_len=a.context, weights=weights, tp=tp)
            except Exception as e:  # a target without an interconnect cannot do tp > 1
                t.add_row(model, weights, target, f"tp{tp}", "-", "-", "-", "-", "-", "-",
                          str(e)[:60])
                continue
            d = r["decode"]
            t.add_row(model, weights, target, f"tp{tp}", f"{r['prefill']['ttft_s'] * 1e3:.1f}",
                      f"{d['seconds'] * 1e3:.2f}", f"{d['tokens_per_s']:.1f}", d["bound"],
                      f"{r['memory']['per_device_bytes'] / 1e9:.1f}",
                      "yes" if r["memory"]["fits"] else "no", "; ".join(d["notes"])[:60])
        timing.append((model, weights, time.perf_counter() - t0))
    c.print(t)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    for model, weights, s in timing:
        c.print(f"{model} {weights}: {s:.1f} s for {len(a.targets.split(','))} targets "
                f"(prefill + decode captures on the meta device)")
    c.print(f"peak resident memory of this process: {rss:.2f} GiB")


if __name__ == "__main__":
    main()
