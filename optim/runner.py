"""`optim run PIPELINE.yaml`: build the model the file names, optimize per target, write reports."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import torch
from rich.console import Console

from optim import render, zoo
from optim.api import optimize
from optim.config import load_pipeline_file
from optim.errors import ConfigError
from optim.tokenizers import load_tokenizer
from optim.zoo import char_lm
from optim.zoo.data import sentences
from optim.zoo.tasks import sentence_batches, sentence_embedding_fidelity


def build_model(spec: dict, inputs: dict) -> zoo.ZooModel:
    batch, seq = inputs.get("batch", 2), inputs.get("seq", 16)
    options = spec.get("options", {}) or {}
    if "zoo" in spec:
        return zoo.load(spec["zoo"], batch=batch, seq=seq, **options)
    if "hf_dir" in spec:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer

        path = spec["hf_dir"]
        if not Path(path, "config.json").is_file():
            raise ConfigError(f"model.hf_dir {path!r} has no config.json (a Hugging Face model "
                              f"directory is needed)")
        try:
            model = AutoModel.from_pretrained(path, local_files_only=True, **options).eval()
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError) as e:
            raise ConfigError(f"model.hf_dir {path!r}: transformers cannot load it: "
                              f"{_first_line(e)} (needs a config.json transformers knows, its "
                              f"weights and a tokenizer)") from e
        enc = tok(sentences(batch), padding="max_length", truncation=True, max_length=seq,
                  return_tensors="pt")
        kwargs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        return zoo.ZooModel(Path(path).name, "encoder", model, (), kwargs, 0, path, tok)
    module_name, _, attr = spec["python"].partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"model.python {spec['python']!r}: {e}") from None
    made = factory(**options)
    if isinstance(made, zoo.ZooModel):
        return made
    if isinstance(made, tuple) and len(made) == 3:
        model, args, kwargs = made
        return zoo.ZooModel(attr, "custom", model, tuple(args), dict(kwargs), 0, spec["python"])
    raise ConfigError(f"model.python {spec['python']!r} must return a ZooModel or "
                      f"(model, example_args, example_kwargs)")


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def run_pipeline_file(path: Path, out: Path | None = None, save: Path | None = None,
                      console: Console | None = None) -> list[dict]:
    console = console or Console()
    out = None if out is None else Path(out)  # a str works too
    spec = load_pipeline_file(Path(path))
    if "model" not in spec:
        raise ConfigError(f"{path}: 'optim run' needs a model: section (zoo, hf_dir or python)")
    inputs = spec.get("inputs", {}) or {}
    z = build_model(spec["model"], inputs)
    eval_data, task = None, None
    if inputs.get("data") == "sentences":
        if z.tokenizer is None:
            raise ConfigError(f"{path}: inputs.data 'sentences' needs a text model with a "
                              "tokenizer")
        batch = z.example_kwargs["input_ids"].shape
        batches = sentence_batches(z.tokenizer, sentences(inputs.get("count", 64)), *batch)
        eval_data, task = batches[:4], sentence_embedding_fidelity(batches)
    targets = spec.get("targets") or [spec.get("target", "cpu")]
    for target in targets:  # before the work, not after it
        for dest in _output_paths(spec, path, out, target).values():
            _check_writable(dest)
    if save is not None:
        _check_writable(Path(save), directory=True)
    if spec.get("generate"):
        return _run_generation(spec, z, targets, path, out, save, console)
    reports = []
    for target in targets:
        with console.status(f"optimizing {z.name} for {target}") as status:
            om = optimize(z.model, target=target, example_inputs=z.example_args,
                          example_kwargs=z.example_kwargs, pipeline=spec["passes"],
                          backend=spec.get("backend"),
                          backend_options=spec.get("backend_options"), eval_data=eval_data,
                          task_fidelity=task, fidelity_budget=spec.get("fidelity_budget"),
                          measure_latency=spec.get("measure_latency"), name=z.name,
                          dynamic=spec.get("dynamic"),
                          progress=lambda m, t=target: status.update(f"{z.name} → {t}: {m}"))
        render.print_report(om.report.data, console)
        _write_outputs(spec, path, out, target, om, console)
        if save is not None:
            om.save(Path(save) / target if len(targets) > 1 else Path(save))
        reports.append(om.report.data)
    return reports


def _output_paths(spec: dict, path: Path, out: Path | None, target: str) -> dict[str, Path]:
    """Report kind -> file: under `out` (named after the pipeline) or the file's `report:`."""
    outputs = dict(spec.get("report") or {})
    if out is not None:
        stem = f"{spec.get('name', Path(path).stem)}-{target}"
        outputs = {"json": str(out / f"{stem}.json"), "html": str(out / f"{stem}.html"),
                   "markdown": str(out / f"{stem}.md")}
    return {kind: Path(dest.replace("{target}", target)) for kind, dest in outputs.items()}


def _check_writable(dest: Path, directory: bool = False) -> None:
    """A report file that is a directory, or a path below a file, fails now with its name."""
    if not directory and dest.is_dir():
        raise ConfigError(f"report path {dest} is a directory; name a file")
    if directory and dest.exists() and not dest.is_dir():
        raise ConfigError(f"save path {dest} is a file; name a directory")
    for parent in dest.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"cannot write {dest}: {parent} is a file")
            break


def _write_outputs(spec: dict, path: Path, out: Path | None, target: str, om,
                   console: Console) -> None:
    for kind, dest in _output_paths(spec, path, out, target).items():
        if kind == "json":
            om.report.save(dest)
        else:
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(render.to_html(om.report.data, rooflines=om.rooflines())
                            if kind == "html" else render.to_markdown(om.report.data))
        console.print(f"wrote {dest}")


def _run_generation(spec: dict, z: zoo.ZooModel, targets: list[str], path: Path,
                    out: Path | None, save: Path | None, console: Console) -> list[dict]:
    """A `generate:` block: the prompt is the example, the model is optimized for generation
    (`OptimizedDecoder`), then generates from the prompt; `inputs.data: text` measures
    perplexity on held-out real text."""
    gen, inputs = spec["generate"], spec.get("inputs", {}) or {}
    tokenizer_spec = tokenizer_for(spec["model"])
    tok = load_tokenizer(tokenizer_spec)
    ids = torch.tensor([tok.encode(gen["prompt"])])
    eval_data = (text_batches(tok, z, inputs.get("batch", 4), inputs.get("seq", 64),
                              inputs.get("count", 4))
                 if inputs.get("data") == "text" else None)
    sampling = {k: gen[k] for k in ("do_sample", "temperature", "top_k", "top_p", "seed")
                if k in gen}
    reports = []
    for target in targets:
        with console.status(f"optimizing {z.name} for generation on {target}") as status:
            om = optimize(z.model, target=target, example_inputs=ids, pipeline=spec["passes"],
                          backend=spec.get("backend"),
                          backend_options=spec.get("backend_options"), eval_data=eval_data,
                          measure_latency=spec.get("measure_latency"), name=z.name,
                          generation=True, max_length=gen.get("max_length"),
                          progress=lambda m, t=target: status.update(f"{z.name} → {t}: {m}"))
        om.tokenizer = tokenizer_spec
        render.print_report(om.report.data, console)
        new = om.generate(ids, gen.get("max_new_tokens", 32), **sampling)[0, ids.shape[1]:]
        console.print(f"[bold]prompt:[/] {gen['prompt']!r}")
        console.print(f"[bold]generated:[/] {tok.decode(new.tolist())!r}")
        _write_outputs(spec, path, out, target, om, console)
        if save is not None:
            om.save(Path(save) / target if len(targets) > 1 else Path(save))
        reports.append(om.report.data)
    return reports


def tokenizer_for(model_spec: dict) -> str | None:
    """The tokenizer a pipeline's model reads text with: bytes for the zoo's char_lm, the
    model directory for hf_dir, else none known."""
    if model_spec.get("zoo") == "char_lm":
        return "bytes"
    return model_spec.get("hf_dir")


def text_batches(tok, z: zoo.ZooModel, batch: int, seq: int, count: int) -> list:
    """`count` [batch, seq] batches of held-out real text: char_lm's held-out topics, or the
    prose sentences other models are measured on, tokenized and cut into windows."""
    if z.name == "char_lm":
        return [b[:, :seq] for b in char_lm.batches("test", batch, count, seed=1)]
    ids = torch.tensor(tok.encode(" ".join(sentences(256))))
    need = batch * seq * count
    if len(ids) < need:
        raise ConfigError(f"inputs.data text: {len(ids)} tokens of text, {need} needed "
                          f"(lower inputs.batch, seq or count)")
    return list(ids[:need].reshape(count, batch, seq))
