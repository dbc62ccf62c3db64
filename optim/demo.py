"""The main job: optimize the real all-MiniLM-L6-v2 for this CPU, measure what it bought here,
and estimate the same optimized graph on other targets."""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from optim import render, zoo
from optim.api import optimize
from optim.zoo.data import sentences
from optim.zoo.tasks import sentence_batches, sentence_embedding_fidelity

ESTIMATE_ON = ["a100", "h100", "l4", "jetson-orin", "xeon-spr", "alveo-u280"]


def run_demo(out: Path, n_sentences: int = 256, batch: int = 8, seq: int = 128,
             console: Console | None = None) -> dict:
    console = console or Console()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("loading all-MiniLM-L6-v2 (real weights, from site-packages)")
        z = zoo.load("minilm", batch=batch, seq=seq)
        texts = sentences(n_sentences)
        batches = sentence_batches(z.tokenizer, texts, batch, seq)
        om = optimize(z.model, target="cpu", example_inputs=z.example_kwargs,
                      name="all-MiniLM-L6-v2", eval_data=batches[:4], calibration=batches[:4],
                      task_fidelity=sentence_embedding_fidelity(batches),
                      estimate_targets=ESTIMATE_ON,
                      progress=lambda msg: bar.update(task, description=msg))
    report = om.report
    render.print_report(report.data, console)
    out = Path(out)
    report.save(out / "report.json")
    (out / "report.html").write_text(render.to_html(report.data, rooflines=om.rooflines()))
    (out / "report.md").write_text(render.to_markdown(report.data))
    console.print(f"full report: {out / 'report.json'}, {out / 'report.html'}, {out / 'report.md'}")
    return report.data
