"""The `optim` command line: run pipelines, list passes and targets, show and compare reports."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console

import passes  # noqa: F401  (registers every pass)
from optim import render, zoo
from optim.api import load
from optim.compare import compare_targets
from optim.decoder import OptimizedDecoder
from optim.demo import run_demo
from optim.errors import OptimError
from optim.host_memory import keep_freed_memory as keep
from optim.llm import estimate_llm
from optim.registry import PASSES
from optim.report import Report
from optim.runner import run_pipeline_file
from optim.targets import resolve_target, target_names
from optim.tokenizers import load_tokenizer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="optim: a compiler-style optimization toolchain for transformers.")
console = Console()


def _fail(e: Exception) -> None:
    console.print(f"[bold red]error:[/] {e}")
    raise typer.Exit(2)


@app.command()
def run(pipeline: Path = typer.Argument(..., help="pipeline YAML file"),
        out: Path = typer.Option(None, help="directory for reports (default from the file)"),
        save: Path = typer.Option(None, help="also save the optimized model here"),
        keep_freed_memory: bool = typer.Option(
            False, "--keep-freed-memory",
            help="reuse freed host memory instead of returning it to the OS: tensors over "
                 "32 MB (long sequences), and often smaller ones, then skip their page "
                 "faults; the process keeps its peak memory (glibc only)")) -> None:
    """Run a pipeline file: build the model, optimize for each target, write reports."""
    if keep_freed_memory:
        if keep():
            console.print("host memory: freed memory is kept in the process (glibc mallopt)")
        else:
            console.print("[yellow]--keep-freed-memory: this C library is not glibc; "
                          "memory is handled as usual[/]")
    try:
        run_pipeline_file(pipeline, out=out, save=save, console=console)
    except OptimError as e:
        _fail(e)


@app.command("passes")
def list_passes() -> None:
    """List registered passes with a one-line description."""
    from rich.table import Table

    t = Table("pass", "numerics", "requires", "what it does")
    for name in PASSES.names():
        s = PASSES.get(name)
        t.add_row(name, s.numerics.describe(), ", ".join(s.requires) or "-", s.summary)
    console.print(t)


@app.command()
def targets(name: str = typer.Argument(None, help="show every number of one target with its "
                                                  "source")) -> None:
    """List hardware targets (one spec file each in hardware/specs/) with their provenance."""
    from rich.table import Table

    try:
        if name:
            spec = resolve_target(name).spec
            t = Table("field", "value", "unit", "provenance", "source",
                      title=f"{spec.name}: {spec.description}")
            for key, q in spec.quantities().items():
                t.add_row(key, f"{q.value:.4g}", q.unit, q.provenance,
                          q.source + (f" ({q.note})" if q.note else ""))
            console.print(t)
            return
        t = Table("target", "kind", "runs here", "best peak", "memory BW", "capacity",
                  "provenance", "description")
        for n in target_names():
            spec = resolve_target(n).spec
            dtype = max(spec.peak, key=lambda d: spec.peak[d].value)
            t.add_row(n, spec.kind, "measured" if n == "cpu" else "estimated",
                      f"{spec.peak[dtype].value / 1e12:.3g} T ({dtype})",
                      f"{spec.mem_bandwidth.value / 1e9:.0f} GB/s",
                      f"{spec.mem_capacity.value / 1e9:.0f} GB", spec.provenance(),
                      spec.description)
        console.print(t)
    except OptimError as e:
        _fail(e)


@app.command()
def show(report: Path = typer.Argument(..., help="report JSON written by optim"),
         format: str = typer.Option("table", help="table | markdown | html")) -> None:
    """Show a saved report."""
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
def compare(reports: list[Path] = typer.Argument(None, help="report JSON files to compare"),
            model: str = typer.Option(None, help="a zoo model to compare across --targets"),
            targets: str = typer.Option("cpu,a100,h100", help="comma-separated target names"),
            pipeline: str = typer.Option("cleanup,fuse_attention,quantize",
                                         help="pipeline name, YAML path or pass list"),
            batch: int = typer.Option(1), seq: int = typer.Option(128),
            html: Path = typer.Option(None, help="write an HTML report with plots here"),
            json_out: Path = typer.Option(None, "--json", help="write the report JSON here")
            ) -> None:
    """Compare saved reports side by side, or one --model across many --targets."""
    try:
        if model:
            z = zoo.load(model, batch=batch, seq=seq)
            names = [t.strip() for t in targets.split(",") if t.strip()]
            with console.status(f"{model}: optimizing and estimating on {', '.join(names)}") as st:
                om = compare_targets(z.model, z.example_args, names, pipeline,
                                     example_kwargs=z.example_kwargs, name=model,
                                     progress=lambda m: st.update(f"{model}: {m}"))
            console.print(render.compare_targets_table(om.report.data, console.width))
            for advice in om.report.data.get("advice", []):
                console.print(f"[yellow]advice:[/] {advice}")
            if json_out:
                om.report.save(json_out)
                console.print(f"wrote {json_out}")
            if html:
                html.parent.mkdir(parents=True, exist_ok=True)
                html.write_text(render.to_html(om.report.data, rooflines=om.rooflines()))
                console.print(f"wrote {html}")
            return
        if not reports or len(reports) < 2:
            _fail(OptimError("give two or more report JSON files, or --model NAME --targets "
                             "a,b,c to compare one model across targets"))
        loaded = [(p.stem, Report.load(p).data) for p in reports]
    except OptimError as e:
        _fail(e)
    console.print(render.compare_table(loaded))


@app.command()
def llm(model: str = typer.Argument(
            "llama2-7b", help="a preset (llama2-7b, llama2-13b, llama2-70b, falcon-7b, gemma-7b, "
                              "gpt2-xl) or any causal-LM family of transformers at its default "
                              "config (falcon, gemma, gpt2, qwen2, mistral, phi3, opt, llama...)"),
        targets: str = typer.Option("a100,h100", help="comma-separated target names"),
        batch: int = typer.Option(1), prompt: int = typer.Option(512, help="prompt tokens"),
        context: int = typer.Option(None, help="KV-cache length for decode (default: prompt)"),
        weights: str = typer.Option("fp16", help="fp16 | bf16 | fp8 | int8 | int4"),
        kv: str = typer.Option("fp16", help="KV-cache dtype"),
        tp: int = typer.Option(1, help="tensor-parallel devices"),
        pp: int = typer.Option(1, help="pipeline-parallel stages"),
        set_: list[str] = typer.Option(None, "--set", help="config override KEY=VALUE, "
                                       "repeatable (e.g. --set num_hidden_layers=60)")) -> None:
    """Estimate LLM prefill (time to first token) and decode (tokens/s) on targets, no weights:
    the shape and kernels come from a meta-device instance of the model's own architecture."""
    from rich.table import Table

    t = Table("target", "devices", "TTFT ms", "decode ms/token", "tokens/s", "bound (decode)",
              "memory/device GB", "fits", title=f"{model}: batch {batch}, prompt {prompt}, "
              f"context {context or prompt}, weights {weights}, kv {kv} (estimated)")
    try:
        overrides = _llm_overrides(set_ or [])
        for name in [x.strip() for x in targets.split(",") if x.strip()]:
            with console.status(f"{model} on {name}"):
                r = estimate_llm(model, name, batch=batch, prompt_len=prompt, overrides=overrides,
                                 context_len=context, weights=weights, kv=kv, tp=tp, pp=pp)
            t.add_row(name, f"tp{tp} x pp{pp}", f"{r['prefill']['ttft_s'] * 1e3:.1f}",
                      f"{r['decode']['seconds'] * 1e3:.2f}", f"{r['decode']['tokens_per_s']:.1f}",
                      r["decode"]["bound"], f"{r['memory']['per_device_bytes'] / 1e9:.1f}",
                      "yes" if r["memory"]["fits"] else "[red]no[/]")
            s = r["shape"]
            t.caption = (f"{r['parameters'] / 1e9:.2f}B parameters, {s['layers']} layers, "
                         f"{s['heads']} heads, KV heads {s['kv_heads']} x {s['head_dim']}, "
                         f"{'gated' if s['gated_mlp'] else 'plain'} MLP {s['ffn']}, KV cache "
                         f"{s['kv_bytes_per_token_fp16'] / 1024:.0f} KiB/token in fp16")
    except OptimError as e:
        _fail(e)
    console.print(t)


def _llm_overrides(pairs: list[str]) -> dict:
    """`--set KEY=VALUE` pairs as config overrides; values are JSON (60, true, 1e-5) or text."""
    import json

    out = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            raise OptimError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set num_hidden_layers=60")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


@app.command()
def generate(saved: Path = typer.Argument(..., help="a decoder saved by optimize()/optim run"),
             prompt: str = typer.Option(None, help="prompt text (needs a tokenizer)"),
             ids: str = typer.Option(None, help="prompt token ids, comma-separated"),
             max_new_tokens: int = typer.Option(32, "--max-new-tokens", "-n"),
             sample: bool = typer.Option(False, "--sample", help="sample instead of greedy"),
             temperature: float = typer.Option(1.0), top_k: int = typer.Option(None),
             top_p: float = typer.Option(None), seed: int = typer.Option(None),
             tokenizer: str = typer.Option(None, help="'bytes' or a local tokenizer directory "
                                                      "(default: the one saved with the model)"),
             stats: bool = typer.Option(True, help="print time to first token and tokens/s")
             ) -> None:
    """Generate from a saved decoder, printing tokens as they come."""
    try:
        fast = load(saved)
        if not isinstance(fast, OptimizedDecoder):
            raise OptimError(f"{saved} holds a model that does not generate (not a causal LM "
                             f"optimized for generation)")
        if (prompt is None) == (ids is None):
            raise OptimError("give exactly one of --prompt TEXT or --ids 1,2,3")
        tok = load_tokenizer(tokenizer or fast.tokenizer) if prompt is not None else None
        tokens = tok.encode(prompt) if tok else [int(x) for x in ids.split(",") if x.strip()]
        seen: list[int] = []
        shown = ""

        def show(token) -> None:
            nonlocal shown
            seen.append(int(token[0]))
            if tok is None:
                sys.stdout.write(f"{seen[-1]} ")
            else:  # decode everything so far: multi-byte characters arrive whole
                text = tok.decode(seen)
                sys.stdout.write(text[len(shown):])
                shown = text
            sys.stdout.flush()

        if tok is not None:
            sys.stdout.write(prompt)
        fast.generate([tokens], max_new_tokens, streamer=show, do_sample=sample,
                      temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        sys.stdout.write("\n")
        if stats:
            t = fast.timing
            per = sum(t.steps_s) / len(t.steps_s) if t.steps_s else 0.0
            console.print(f"[dim]{fast.backend}: time to first token {t.prefill_s * 1e3:.1f} ms, "
                          f"{per * 1e3:.2f} ms/token"
                          + (f" ({1 / per:.0f} tokens/s)" if per else "") + "[/]")
    except OptimError as e:
        _fail(e)


@app.command()
def demo(out: Path = typer.Option(Path("reports/minilm"), help="where to write the reports"),
         sentences: int = typer.Option(256, help="real sentences to measure fidelity on")) -> None:
    """Optimize the real all-MiniLM-L6-v2 for this CPU and print the report."""
    try:
        run_demo(out, n_sentences=sentences, console=console)
    except OptimError as e:
        _fail(e)


if __name__ == "__main__":
    app()
