"""The `optim` command line: run pipelines, list passes and targets, show and compare reports."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console

from optim.errors import OptimError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="optim: a compiler-style optimization toolchain for transformers.")
console = Console()


def _fail(e: Exception) -> None:
    console.print(f"[bold red]error:[/] {e}")
    raise typer.Exit(2)


@app.command()
def run(pipeline: Path = typer.Argument(..., help="pipeline YAML file"),
        out: Path = typer.Option(None, help="directory for reports (default from the file)"),
        save: Path = typer.Option(None, help="also save the optimized model here")) -> None:
    """Run a pipeline file: build the model, optimize for each target, write reports."""
    from optim.runner import run_pipeline_file

    try:
        run_pipeline_file(pipeline, out=out, save=save, console=console)
    except OptimError as e:
        _fail(e)


@app.command()
def passes() -> None:
    """List registered passes with a one-line description."""
    from rich.table import Table

    from optim.registry import PASSES, load_plugins

    load_plugins()
    t = Table("pass", "numerics", "requires", "what it does")
    for name in PASSES.names():
        s = PASSES.get(name)
        t.add_row(name, s.numerics.describe(), ", ".join(s.requires) or "-", s.summary)
    console.print(t)


@app.command()
def targets() -> None:
    """List known targets."""
    from rich.table import Table

    from optim.targets import TARGETS

    t = Table("target", "kind", "runs here", "default backend", "default pipeline", "description")
    for name in TARGETS.names():
        x = TARGETS.get(name)
        t.add_row(name, x.kind, "yes" if x.runs_here else "estimated", x.default_backend,
                  x.default_pipeline, x.description)
    console.print(t)


@app.command()
def show(report: Path = typer.Argument(..., help="report JSON written by optim"),
         format: str = typer.Option("table", help="table | markdown | html")) -> None:
    """Show a saved report."""
    from optim import render
    from optim.report import Report

    try:
        d = Report.load(report).data
    except OptimError as e:
        _fail(e)
    if format == "table":
        render.print_report(d, console)
    elif format == "markdown":
        sys.stdout.write(render.to_markdown(d))
    elif format == "html":
        sys.stdout.write(render.to_html(d))
    else:
        _fail(OptimError(f"unknown format {format!r}; use table, markdown or html"))


@app.command()
def compare(reports: list[Path] = typer.Argument(..., help="two or more report JSON files")) -> None:
    """Compare reports side by side."""
    from optim import render
    from optim.report import Report

    try:
        loaded = [(p.stem, Report.load(p).data) for p in reports]
    except OptimError as e:
        _fail(e)
    console.print(render.compare_table(loaded))


@app.command()
def demo(out: Path = typer.Option(Path("reports/minilm"), help="where to write the reports"),
         sentences: int = typer.Option(256, help="real sentences to measure fidelity on")) -> None:
    """Optimize the real all-MiniLM-L6-v2 for this CPU and print the report."""
    from optim.demo import run_demo

    try:
        run_demo(out, n_sentences=sentences, console=console)
    except OptimError as e:
        _fail(e)


if __name__ == "__main__":
    app()
