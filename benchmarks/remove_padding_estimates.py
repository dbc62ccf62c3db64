"""What padding removal buys on each target, by the cost model: MiniLM padded vs packed
(`remove_padding`) at batches of real sentence lengths padded to 128 tokens.

    python benchmarks/remove_padding_estimates.py
"""

from __future__ import annotations

import warnings

import torch
from rich.console import Console
from rich.table import Table

from hardware.estimate import estimate
from optim import zoo
from optim.targets import resolve_target
from optim.testing import capture_example, run_pass
from optim.timing import kernels_at

TARGETS = ["xeon-spr", "a100", "h100", "rtx4090", "l4", "alveo-u280"]


def batch(tok, lengths: list[int], pad_to: int = 128) -> dict:
    from optim.zoo.data import sentences

    enc = tok(sentences(len(lengths), seed=11), padding="max_length", truncation=True,
              max_length=pad_to, return_tensors="pt")
    mask = torch.zeros(len(lengths), pad_to, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return {"input_ids": enc["input_ids"], "attention_mask": mask}


def main() -> None:
    warnings.filterwarnings("ignore")
    z = zoo.load("minilm", batch=4, seq=32)
    cases = {"4 rows, 46 real tokens": [20, 3, 9, 14],
             "64 rows of 5-40 tokens": [5 + (7 * i) % 36 for i in range(64)]}
    first = batch(z.tokenizer, cases["4 rows, 46 real tokens"])
    gm = capture_example(z.model, (), first, dynamic=True)
    padded = run_pass("fuse_attention", gm, (), first).gm
    packed = run_pass("remove_padding", gm, (), first).gm
    table = Table(title="MiniLM, padded to 128 vs remove_padding: estimated ms (cost model)")
    for c in ("target", "batch", "padded ms", "packed ms", "gain"):
        table.add_column(c)
    for name in TARGETS:
        t = resolve_target(name)
        for label, lengths in cases.items():
            kw = batch(z.tokenizer, lengths)
            a, b = (estimate(kernels_at(g, (), kw), t.spec, t.calibration).seconds * 1e3
                    for g in (padded, packed))
            table.add_row(name, label, f"{a:.3f}", f"{b:.3f}", f"{a / b:.2f}x")
    Console().print(table)


if __name__ == "__main__":
    main()
