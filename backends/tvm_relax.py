"""What both TVM builds share: the graph as a Relax module (`to_relax`), and a compiled Relax
executable with its weights run in a VirtualMachine (`TvmArtifact`), saved as a shared library
plus safetensors and loaded back with TVM's runtime alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.fx
from torch.utils import _pytree as pytree

from backends.base import Artifact
from optim.errors import BackendError
from optim.ir import require_lowerings
from optim.shapes import ShapeSpec

LIFTED = "main_transform_params"  # Relax's name for the function LiftTransformParams makes


def save_executable(executable, params: list, directory) -> dict:
    """Write a compiled Relax executable (a shared library) and its weights (safetensors, in
    call order) into `directory`; the manifest entries `TvmArtifact.load_from` reads."""
    from safetensors.numpy import save_file

    executable.export_library(str(directory / "model.so"))
    save_file({f"p{i}": np.ascontiguousarray(p) for i, p in enumerate(params)},
              str(directory / "params.safetensors"))
    return {"artifact": "model.so", "params": "params.safetensors"}


class TvmArtifact(Artifact):
    backend = "tvm"

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

    def save(self, directory: Path) -> dict:
        return self.save_to(directory)

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
    from backends.tvm_lowering import CONVERT_MAP  # imports TVM's compiler (optional, heavy)
    require_lowerings(gm, {k.split(".")[0] for k in CONVERT_MAP}, "tvm")
    flat, in_spec = pytree.tree_flatten((args, kwargs))
    tensors = tuple(t for t in flat if isinstance(t, torch.Tensor))
    try:
        # TVM's importer takes tensor inputs only: bind the rest (flags like use_cache=False)
        ep = torch.export.export(_TensorsOnly(gm, flat, in_spec), tensors, strict=False,
                                 dynamic_shapes=_tensor_shapes(gm, flat))
        mod = from_exported_program(ep, keep_params_as_input=True, custom_convert_map=CONVERT_MAP)
    except Exception as e:
        raise BackendError(f"lowering to Relax failed: {type(e).__name__}: {str(e)[:400]}") from e
    mod, params = relax.frontend.detach_params(mod)
    # the importer records each symbolic size's upper bound, and Relax's memory planning would
    # then reserve every buffer at its largest shape up front (an LM head at batch 256 x 1024
    # tokens: tens of GB); without the bound, buffers are sized by each call's shapes
    main = mod["main"]
    if main.attrs is not None and "tir_var_upper_bound" in main.attrs:
        mod["main"] = main.without_attr("tir_var_upper_bound")
    return mod, params


def _tensor_shapes(gm: torch.fx.GraphModule, flat: list) -> tuple | None:
    """export's dynamic_shapes for the tensor leaves of `flat`, from `gm.meta["shapes"]`."""
    spec = gm.meta.get("shapes")
    if not isinstance(spec, ShapeSpec) or not spec.dynamic:
        return None
    dims = {axis: torch.export.Dim(axis, min=lo, max=hi) for axis, (lo, hi) in spec.ranges.items()}
    per_tensor = tuple({i: dims[d] for i, d in enumerate(want.dims) if isinstance(d, str)}
                       for want, leaf in zip(spec.inputs, flat) if isinstance(leaf, torch.Tensor))
    return (per_tensor,)  # one entry: forward's *tensors


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
