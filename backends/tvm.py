"""tvm backend: the rewritten graph → torch.export → Relax (optim's ops via `tvm_lowering`) →
`tvm.compile` for this CPU (LLVM, the host's `-mcpu`), run in a Relax VirtualMachine.

Weights stay Relax parameters (bound at run time, not folded into the code); work that depends
on weights only (transposes) is lifted into `main_transform_params` and done once at load.
Kernels are scheduled by our CPU rules (`tvm_schedules`: register-tiled matmuls with fused
epilogues, vectorized parallel elementwise code) and dlight's GEMV and norm/softmax rules; the
matmul tiles come from the tuning database (`tvm_tuning`) when it has them. The artifact's
`info()` reports the TVM version, the target JSON, the tuning state and compile time.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch
import torch.fx
from torch.utils import _pytree as pytree

from optim.errors import BackendError
from optim.ir import require_lowerings
from optim.registry import BACKENDS

# idle TVM worker threads must not spin: on a 2-core machine they would steal the cores from
# whatever runs next (the same reason the ORT session disables spinning)
os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")
# TVM's pool assumes 2-way hyper-threading and starts cores/2 workers unless told otherwise: on
# this 2-core machine that is one thread, half the machine
os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))


LIFTED = "main_transform_params"  # Relax's name for the function LiftTransformParams makes


def host_target() -> dict:
    """This CPU as a TVM target dict (JSON form: target strings changed across TVM versions)."""
    import tvm

    return {"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(),
            "num-cores": len(os.sched_getaffinity(0))}


def save_executable(executable, params: list, directory) -> dict:
    """Write a compiled Relax executable (a shared library) and its weights (safetensors, in
    call order) into `directory`; the manifest entries `TvmArtifact.load_from` reads."""
    from safetensors.numpy import save_file

    executable.export_library(str(directory / "model.so"))
    save_file({f"p{i}": np.ascontiguousarray(p) for i, p in enumerate(params)},
              str(directory / "params.safetensors"))
    return {"artifact": "model.so", "params": "params.safetensors"}


class TvmArtifact:
    def __init__(self, executable, params: list, target: dict, in_spec=None, out_spec=None,
                 compile_s: float = 0.0, schedule: str = "untuned", tuning: dict | None = None):
        import tvm
        from tvm.runtime.vm import VirtualMachine  # the runtime's: no compiler needed to run

        self.executable, self.target = executable, target
        self.in_spec, self.out_spec = in_spec, out_spec
        self.compile_s, self.schedule, self.tuning = compile_s, schedule, tuning or {}
        self.device = tvm.cuda(0) if target.get("kind") == "cuda" else tvm.cpu()
        self.vm = VirtualMachine(executable, self.device)
        self.raw_params = [np.ascontiguousarray(p) for p in params]
        self.params = [tvm.runtime.tensor(p, self.device) for p in self.raw_params]
        try:
            transform = self.vm[LIFTED]
        except AttributeError:  # nothing was lifted
            transform = None
        if transform is not None:  # weight-only work (transposes) lifted out of `main`: run once
            self.params = list(transform(self.params))

    def device_inputs(self, args: tuple, kwargs: dict) -> list:
        """The call's tensor inputs, in the compiled function's order, on the artifact's device."""
        import tvm

        if self.in_spec is not None:
            from torch.fx._pytree import tree_flatten_spec

            flat = list(tree_flatten_spec((args, kwargs), self.in_spec))
        else:
            flat = list(args) + list(kwargs.values())
        return [tvm.runtime.tensor(t.detach().cpu().contiguous().numpy(), self.device)
                for t in flat if isinstance(t, torch.Tensor)]

    def __call__(self, *args, **kwargs):
        out = self.vm["main"](*self.device_inputs(args, kwargs), *self.params)
        leaves = [torch.from_numpy(o.numpy()) for o in _leaves(out)]
        return pytree.tree_unflatten(leaves, self.out_spec) if self.out_spec else tuple(leaves)

    def save_to(self, directory) -> dict:
        """Write the compiled library and the weights (safetensors, in call order)."""
        return {**save_executable(self.executable, self.raw_params, directory),
                "target": self.target, "schedule": self.schedule, "tuning": self.tuning,
                "compile_seconds": self.compile_s}

    @classmethod
    def load_from(cls, directory, manifest: dict, in_spec=None, out_spec=None) -> TvmArtifact:
        import tvm
        from safetensors.numpy import load_file

        lib = tvm.runtime.load_module(str(directory / manifest["artifact"]))
        weights = load_file(str(directory / manifest["params"]))
        params = [weights[f"p{i}"] for i in range(len(weights))]
        return cls(lib, params, manifest["target"], in_spec, out_spec,
                   manifest.get("compile_seconds", 0.0), manifest.get("schedule", "untuned"),
                   manifest.get("tuning"))

    def info(self) -> dict:
        import tvm

        return {"runtime": f"tvm {tvm.__version__}", "target": self.target,
                "schedule": self.schedule, "tuning": self.tuning,
                "compile_seconds": round(self.compile_s, 2),
                "threads": self.target.get("num-cores")}


def _leaves(out) -> list:
    import tvm

    if isinstance(out, (tvm.runtime.Tensor,)):
        return [out]
    return [x for o in out for x in _leaves(o)]


def to_relax(gm: torch.fx.GraphModule, args: tuple, kwargs: dict):
    """The graph as a Relax IRModule with its weights detached: (mod, params)."""
    try:
        from tvm import relax
        from tvm.relax.frontend.torch import from_exported_program
    except ImportError as e:
        raise BackendError(f"the tvm backend needs apache-tvm ({e}); pip install the project's "
                           f"dependencies") from e
    from backends.tvm_lowering import CONVERT_MAP

    require_lowerings(gm, {k.split(".")[0] for k in CONVERT_MAP}, "tvm")
    flat, in_spec = pytree.tree_flatten((args, kwargs))
    tensors = tuple(t for t in flat if isinstance(t, torch.Tensor))
    try:
        # TVM's importer takes tensor inputs only: bind the rest (flags like use_cache=False)
        ep = torch.export.export(_TensorsOnly(gm, flat, in_spec), tensors, strict=False)
        mod = from_exported_program(ep, keep_params_as_input=True, custom_convert_map=CONVERT_MAP)
    except Exception as e:
        raise BackendError(f"lowering to Relax failed: {type(e).__name__}: {str(e)[:400]}") from e
    return relax.frontend.detach_params(mod)


def lower(gm: torch.fx.GraphModule, args: tuple, kwargs: dict, *, tune: bool = False,
          tune_budget_s: float | None = None, fast_math: bool = True,
          progress=None) -> TvmArtifact:
    """Compile for this CPU. Matmuls are scheduled by `tvm_schedules` with the tile the tuning
    database recorded for them (`tune=True` measures the ones it lacks, within
    `tune_budget_s`); `fast_math` swaps exp/erf/tanh for vectorizable approximations
    (max error ~1e-6 relative)."""
    import tvm
    from tvm import relax
    from tvm.s_tir import dlight as dl

    from backends import tvm_schedules, tvm_tuning

    t0 = time.perf_counter()
    info = getattr(gm._graph._codegen, "pytree_info", None)
    mod, params = to_relax(gm, args, kwargs)
    target = host_target()
    tgt = tvm.target.Target(target)
    with tgt:
        mod = relax.transform.FastMathTransform()(mod) if fast_math else mod
        mod = relax.transform.LiftTransformParams()(mod)
        mod = relax.get_pipeline("zero")(mod)
        db = tvm_tuning.TuningDB(target)
        configs, tuning = tvm_tuning.tune(mod, tgt, db, measure=tune, budget_s=tune_budget_s,
                                          progress=progress)
        mod = dl.ApplyDefaultSchedule(*tvm_schedules.default_rules(configs))(mod)
    tuning["unscheduled_kernels"] = tvm_schedules.unscheduled(mod)
    try:
        ex = tvm.compile(mod, target=tgt)
    except Exception as e:
        raise BackendError(f"TVM build failed: {type(e).__name__}: {str(e)[:400]}") from e
    flat_params = [p.numpy() for p in params.get("main", [])]
    return TvmArtifact(ex, flat_params, target, info.in_spec if info else None,
                       info.out_spec if info else None, time.perf_counter() - t0,
                       schedule=tuning["state"], tuning=tuning)


class _TensorsOnly(torch.nn.Module):
    """`gm` called with its tensor inputs only; the non-tensor inputs are fixed."""

    def __init__(self, gm: torch.fx.GraphModule, flat: list, spec):
        super().__init__()
        self.gm, self.flat, self.spec = gm, flat, spec

    def forward(self, *tensors):
        it = iter(tensors)
        flat = [next(it) if isinstance(x, torch.Tensor) else x for x in self.flat]
        args, kwargs = pytree.tree_unflatten(flat, self.spec)
        return self.gm(*args, **kwargs)


BACKENDS.add("tvm", lower)
