"""④ Verification: the lowered artifact's outputs against the original model's on every
evaluation batch (padding excluded) and, with dynamic shapes, on a batch at another size of
each dynamic axis; an optional task metric; the user's fidelity budget."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from optim import numerics
from optim.capture import Inputs, Original, token_mask
from optim.errors import ConfigError


def fidelity(original: Original, artifact: Callable, inputs: Inputs,
             task: Callable | None = None, say=lambda msg: None) -> dict:
    with torch.inference_mode():
        outs = [artifact(*a, **k) for a, k in inputs.evals]
    per_batch = [numerics.compare(r, o, token_mask(k))
                 for r, o, (_, k) in zip(original.refs, outs, inputs.evals)]
    result = {"outputs": _aggregate(per_batch), "batches": len(inputs.evals),
              "padding": "excluded" if token_mask(inputs.evals[0][1]) is not None else "none"}
    if original.probes:
        with torch.inference_mode():
            result["other_shapes"] = [
                {"shape": label, **numerics.compare(ref, artifact(*a, **k), token_mask(k))}
                for label, (a, k), ref in original.probes]
    if task is not None:
        say("measuring task fidelity")
        model = original.model
        with torch.inference_mode():
            result["task"] = task(lambda *a, **k: model(*a, **k), artifact)
    return result


OUTPUT_METRICS = ("max_abs_error", "cosine_mean", "cosine_min", "sqnr_db")


def check_budget_form(budget: dict | None) -> None:
    """Before anything runs: a budget is a mapping of metric -> finite number (a NaN limit
    would pass every comparison silently), plus `enforce: bool`; metrics are the output
    comparisons or `task.<name>`."""
    if budget is None:
        return
    if not isinstance(budget, dict):
        raise ConfigError(f"fidelity budget must be a mapping such as {{'cosine_min': 0.99}}, "
                          f"got {type(budget).__name__}")
    for key, limit in budget.items():
        if key == "enforce":
            if not isinstance(limit, bool):
                raise ConfigError(f"fidelity budget 'enforce' must be true or false, got "
                                  f"{limit!r}")
            continue
        if key not in OUTPUT_METRICS and not str(key).startswith("task."):
            raise ConfigError(f"fidelity budget key {key!r} names no metric; valid: "
                              f"{', '.join(OUTPUT_METRICS)} or task.<metric>")
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) \
                or not math.isfinite(limit):
            raise ConfigError(f"fidelity budget {key} must be a finite number, got {limit!r}")


def check_budget(fid: dict, budget: dict | None) -> list[str]:
    """Budget keys name measured metrics: `cosine_min: 0.97` is a floor, `*_error` a ceiling.
    Returns one warning per metric outside its budget."""
    if not budget:
        return []
    flat = {**fid["outputs"], **{f"task.{k}": v for k, v in fid.get("task", {}).items()}}
    out = []
    for key, limit in budget.items():
        if key == "enforce":
            continue
        if key not in flat:
            raise ConfigError(f"fidelity budget key {key!r} names no measured metric; "
                              f"valid: {', '.join(sorted(flat))}")
        value = flat[key]
        ceiling = key.endswith("error")
        if (value > limit) if ceiling else (value < limit):
            out.append(f"{key} = {value:.4g} is {'above' if ceiling else 'below'} the budget "
                       f"{limit}")
    return out


def _aggregate(items: list[dict]) -> dict:
    return {"max_abs_error": max(i["max_abs_error"] for i in items),
            "cosine_mean": sum(i["cosine_mean"] for i in items) / len(items),
            "cosine_min": min(i["cosine_min"] for i in items),
            "sqnr_db": min(i["sqnr_db"] for i in items)}
