"""`optimize()`: capture → passes → lower → verify → time and estimate → report.

Example:
    >>> import optim
    >>> fast = optim.optimize(model, target="cpu", example_inputs=(input_ids,))
    >>> fast(input_ids)          # callable like the original
    >>> print(fast.report["speedup"])
    >>> fast.save("out/"); again = optim.load("out/")

Each stage is a function in the module that owns it: `optim.capture`, `optim.transform`,
`optim.lower`, `optim.verify`, `optim.timing`, `optim.report`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hardware.capability import estimate_advice, pass_advice
from hardware.estimate import DEFAULT_PRECISION
from optim import saving, timing, verify
from optim.capture import Batch, Inputs, describe_inputs, weight_bytes
from optim.config import load_pipeline_file, shipped_pipeline_passes
from optim.decoder import OptimizedDecoder, is_causal_lm, optimize_decoder
from optim.errors import ConfigError, NumericsError, SlowerWarning
from optim.ir import op_histogram
from optim.lower import lower, resolve_backend
from optim.model import OptimizedModel
from optim.model import load as load_model
from optim.model_state import leaves_model_untouched
from optim.pipeline import Pipeline
from optim.report import ModelFacts, Report, ReportData
from optim.targets import Target, resolve_target
from optim.transform import capture_and_run

__all__ = ["optimize", "OptimizedModel", "OptimizedDecoder", "load", "resolve_pipeline"]


@leaves_model_untouched
def optimize(model: torch.nn.Module, target: str | Target = "cpu", example_inputs: Any = None,
             pipeline: Any = None, *, example_kwargs: dict | None = None,
             backend: str | None = None, backend_options: dict | None = None,
             eval_data: list[Batch] | None = None, calibration: list[Batch] | None = None,
             task_fidelity: Callable[[Callable, Callable], dict] | None = None,
             fidelity_budget: dict | None = None, measure_latency: bool | None = None,
             estimate_targets: list[str] | None = None, name: str | None = None,
             dynamic: Any = None, progress: Callable[[str], None] | None = None,
             generation: bool | None = None, max_length: int | None = None,
             speed_gate: bool | None = None,
             **pass_options: dict) -> OptimizedModel | OptimizedDecoder:
    """Optimize `model` for `target` and return a callable `OptimizedModel` with a report.

    Args:
        model: the user's module; it is never modified.
        target: a target name (`optim targets` lists them) or a resolved `Target`.
        example_inputs: positional inputs (tuple) or keyword inputs (dict) to trace with.
        pipeline: None (the target's default), a shipped pipeline name, a YAML path, one-line
            text (`cleanup,fuse_attention`), or a list of pass names / {name: options}. Exact
            prerequisites a pass requires are inserted (the report says so).
        backend: "torch", "onnxruntime" or "tvm"; default from the target. "tvm" on a GPU
            target also generates CUDA code for it (`.cuda_source`, `report["backend"]["cuda"]`).
        backend_options: options of the backend, e.g. for "tvm" `{"tune": True}`.
        eval_data: batches `(args, kwargs)` to measure fidelity on (default: the example).
        calibration: batches for passes that calibrate (default: eval_data).
        task_fidelity: `fn(original, optimized) -> dict` for a task metric (e.g. embeddings).
        fidelity_budget: e.g. {"cosine_min": 0.97}; violating it raises NumericsError.
        measure_latency: time original and optimized here, interleaved, in one run (default:
            only when the target is this machine's `cpu`).
        estimate_targets: more targets to estimate in the same report.
        dynamic: which input axes may vary at call time. Default: batch and sequence axes of
            token inputs and the batch axis of the rest, where the backend runs more than one
            shape (`optim.shapes`); `{"batch": (1, 64), "seq": (1, 512)}` sets the ranges (and
            makes failing to keep them an error), `{"seq": None}` keeps an axis static,
            False keeps every shape static.
        generation: a causal LM (a `transformers` model that generates) is optimized for
            generation by default: `example_inputs` is a prompt, and the result is an
            `OptimizedDecoder` with `generate()` (`optim.decoder`). False traces one forward
            instead (as does `use_cache=False` in `example_kwargs`).
        max_length: generation: the longest prompt + new tokens (default: the model's
            position table).
        speed_gate: undo a pass that made the graph measurably slower here (when latency is
            measured here, on the torch backend; `optim.speed_gate`). Default: on, unless the
            environment sets OPTIM_SPEED_GATE=0.
        **pass_options: per-pass option overrides, e.g. `quantize={"skip": ["classifier"]}`.
    """
    say = progress or (lambda msg: None)
    verify.check_budget_form(fidelity_budget)  # before hours of work, not after
    tgt = resolve_target(target)
    if generation or generation is None and is_causal_lm(model, example_kwargs):
        if task_fidelity or fidelity_budget or dynamic is not None:
            raise ConfigError("task_fidelity, fidelity_budget and dynamic are not taken for "
                              "generation yet; the prompt is the example, eval_data token "
                              "batches measure perplexity and calibration token batches "
                              "calibrate (pass generation=False to trace one forward)")
        return optimize_decoder(model, tgt, resolve_pipeline(pipeline, tgt.default_pipeline,
                                                             pass_options),
                                example_inputs, example_kwargs, backend, backend_options,
                                eval_data=eval_data, calibration=calibration,
                                max_length=max_length, measure_latency=measure_latency,
                                estimate_targets=estimate_targets, name=name, say=say)
    chosen, options = resolve_backend(backend, tgt, backend_options)
    pipe = resolve_pipeline(pipeline, tgt.default_pipeline, pass_options)
    inputs = Inputs.from_user(example_inputs, example_kwargs, eval_data, calibration,
                              dynamic).for_backend(chosen.name, chosen.dynamic)
    measure_here = tgt.runs_here if measure_latency is None else measure_latency
    gate = speed_gate if speed_gate is not None else os.environ.get("OPTIM_SPEED_GATE") != "0"
    original, passes = capture_and_run(model, inputs, pipe, tgt, say,  # ① ②
                                       gate=gate and measure_here and chosen.name == "torch")
    artifact, lower_s = lower(passes.gm, inputs.example, tgt, chosen, options,
                              original.shapes, say)  # ③
    fidelity = verify.fidelity(original, artifact, inputs, task_fidelity, say)  # ④
    budget_missed = verify.check_budget(fidelity, fidelity_budget)
    latency, speedup = [], {}
    if measure_here:  # ⑤
        latency, speedup = timing.measure_here(model, artifact, inputs.example, chosen.name, say)
        for line in timing.slower_warning(speedup, passes.records):
            say(f"WARNING: {line}")
            warnings.warn(line, SlowerWarning, stacklevel=3)
    others = [resolve_target(t) for t in estimate_targets or []]
    estimates = timing.estimate_on(passes.stages, [tgt, *others], weight_bytes(passes.gm), say)
    latency += timing.estimate_rows(estimates[0]) + artifact.measured_latency()
    report = Report(ReportData(  # ⑥
        model=_model_facts(model, name, original, passes.gm, inputs),
        target=_target_facts(tgt),
        backend={"name": chosen.name, "lower_seconds": round(lower_s, 3),
                 **({"chosen_because": tgt.backend_reason} if backend is None else {}),
                 **artifact.info()},
        pipeline=pipe.to_list(), passes=passes.records,
        graph={"before": passes.histogram_before, "after": op_histogram(passes.gm)},
        fidelity=fidelity, latency=latency, speedup=speedup, estimates=estimates,
        advice=pass_advice(tgt.spec, pipe.names, DEFAULT_PRECISION[tgt.kind])
        + [a for e in estimates for a in estimate_advice(e)],
        warnings=budget_missed + passes.notes() + timing.slower_warning(speedup, passes.records)
    )).validate()
    if budget_missed and fidelity_budget and fidelity_budget.get("enforce", True):
        raise NumericsError("fidelity budget not met: " + "; ".join(budget_missed))
    return OptimizedModel(artifact, report, passes.gm, inputs.example, passes.stages, options,
                          original.shapes)


def load(directory: str | Path, trust_compiled_code: bool = False
         ) -> OptimizedModel | OptimizedDecoder:
    """Load what `save` wrote (in this or a fresh process): an `OptimizedModel`, or an
    `OptimizedDecoder` for a causal LM.

    Loading reads data only (JSON, ONNX, safetensors; nothing is unpickled) and checks every
    file against the checksum the save recorded, naming any file that changed. A TVM save holds
    a compiled shared library, which loading would execute: it loads only with
    `trust_compiled_code=True`, for saves whose origin you trust (your own)."""
    found = saving.manifest(Path(directory))
    if found.get("kind") == "decoder":
        return OptimizedDecoder.load(Path(directory), found, trust_compiled_code)
    return load_model(directory, trust_compiled_code, found)


def resolve_pipeline(pipeline: Any, target_default: str, overrides: dict) -> Pipeline:
    """A `Pipeline` from None (the target's default), a shipped name, a YAML path, one-line
    text, a list, or a built `Pipeline`; `overrides` are per-pass options."""
    if pipeline is None:
        pipeline = target_default
    if isinstance(pipeline, Pipeline):
        if overrides:
            raise ConfigError("pass options cannot be combined with a built Pipeline object")
        return pipeline
    if isinstance(pipeline, (str, Path)):
        text = str(pipeline)
        if text.endswith((".yaml", ".yml")) or Path(text).is_file():
            spec = load_pipeline_file(Path(text))
            return Pipeline.build(spec["passes"], overrides, where=text)
        shipped = shipped_pipeline_passes(text)
        if shipped is not None:
            return Pipeline.build(shipped, overrides, where=f"pipeline {text!r}")
        return Pipeline.build(text, overrides, where="pipeline text")
    return Pipeline.build(pipeline, overrides)


def _model_facts(model, name, original, gm, inputs) -> ModelFacts:
    captured = original.captured
    return ModelFacts(name or type(model).__name__, type(model).__qualname__,
                      sum(p.numel() for p in model.parameters()), original.flops,
                      original.weight_bytes, weight_bytes(gm), describe_inputs(*inputs.example),
                      captured.seconds, original.shapes.to_dict())


def _target_facts(t: Target) -> dict:
    return {"name": t.name, "kind": t.kind, "description": t.description,
            "runs_here": t.runs_here, "provenance": t.provenance}
