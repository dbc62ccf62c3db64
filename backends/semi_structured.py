"""2:4-masked linears → PyTorch semi-structured sparse weights (NVIDIA sparse tensor cores).

`prune_weights(pattern="2:4")` marks each linear it masks with `weight_format: "2:4"`. On a CUDA
GPU in fp16 or bf16, `convert` swaps such a weight for a semi-structured sparse tensor (the kept
half of the values plus 2-bit position metadata), so `aten.linear` runs a sparse GEMM through
cuSPARSELt or CUTLASS. Sparse GEMMs are not always faster (per-call setup in cuSPARSELt, small
shapes), so by default (`mode="auto"`) each distinct shape is timed here, dense against each
sparse kernel, on the row count the graph feeds it, and only a faster sparse kernel is used.
Every linear left dense is listed with the reason.
"""

from __future__ import annotations

import math

import torch
import torch.fx
import torch.nn.functional as F

from backends.cuda_timing import cuda_times
from optim.ir import get_constant, module_path
from passes.common.linears import constant_linears, weight_and_bias

aten = torch.ops.aten
MODES = ("auto", "always", "never")
MIN_GAIN = 1.05  # a sparse kernel must beat dense by 5% to be used (timing noise)


def is_2_4(w: torch.Tensor) -> bool:
    """At most 2 nonzeros in every group of 4 consecutive inputs of every output row."""
    if w.dim() != 2 or w.shape[1] % 4:
        return False
    return bool(((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all())


def _kernels() -> dict:
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    out = {"CUTLASS": SparseSemiStructuredTensorCUTLASS.from_dense}
    try:
        if torch.backends.cusparselt.is_available():
            out["cuSPARSELt"] = SparseSemiStructuredTensorCUSPARSELT.from_dense
    except AttributeError:
        pass
    return out


def _median_ms(fn, reps: int = 10, graphed: bool = False) -> float:
    """Median CUDA-event time of `fn`, or of replays of its CUDA graph when `graphed`."""

    return cuda_times(fn, reps, graphed=graphed)[reps // 2]


def _choose(w: torch.Tensor, rows: int, mode: str, timed: dict,
            graphed: bool) -> tuple[object, str, dict]:
    """(sparse weight or None, reason when None, timings) for weight `w` fed `rows` rows, timed
    as the artifact will run (eagerly, or replayed from a CUDA graph)."""
    key = (rows, *w.shape, w.dtype)
    if key not in timed:
        x = torch.randn(rows, w.shape[1], device=w.device, dtype=w.dtype)
        t = {"rows": rows, "in": w.shape[1], "out": w.shape[0], "graphed": graphed,
             "dense_ms": _median_ms(lambda: F.linear(x, w), graphed=graphed)
             if mode == "auto" else None}
        for name, make in _kernels().items():
            try:
                s = make(w)
                t[f"{name}_ms"] = _median_ms(lambda s=s: F.linear(x, s), graphed=graphed)
            except (RuntimeError, ValueError) as e:  # a shape or dtype it does not take
                t[f"{name}_error"] = str(e).splitlines()[0][:160]
        timed[key] = t
    t = timed[key]
    sparse = {k[:-3]: v for k, v in t.items() if k.endswith("_ms") and k != "dense_ms"}
    if not sparse:
        return None, "no sparse kernel takes this shape: " + "; ".join(
            v for k, v in t.items() if k.endswith("_error")), t
    best = min(sparse, key=sparse.get)
    if mode == "auto" and sparse[best] * MIN_GAIN > t["dense_ms"]:
        return None, (f"measured slower: dense {t['dense_ms']:.3f} ms, {best} "
                      f"{sparse[best]:.3f} ms at {rows}x{t['in']}->{t['out']}"), t
    return _kernels()[best](w), best, t


def convert(gm: torch.fx.GraphModule, mode: str = "auto", graphed: bool = False) -> dict:
    """Swap the 2:4-marked `aten.linear` weights of `gm` (already on the GPU, in fp16/bf16) for
    semi-structured sparse tensors where `mode` says so, in place: "auto" where a sparse kernel
    measured faster than dense for that shape, "always" wherever one takes it, "never" nowhere.
    `graphed`: time as replays of CUDA graphs (the artifact will be replayed; host-side setup
    per call then drops out). Returns what was converted, what was not and why, and the
    timings per shape."""
    if mode not in MODES:
        raise ValueError(f"semi_structured mode {mode!r} is not one of {MODES}")
    converted, dense, timed = [], [], {}
    for n in constant_linears(gm):
        if n.meta.get("weight_format") != "2:4":
            continue
        where = module_path(n)
        w_node, _ = weight_and_bias(n)
        w = get_constant(gm, w_node)
        why = None
        if mode == "never":
            why = "semi_structured is 'never'"
        elif n.target is not aten.linear.default:
            why = f"{n.target} (transposed weight): only aten.linear weights are converted"
        elif len(w_node.users) > 1:
            why = "the weight is shared with other ops"
        elif not is_2_4(w):
            why = "the weight is no longer 2:4 (a later pass changed it)"
        elif not w.is_cuda or w.dtype not in (torch.float16, torch.bfloat16):
            why = f"sparse tensor cores need fp16/bf16 on CUDA, not {w.dtype} on {w.device.type}"
        if why is None:
            val = n.args[0].meta.get("val")
            rows = math.prod(val.shape[:-1]) if val is not None else 1
            sparse, why, _ = _choose(w.detach(), rows, mode, timed, graphed)
            if sparse is not None:
                owner, _, name = w_node.target.rpartition(".")
                # the documented form: a Parameter wrapping the sparse tensor subclass
                setattr(gm.get_submodule(owner) if owner else gm, name,
                        torch.nn.Parameter(sparse, requires_grad=False))
                converted.append({"where": where, "kernel": why})
                continue
        dense.append({"where": where, "why": why})
    return {"mode": mode, "converted": len(converted), "kernels": sorted(
        {c["kernel"] for c in converted}), "kept_dense": dense, "timings": list(timed.values())}
