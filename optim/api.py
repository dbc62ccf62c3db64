"""`optimize()`: capture → passes → backend, with fidelity and latency in a report.

Example:
    >>> import optim
    >>> fast = optim.optimize(model, target="cpu", example_inputs=(input_ids,))
    >>> fast(input_ids)          # callable like the original
    >>> print(fast.report["speedup"])
    >>> fast.save("out/"); again = optim.load("out/")
"""

from __future__ import annotations

import datetime
import inspect
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from optim import numerics
from optim.errors import CaptureError, ConfigError, NumericsError
from optim.ir import capture, op_histogram
from optim.lora_distill import run as run_graph
from optim.measure import measure
from optim.pass_base import Exact, PassContext
from optim.pipeline import Pipeline
from optim.registry import BACKENDS, load_plugins
from optim.report import Report
from optim.targets import get_target

__all__ = ["optimize", "OptimizedModel", "load"]

Batch = tuple[tuple, dict]


class OptimizedModel:
    """The result of `optimize()`: callable like the original model, with `.report`."""

    def __init__(self, artifact: Any, report: Report, graph: torch.fx.GraphModule | None = None,
                 example: Batch | None = None, stages: dict | None = None):
        self.artifact = artifact
        self.report = report
        self.graph = graph
        self.example = example  # the (args, kwargs) it was traced with
        self.stages = stages or {}  # kernels after capture and after each pass (cost model)
        self.cuda_source: str | None = None  # tvm backend on a GPU target: the generated CUDA
        self.cuda_build = None  # ... and the build itself (backends.tvm_cuda.CudaBuild)
        self._widths: dict = {}  # nested width -> artifact (dynamic_width)
        self.width_plan: dict | None = None  # dynamic_width's plan, when not the report's

    def estimate(self, target: str, **options) -> dict:
        """The cost model's view of this model on `target` (any name `optim targets` lists):
        estimated latency after each pass, bound, bytes by class, memory fit, energy."""
        from hardware.estimate import report_section

        if not self.stages:
            raise ConfigError("this model has no graph stages to estimate (loaded from disk?); "
                              "run optimize() again to estimate it")
        return report_section(self.stages, target, memory_bytes=self._memory_bytes(), **options)

    def rooflines(self) -> dict[str, bytes]:
        """A roofline PNG per estimated target with every kernel of the optimized graph on it."""
        from hardware.estimate import estimate
        from hardware.plots import kernel_points, roofline_png
        from hardware.spec import load_spec

        if self.graph is None:
            return {}
        out = {}
        for e in self.report.data.get("estimates", []):
            t = e["target"]
            out[t] = roofline_png(load_spec(t), kernel_points(estimate(self.graph, t)),
                                  f"{self.report['model']['name']} on {t} (estimated)")
        return out

    def _memory_bytes(self) -> float:
        m = self.report["model"]
        return float(m.get("weight_bytes_after", m["weight_bytes"]))

    def __call__(self, *args, **kwargs):
        with torch.inference_mode():
            return self.artifact(*args, **kwargs)

    def at_width(self, width) -> Callable:
        """The model at a nested width (after the `dynamic_width` pass): `width` in (0, 1] for
        every layer, or a list with one per layer (Mix'n'Match). Built once per width on the
        same backend and cached; the weights are views of this model's, not copies."""
        from optim.nested_width import at_width, layer_widths

        plan = self._width_plan()
        key = tuple(layer_widths(plan, width))
        if key not in self._widths:
            args, kwargs = self.example
            gm = at_width(self.graph, plan, list(key), args, kwargs)
            self._widths[key] = BACKENDS.get(self.backend)(gm, args, kwargs)
        artifact = self._widths[key]

        def run(*args, **kwargs):
            with torch.inference_mode():
                return artifact(*args, **kwargs)

        return run

    def timestep_widths(self, schedule: list[tuple[float, float]],
                        timestep: str = "timestep") -> Callable:
        """A callable that runs each call at the width the diffusion timestep asks for (DyDiT's
        timestep-wise width): `schedule` is [(t_min, width), ...]; a call whose keyword
        `timestep` is >= t_min (largest t_min first) runs at that width."""
        steps = sorted(schedule, key=lambda s: -s[0])
        if not steps:
            raise ConfigError("timestep_widths needs at least one (t_min, width) pair")
        for _, w in steps:
            self.at_width(w)  # builds (and validates) every width up front

        def run(*args, **kwargs):
            if timestep not in kwargs:
                raise ConfigError(f"timestep_widths: the call has no {timestep!r} keyword")
            t = float(torch.as_tensor(kwargs[timestep]).flatten()[0])
            width = next((w for t_min, w in steps if t >= t_min), steps[-1][1])
            return self.at_width(width)(*args, **kwargs)

        return run

    def _width_plan(self) -> dict:
        if self.width_plan is not None:  # set by optim.load (node names of the loaded graph)
            return self.width_plan
        if self.graph is None:
            raise ConfigError("this model has no graph (loaded from disk?); run optimize() again")
        for p in self.report["passes"]:
            if p["name"] == "dynamic_width" and p["details"].get("plan"):
                return p["details"]["plan"]
        raise ConfigError("at_width needs the dynamic_width pass in the pipeline (it orders "
                          "heads and neurons so that every width is a prefix)")

    @property
    def backend(self) -> str:
        return self.report["backend"]["name"]

    def save(self, directory: str | Path) -> Path:
        """Write the compiled artifact and report to `directory` (no pickle)."""
        from optim.saving import save

        return save(self, Path(directory))

    def __repr__(self) -> str:
        return (f"OptimizedModel({self.report['model']['name']}, target={self.report['target']['name']}"
                f", backend={self.backend}, passes={[p['name'] for p in self.report['passes']]})")


def load(directory: str | Path) -> OptimizedModel:
    """Load a model written by `OptimizedModel.save`."""
    from optim.saving import load as _load

    return _load(Path(directory))


def _as_batch(example_inputs: Any, example_kwargs: dict | None) -> Batch:
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
        raise ConfigError(f"example_inputs must be a tuple or dict, got {type(example_inputs).__name__}")
    return tuple(example_inputs), dict(example_kwargs or {})


def _check_shapes(what: str, batches: list, example: Batch) -> None:
    """The graph is traced with static shapes: every batch must match the example's."""
    from torch.utils import _pytree as pytree

    def shapes(batch):
        return [tuple(t.shape) for t in pytree.tree_leaves(batch) if isinstance(t, torch.Tensor)]

    want = shapes(example)
    for i, b in enumerate(batches):
        if not (isinstance(b, tuple) and len(b) == 2):
            raise ConfigError(f"{what}[{i}] must be an (args, kwargs) pair")
        if shapes(b) != want:
            raise ConfigError(f"{what}[{i}] has input shapes {shapes(b)}, but the model is traced "
                              f"with {want}: the graph has static shapes, so every batch must "
                              f"match the example inputs (same batch size and length)")


def resolve_pipeline(pipeline: Any, target_default: str, overrides: dict) -> Pipeline:
    from optim.config import shipped_pipeline_passes, load_pipeline_file

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


def _backend_options(name: str, lower: Callable, options: dict | None, say) -> dict:
    """`options` checked against what the backend's lowering accepts (plus our progress)."""
    params = inspect.signature(lower).parameters
    accepted = sorted(k for k, p in params.items() if p.kind is p.KEYWORD_ONLY and k != "progress")
    unknown = sorted(set(options or {}) - set(accepted))
    if unknown:
        raise ConfigError(f"backend {name!r} has no option(s) {unknown}; it takes "
                          f"{accepted or 'no options'}")
    return {**(options or {}), **({"progress": say} if "progress" in params else {})}


def optimize(model: torch.nn.Module, target: str = "cpu", example_inputs: Any = None,
             pipeline: Any = None, *, example_kwargs: dict | None = None,
             backend: str | None = None, backend_options: dict | None = None,
             eval_data: list[Batch] | None = None,
             calibration: list[Batch] | None = None,
             task_fidelity: Callable[[Callable, Callable], dict] | None = None,
             fidelity_budget: dict | None = None, measure_latency: bool | None = None,
             estimate_targets: list[str] | None = None, name: str | None = None,
             progress: Callable[[str], None] | None = None,
             **pass_options: dict) -> OptimizedModel:
    """Optimize `model` for `target` and return a callable `OptimizedModel` with a report.

    Args:
        model: the user's module; it is never modified.
        target: a registered target name (`optim targets` lists them).
        example_inputs: positional inputs (tuple) or keyword inputs (dict) to trace with.
        pipeline: None (the target's default), a shipped pipeline name, a YAML path, one-line
            text (`cleanup,fuse_attention`), or a list of pass names / {name: options}.
        backend: "torch", "onnxruntime" or "tvm"; default from the target. "tvm" on a GPU
            target also generates CUDA code for it (`.cuda_source`, `report["backend"]["cuda"]`).
        backend_options: options of the backend's lowering, e.g. for "tvm"
            `{"tune": True, "tune_budget_s": 600}` (measure matmul schedules, cached).
        eval_data: batches `(args, kwargs)` to measure fidelity on (default: the example).
        calibration: batches for passes that calibrate (default: eval_data).
        task_fidelity: `fn(original, optimized) -> dict` for a task metric (e.g. embeddings).
        fidelity_budget: e.g. {"cosine_min": 0.97}; violating it raises NumericsError.
        measure_latency: time original and optimized here, interleaved, in one run (default:
            only when the target is this machine's `cpu`).
        estimate_targets: more targets to estimate in the same report (the cost model runs on
            the post-pass graph; `target` itself is always estimated).
        **pass_options: per-pass option overrides, e.g. `quantize={"skip": ["classifier"]}`.
    """
    # hardware/ imports optim's errors, so its modules load here, not at optim's import
    from hardware.capability import estimate_advice, pass_advice
    from hardware.estimate import DEFAULT_PRECISION, report_section
    from hardware.opcost import graph_kernels
    from hardware.spec import load_spec

    load_plugins()
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"optimize() takes a torch.nn.Module, got {type(model).__name__}")
    say = progress or (lambda msg: None)
    tgt = get_target(target)
    backend_name = backend or tgt.default_backend
    lower = BACKENDS.get(backend_name)
    pipe = resolve_pipeline(pipeline, tgt.default_pipeline, pass_options)
    args, kwargs = _as_batch(example_inputs, example_kwargs)
    evals = list(eval_data) if eval_data else [(args, kwargs)]
    _check_shapes("eval_data", evals, (args, kwargs))
    _check_shapes("calibration", list(calibration or []), (args, kwargs))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            say("running the original model")
            refs = [model(*a, **k) for a, k in evals]
            flops = _count_flops(model, args, kwargs)
        say("capturing the graph with torch.export")
        cap = capture(model, args, kwargs)
    finally:
        model.train(was_training)
    gm = cap.gm
    before_hist = op_histogram(gm)
    stages = {"captured": graph_kernels(gm)}
    weight_bytes = _weight_bytes(gm)
    ctx = PassContext(target=tgt, example_inputs=(args, kwargs),
                      calibration=list(calibration) if calibration else evals)

    def check(step, result):
        out = gm(*evals[0][0], **evals[0][1])
        fid = numerics.compare(refs[0], out, _token_mask(evals[0][1]))
        result.details.setdefault("fidelity", fid)
        if isinstance(step.spec.numerics, Exact):
            scale = max(1.0, max((t.abs().max().item() for t in numerics.tensor_leaves(refs[0])),
                                 default=1.0))
            if fid["max_abs_error"] > step.spec.numerics.atol * scale:
                raise NumericsError(f"exact pass broke its contract: max abs error "
                                    f"{fid['max_abs_error']:.3g} > {step.spec.numerics.atol:g}")
        stages[step.name] = graph_kernels(gm)

    say(f"running passes: {', '.join(pipe.names) or '(none)'}")
    with torch.no_grad():
        if any(step.spec.teacher for step in pipe.steps):  # outputs before any pass ran
            ctx.teacher = {id(b): run_graph(gm, b) for b in ctx.calibration}
        results = pipe.run(gm, ctx, after_each=check)
    say(f"lowering to {backend_name}")
    t0 = time.perf_counter()
    artifact = lower(gm, args, kwargs, **_backend_options(backend_name, lower, backend_options,
                                                         say))
    lower_s = time.perf_counter() - t0
    cuda = None
    if backend_name == "tvm" and load_spec(target).cuda_arch:
        from backends import tvm_cuda

        say(f"generating CUDA code for {target} ({load_spec(target).cuda_arch})")
        cuda = tvm_cuda.build_cuda(gm, args, kwargs, load_spec(target).cuda_arch)
        if cuda.executable is not None and tvm_cuda.gpu_available():
            say("running the CUDA build on this machine's GPU")
            cuda.info.update(tvm_cuda.run_on_gpu(cuda.artifact(), args, kwargs, refs[0],
                                                 _token_mask(kwargs)))

    with torch.inference_mode():
        outs = [artifact(*a, **k) for a, k in evals]
    fid = _aggregate([numerics.compare(r, o, _token_mask(k)) for r, o, (_, k) in
                      zip(refs, outs, evals)])
    fidelity = {"outputs": fid, "batches": len(evals),
                "padding": "excluded" if _token_mask(evals[0][1]) is not None else "none"}
    original_fn = lambda *a, **k: model(*a, **k)  # noqa: E731
    if task_fidelity is not None:
        say("measuring task fidelity")
        with torch.inference_mode():
            fidelity["task"] = task_fidelity(original_fn, artifact)
    warnings = _check_budget(fidelity, fidelity_budget)

    latency, speedup = [], {}
    if measure_latency is None:
        measure_latency = tgt.runs_here
    if measure_latency:
        say("measuring latency (original vs optimized, interleaved)")
        m = measure({"original": lambda: model(*args, **kwargs),
                     "optimized": lambda: artifact(*args, **kwargs)})
        latency = [{"label": "original", "backend": "torch eager", **m["original"]},
                   {"label": "optimized", "backend": backend_name, **m["optimized"]}]
        speedup = {"optimized_vs_original": m["original"]["median_ms"] / m["optimized"]["median_ms"],
                   "basis": "ratio of medians measured in the same interleaved run"}

    say(f"estimating on {', '.join([target, *(estimate_targets or [])])}")
    memory_bytes = float(_weight_bytes(gm))
    estimates = [report_section(stages, t, memory_bytes=memory_bytes)
                 for t in dict.fromkeys([target, *(estimate_targets or [])])]
    main_est = estimates[0]
    latency += [{"label": f"original @ {target}", "status": "estimated", "target": target,
                 "median_ms": main_est["stages"][0]["estimated_ms"], "by": main_est["by"]},
                {"label": f"optimized @ {target}", "status": "estimated", "target": target,
                 "median_ms": main_est["estimated_ms"], "bound_kind": main_est["bound"],
                 "by": main_est["by"]},
                {"label": f"optimized @ {target} (roofline bound)", "status": "bound",
                 "target": target,
                 "median_ms": main_est["bound_ms"],
                 "by": "datasheet peaks and bandwidth at 100%, no overhead: a lower bound"}]
    if cuda is not None and cuda.info["ran"]:
        latency.append({"label": f"optimized @ {target} (measured: TVM CUDA, this machine's GPU)",
                        "backend": "tvm cuda", **cuda.info["latency"]})

    report = Report({
        "schema": "optim.report/1",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "optim_version": _version(),
        "model": {"name": name or type(model).__name__, "class": type(model).__qualname__,
                  "parameters": sum(p.numel() for p in model.parameters()), "flops": flops,
                  "weight_bytes": weight_bytes, "weight_bytes_after": _weight_bytes(gm),
                  "inputs": _describe_inputs(args, kwargs), "capture_seconds": round(cap.seconds, 3)},
        "target": {"name": tgt.name, "kind": tgt.kind, "description": tgt.description,
                   "runs_here": tgt.runs_here, "provenance": tgt.provenance},
        "backend": {"name": backend_name, "lower_seconds": round(lower_s, 3),
                    **({"chosen_because": tgt.backend_reason} if backend is None else {}),
                    **getattr(artifact, "info", lambda: {})(),
                    **({"cuda": cuda.info} if cuda else {})},
        "pipeline": pipe.to_list(),
        "passes": [{**r.to_dict(), "numerics": s.spec.numerics.describe(),
                    "fidelity": r.details.pop("fidelity", None)}
                   for r, s in zip(results, pipe.steps)],
        "graph": {"before": before_hist, "after": op_histogram(gm)},
        "fidelity": fidelity,
        "latency": latency,
        "speedup": speedup,
        "estimates": estimates,
        "advice": pass_advice(load_spec(target), pipe.names,
                              DEFAULT_PRECISION[load_spec(target).kind])
        + [a for e in estimates for a in estimate_advice(e)],
        "warnings": warnings,
    }).validate()
    if warnings and fidelity_budget and fidelity_budget.get("enforce", True):
        raise NumericsError("fidelity budget not met: " + "; ".join(warnings))
    om = OptimizedModel(artifact, report, gm, (args, kwargs), stages)
    om.cuda_source = cuda.source if cuda else None
    om.cuda_build = cuda
    return om


def _token_mask(kwargs: dict) -> torch.Tensor | None:
    mask = kwargs.get("attention_mask")
    return mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


def _aggregate(items: list[dict]) -> dict:
    return {"max_abs_error": max(i["max_abs_error"] for i in items),
            "cosine_mean": sum(i["cosine_mean"] for i in items) / len(items),
            "cosine_min": min(i["cosine_min"] for i in items),
            "sqnr_db": min(i["sqnr_db"] for i in items)}


def _check_budget(fidelity: dict, budget: dict | None) -> list[str]:
    """Budget keys name measured metrics: `cosine_min: 0.97` is a floor, `*_error` a ceiling."""
    if not budget:
        return []
    flat = {**fidelity["outputs"], **{f"task.{k}": v for k, v in fidelity.get("task", {}).items()}}
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
            out.append(f"{key} = {value:.4g} is {'above' if ceiling else 'below'} the budget {limit}")
    return out


def _count_flops(model, args, kwargs) -> float:
    try:
        with FlopCounterMode(display=False) as fc:
            model(*args, **kwargs)
        return float(fc.get_total_flops())
    except Exception:  # counting is best-effort; the report says 0 then
        return 0.0


def _weight_bytes(gm: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in list(gm.parameters()) + list(gm.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _describe_inputs(args: tuple, kwargs: dict) -> list[dict]:
    items = [(f"arg{i}", a) for i, a in enumerate(args)] + list(kwargs.items())
    return [{"name": n, "shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
            if isinstance(v, torch.Tensor) else {"name": n, "value": repr(v)[:40]} for n, v in items]


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("optim")
    except Exception:
        return "0+unknown"


