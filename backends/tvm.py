"""tvm backend: the rewritten graph → torch.export → Relax (optim's ops via `tvm_lowering`) →
`tvm.compile` for this CPU (LLVM, the host's `-mcpu`), run in a Relax VirtualMachine.

Dynamic axes stay symbolic (Relax shape variables): one executable runs every shape in the
ranges of `gm.meta["shapes"]`. Matmul tiles are tuned at three shape buckets
(`shape_buckets`), and a kernel whose buckets chose different tiles holds all of them behind
one branch per call (`tvm_schedules.Dispatch`).

Weights stay Relax parameters (bound at run time, not folded into the code); work that depends
on weights only (transposes) is lifted into `main_transform_params` and done once at load.
Kernels are scheduled by our CPU rules (`tvm_schedules`: register-tiled matmuls with fused
epilogues, vectorized parallel elementwise code) and dlight's GEMV and norm/softmax rules; the
matmul tiles come from the tuning database (`tvm_tuning`) when it has them. The artifact's
`info()` reports the TVM version, the target JSON, the tuning state and compile time.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch.fx

from backends import tvm_cuda
from backends.base import Batch, Progress, register_backend
from backends.tvm_cuda import CudaBuild
from backends.tvm_relax import TvmArtifact, to_relax
from hardware.target import Target
from optim.errors import BackendError
from optim.kernels import host_target
from optim.shapes import ShapeSpec

# TVM's thread pool (every core, no spinning) is set up by `optim.kernels` on import




@dataclass(frozen=True)
class TvmOptions:
    tune: bool = False  # measure matmul tiles the tuning database lacks (cached per target)
    tune_budget_s: float | None = None  # stop measuring after this many seconds
    fast_math: bool = True  # vectorizable exp/erf/tanh (max error ~1e-6 relative)


class TvmCpuArtifact(TvmArtifact):
    """The build for this CPU, and for a GPU target also its CUDA build (`cuda`)."""

    cuda: CudaBuild | None = None

    @property
    def cuda_source(self) -> str | None:
        return self.cuda.source if self.cuda else None

    def info(self) -> dict:
        return {**super().info(), **({"cuda": self.cuda.info} if self.cuda else {})}

    def save(self, directory: Path) -> dict:
        manifest = self.save_to(directory)
        if self.cuda is not None:  # generated for a GPU target
            (directory / "kernels.cu").write_text(self.cuda.source)
            manifest["cuda_source"] = "kernels.cu"
            if self.cuda.executable is not None:  # runnable on a GPU machine
                (directory / "cuda").mkdir()
                manifest["cuda"] = {"directory": "cuda", **self.cuda.save_to(directory / "cuda")}
        return manifest

    def measured_latency(self) -> list[dict]:
        if self.cuda is None or not self.cuda.info["ran"]:
            return []
        return [{"label": f"optimized @ {self.cuda.target_name} (measured: TVM CUDA, this "
                          f"machine's GPU)", "backend": "tvm cuda", **self.cuda.info["latency"]}]


def load(directory: Path, manifest: dict, in_spec=None, out_spec=None) -> TvmCpuArtifact:
    return TvmCpuArtifact.load_from(directory, manifest, in_spec, out_spec)


def _legalize_and_fuse(mod):
    """Relax's "zero" pipeline (legalize, annotate, fold, fuse), with one fix for symbolic
    shapes: TVM's pattern analysis calls a reshape with a symbolic size opaque (its index
    arithmetic divides by a shape variable), so nothing would fuse across it and every
    reshape would be a copy; a reshape is injective, and is marked so before fusion. (Not
    where its shape holds a min/if_then_else from a slice: TVM's FuseTIR cannot type those.)"""
    from tvm import relax, tirx
    from tvm.relax import transform as rt

    mod = rt.AnnotateTIROpPattern()(rt.LegalizeOps()(mod))
    opaque, injective = 8, 2  # TVM's OpPatternKind values
    for gv, func in list(mod.functions_items()):
        if (isinstance(func, tirx.PrimFunc) and gv.name_hint.startswith("reshape")
                and int(func.attrs["op_pattern"]) == opaque
                and not any(word in func.script() for word in ("T.min", "if_then_else"))):
            mod[gv] = func.with_attr("op_pattern", injective)
    return relax.transform.FuseTIR()(rt.FuseOps()(rt.FoldConstant()(mod)))


def shape_buckets(gm: torch.fx.GraphModule, mod) -> list[dict]:
    """The shapes at which symbolic matmuls are tuned: every dynamic axis small (a quarter of
    the traced size), at the traced size, and large (4x), within its range; each with the
    values of the TIR shape variables that stand for the axes in `mod`, the axes' sizes (for
    data-dependent sizes named after an axis) and `tokens` (the product of the sizes, for
    data-dependent counts such as remove_padding's real tokens)."""
    spec = gm.meta.get("shapes")
    if not isinstance(spec, ShapeSpec) or not spec.dynamic:
        return []
    tensors = [i for i in spec.inputs if i.dtype != "-"]
    names = {}  # TIR var name -> axis
    for want, param in zip(tensors, mod["main"].params):
        for axis, dim in zip(want.dims, param.ty.shape.values):
            if isinstance(axis, str) and hasattr(dim, "name"):
                names[dim.name] = axis
    out = []
    for scale in (0.25, 1, 4):
        sizes = {a: min(hi, max(lo, round(spec.traced[a] * scale)))
                 for a, (lo, hi) in spec.ranges.items()}
        label = " x ".join(f"{a} {n}" for a, n in sizes.items())
        if all(b["label"] != label for b in out):
            out.append({"label": label, "vars": {v: sizes[a] for v, a in names.items()},
                        "axes": sizes, "tokens": math.prod(sizes.values())})
    return out


@register_backend("tvm", options=TvmOptions, load=load, dynamic=True, runs_code=True)
def lower(gm: torch.fx.GraphModule, example: Batch, target: Target | None,
          options: TvmOptions, progress: Progress | None = None) -> TvmCpuArtifact:
    """Relax compiled for this CPU (our schedules, tuned tiles); GPU targets also get CUDA code.

    Matmuls are scheduled by `tvm_schedules` with the tile the tuning
    database recorded for them (`tune=True` measures the ones it lacks, within
    `tune_budget_s`); `fast_math` swaps exp/erf/tanh for vectorizable approximations
    (max error ~1e-6 relative). A target with a CUDA arch also gets a CUDA build
    (`tvm_cuda.build_cuda`), run and timed where TVM sees a GPU."""
    import tvm  # heavy: loaded when a build is asked for
    from tvm import relax
    from tvm.s_tir import dlight as dl

    from backends import tvm_schedules, tvm_tuning  # TVM's compiler (optional, heavy)

    args, kwargs = example
    tune, tune_budget_s, fast_math = options.tune, options.tune_budget_s, options.fast_math
    t0 = time.perf_counter()
    info = getattr(gm._graph._codegen, "pytree_info", None)
    mod, params = to_relax(gm, args, kwargs)
    target_gpu, target = target, host_target()
    tgt = tvm.target.Target(target)
    with tgt:
        mod = relax.transform.FastMathTransform()(mod) if fast_math else mod
        mod = relax.transform.LiftTransformParams()(mod)
        mod = _legalize_and_fuse(mod)
        db = tvm_tuning.TuningDB(target)
        configs, tuning = tvm_tuning.tune(mod, tgt, db, measure=tune, budget_s=tune_budget_s,
                                          progress=progress, buckets=shape_buckets(gm, mod))
        mod = dl.ApplyDefaultSchedule(*tvm_schedules.default_rules(configs))(mod)
    tuning["unscheduled_kernels"] = tvm_schedules.unscheduled(mod)
    try:
        ex = tvm.compile(mod, target=tgt)
    except Exception as e:
        raise BackendError(f"TVM build failed: {type(e).__name__}: {str(e)[:400]}") from e
    flat_params = [p.numpy() for p in params.get("main", [])]
    art = TvmCpuArtifact(ex, flat_params, target, info.in_spec if info else None,
                         info.out_spec if info else None, time.perf_counter() - t0,
                         schedule=tuning["state"], tuning=tuning)
    if target_gpu is not None and target_gpu.cuda_arch:
        art.cuda = tvm_cuda.build_and_run(gm, example, target_gpu, progress)
    return art


