"""① Capture: the user's inputs checked and split into the example, evaluation and calibration
batches; the graph traced by torch.export (`optim.ir.capture`) with dynamic batch and sequence
axes where the inputs have them (`optim.shapes`); the original model run on the evaluation
batches and on probe batches at other shapes (reference outputs, FLOPs). The user's model is
put back in the mode it was in."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.utils import _pytree as pytree
from torch.utils.flop_counter import FlopCounterMode

from optim import shapes
from optim.errors import CaptureError, ConfigError
from optim.ir import Captured, capture
from optim.model_state import modes_kept
from optim.shapes import ShapeError, ShapeSpec

Batch = tuple[tuple, dict]


@dataclass
class Inputs:
    example: Batch  # what the graph is traced with
    evals: list[Batch]  # fidelity is measured on these
    calibration: list[Batch]  # passes that calibrate read these
    shapes: ShapeSpec  # which axes may vary, and their ranges
    dynamic_asked: bool = False  # the user set the ranges: failing to keep them is an error

    @classmethod
    def from_user(cls, example_inputs: Any, example_kwargs: dict | None = None,
                  eval_data: list | None = None, calibration: list | None = None,
                  dynamic: Any = None) -> Inputs:
        example = _as_batch(example_inputs, example_kwargs)
        spec = shapes.infer(*example, dynamic)
        evals = list(eval_data) if eval_data else [example]
        _check_shapes("eval_data", evals, spec)
        _check_shapes("calibration", list(calibration or []), spec)
        return cls(example, evals, list(calibration) if calibration else evals, spec,
                   isinstance(dynamic, dict))

    def for_backend(self, name: str, runs_dynamic: bool) -> Inputs:
        """These inputs as a backend can run them: all static for one that compiles one shape
        (an error when the user asked for ranges)."""
        if runs_dynamic or not self.shapes.dynamic:
            return self
        if self.dynamic_asked:
            raise ConfigError(f"dynamic ranges were asked for, but the {name} backend compiles "
                              f"for one shape; use backend 'torch' or 'onnxruntime', or "
                              f"dynamic=False")
        return self.static(None, f"the {name} backend compiles for one shape")

    def static(self, axis: str | None, reason: str) -> Inputs:
        """These inputs with `axis` (None: every axis) static at the example's size."""
        spec = self.shapes.all_static(reason) if axis is None else self.shapes.without(axis,
                                                                                      reason)
        return Inputs(self.example, self.evals, self.calibration, spec, self.dynamic_asked)


@dataclass
class Original:
    """The user's model, what it returned on the evaluation batches, and its captured graph."""

    model: torch.nn.Module
    refs: list  # outputs per evaluation batch
    flops: float
    captured: Captured
    weight_bytes: int  # of the captured graph, before any pass
    shapes: ShapeSpec  # what the captured graph accepts (export may narrow the ranges)
    probes: list[tuple[str, Batch, Any]]  # (label, batch at another shape, original's output)


def capture_model(model: torch.nn.Module, inputs: Inputs, say=lambda msg: None) -> Original:
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"optimize() takes a torch.nn.Module, got {type(model).__name__}")
    args, kwargs = inputs.example
    with modes_kept(model):
        model.eval()
        with torch.no_grad():
            say("running the original model")
            refs = [model(*a, **k) for a, k in inputs.evals]
            flops = _count_flops(model, args, kwargs)
        captured, spec = _capture(model, inputs, say)
        with torch.no_grad():
            spec = _positions_cap(model, spec, inputs, say)
            probes = [(label, batch, model(*batch[0], **batch[1]))
                      for label, batch in shapes.probes(spec, inputs.example)]
    return Original(model, refs, flops, captured, weight_bytes(captured.gm), spec, probes)


def _capture(model: torch.nn.Module, inputs: Inputs, say) -> tuple[Captured, ShapeSpec]:
    args, kwargs = inputs.example
    spec = inputs.shapes
    if not spec.dynamic:
        say("capturing the graph with torch.export")
        captured = capture(model, args, kwargs)
        return captured, shapes.accepted(spec, captured.program)
    say(f"capturing the graph with torch.export (dynamic: {', '.join(spec.ranges)})")
    try:
        captured = capture(model, args, kwargs, shapes.export_shapes(spec, args, kwargs))
    except CaptureError as e:
        if inputs.dynamic_asked:
            raise CaptureError(f"{e}\n  the model could not be traced with dynamic "
                               f"{', '.join(spec.ranges)}; pass dynamic=False for static "
                               f"shapes") from e
        say("dynamic shapes failed; capturing with static shapes")
        first = str(e).splitlines()[0][:200]
        captured = capture(model, args, kwargs)
        return captured, shapes.accepted(spec.all_static(
            f"torch.export could not trace it with dynamic shapes ({first})"), captured.program)
    return captured, shapes.accepted(spec, captured.program)


def _positions_cap(model: torch.nn.Module, spec: ShapeSpec, inputs: Inputs, say) -> ShapeSpec:
    """The default `seq` range cut to what the model's position table holds. torch.export bounds
    it where positions slice a buffer (BERT: 512), not where they are computed (RoBERTa counts
    them from the mask, and 8192 tokens would read past its 514-row table). The model is run
    at one row of `max_position_embeddings` tokens, then one and two fewer (RoBERTa's first
    two rows are its padding offset), and the longest that runs is the new bound."""
    most = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if (inputs.dynamic_asked or "seq" not in spec.ranges or not isinstance(most, int)
            or most >= spec.ranges["seq"][1] or most < spec.traced["seq"]):
        return spec
    lo, _ = spec.ranges["seq"]
    for length in (most, most - 1, most - 2):
        batch = shapes.resize(spec, shapes.resize(spec, inputs.example, "seq", length),
                              "batch", 1) if "batch" in spec.ranges else \
            shapes.resize(spec, inputs.example, "seq", length)
        try:
            model(*batch[0], **batch[1])
        except (IndexError, RuntimeError):
            continue
        say(f"seq range cut to {length}: the model's position table")
        return replace(spec, ranges={**spec.ranges, "seq": (lo, length)})
    return spec


def token_mask(kwargs: dict) -> torch.Tensor | None:
    """The [batch, tokens] attention mask among keyword inputs: padding is left out of fidelity."""
    mask = kwargs.get("attention_mask")
    return mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


def describe_inputs(args: tuple, kwargs: dict) -> list[dict]:
    items = [(f"arg{i}", a) for i, a in enumerate(args)] + list(kwargs.items())
    return [{"name": n, "shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
            if isinstance(v, torch.Tensor) else {"name": n, "value": repr(v)[:40]}
            for n, v in items]


def weight_bytes(module: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _as_batch(example_inputs: Any, example_kwargs: dict | None) -> Batch:
    """(args, kwargs), views copied: torch.export guards a view on its base tensor (a slice of
    a longer text would be traced with a guard every later input fails)."""
    return pytree.tree_map_only(torch.Tensor, lambda t: t.clone() if t._base is not None else t,
                                _split_batch(example_inputs, example_kwargs))


def _split_batch(example_inputs: Any, example_kwargs: dict | None) -> Batch:
    if isinstance(example_inputs, dict):
        return (), {**example_inputs, **(example_kwargs or {})}
    if example_inputs is None:
        if not example_kwargs:
            raise ConfigError("optimize() needs example_inputs (a tuple of positional inputs or a "
                              "dict of keyword inputs) to trace the model with")
        return (), dict(example_kwargs)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)):
        raise ConfigError(f"example_inputs must be a tuple or dict, got "
                          f"{type(example_inputs).__name__}")
    return tuple(example_inputs), dict(example_kwargs or {})


def _check_shapes(what: str, batches: list, spec: ShapeSpec) -> None:
    """Every batch must be one the graph accepts: the example's dtypes and ranks, its sizes on
    static axes, and sizes within the ranges on dynamic ones."""
    for i, b in enumerate(batches):
        if not (isinstance(b, tuple) and len(b) == 2):
            raise ConfigError(f"{what}[{i}] must be an (args, kwargs) pair")
        try:
            spec.check(*b)
        except ShapeError as e:
            raise ConfigError(f"{what}[{i}]: {e}") from None


def _count_flops(model, args, kwargs) -> float:
    try:
        with FlopCounterMode(display=False) as fc:
            model(*args, **kwargs)
        return float(fc.get_total_flops())
    except Exception:  # counting is best-effort; the report says 0 then
        return 0.0
