"""torch backend: runs the rewritten FX graph eagerly (optim's ops run their CPU kernels).

By default on the CPU in fp32, on the graph itself. With `device="cuda"` (and optionally
`dtype="float16"`/`"bfloat16"`) it runs a copy of the graph on the GPU; in fp16/bf16 the linears
`prune_weights` masked 2:4 run on sparse tensor cores (`semi_structured`). Calls take and return
CPU tensors, as every backend's do.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx
from torch.utils import _pytree as pytree

from backends.base import Artifact, Batch, Progress, register_backend
from backends.cuda_timing import cuda_graph
from backends.semi_structured import MODES, convert
from hardware.target import Target
from optim.errors import BackendError, OptimError
from optim.ir import op_histogram
from optim.program_files import load_program, save_program
from optim.shapes import export_program

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class TorchArtifact(Artifact):
    backend = "torch"

    def __init__(self, gm: torch.fx.GraphModule, device: str = "cpu", dtype: str = "float32",
                 sparse: dict | None = None, source: torch.fx.GraphModule | None = None,
                 options: TorchOptions | None = None, example: Batch | None = None):
        self.gm, self.device, self.dtype, self.sparse = gm, torch.device(device), dtype, sparse
        self.graph = None  # a CUDA graph of one call, replayed (`capture`)
        self.source = source if source is not None else gm  # the CPU fp32 graph lowered
        self.options = options or TorchOptions()  # to lower it again after loading
        self.example = example  # (args, kwargs) it was lowered at: `save` exports with them

    def capture(self, args: tuple, kwargs: dict) -> None:
        """Record one call on the example inputs as a CUDA graph; later calls copy their inputs
        into its buffers and replay it: one launch instead of one per op."""
        self.static_in = self.to_device((args, kwargs))
        self.graph, self.static_out = cuda_graph(lambda: self.gm(*self.static_in[0],
                                                                **self.static_in[1]))

    def run_on_device(self, args: tuple, kwargs: dict):
        """One call on device-resident inputs; outputs stay on the device."""
        if self.graph is None:
            return self.gm(*args, **kwargs)
        with torch.inference_mode():  # the buffers were recorded as inference tensors
            return self._replay(args, kwargs)

    def _replay(self, args: tuple, kwargs: dict):
        for dst, src in zip(pytree.tree_leaves(self.static_in), pytree.tree_leaves((args, kwargs))):
            if isinstance(dst, torch.Tensor):
                if dst.shape != src.shape:
                    raise BackendError(f"this artifact replays a CUDA graph recorded for inputs "
                                       f"of shape {tuple(dst.shape)}, got {tuple(src.shape)}; "
                                       f"lower again with these shapes or cuda_graph=False")
                dst.copy_(src)
        self.graph.replay()
        return self.static_out

    def to_device(self, tree):
        """Inputs as the graph runs them: on its device, floating tensors in its dtype."""
        dt = DTYPES[self.dtype]
        return pytree.tree_map_only(
            torch.Tensor, lambda t: t.to(self.device, dt if t.is_floating_point() else None), tree)

    def __call__(self, *args, **kwargs):
        with torch.inference_mode():
            if self.device.type == "cpu" and self.dtype == "float32":
                return self.gm(*args, **kwargs)
            out = self.run_on_device(*self.to_device((args, kwargs)))
            return pytree.tree_map_only(
                torch.Tensor, lambda t: t.cpu().float() if t.is_floating_point() else t.cpu(), out)

    def info(self) -> dict:
        where = (torch.cuda.get_device_name(self.device) if self.device.type == "cuda"
                 else "cpu")
        return {"runtime": f"torch {torch.__version__}", "threads": torch.get_num_threads(),
                "device": where, "dtype": self.dtype, "cuda_graph": self.graph is not None,
                "ops": op_histogram(self.gm),
                **({"semi_structured_2_4": self.sparse} if self.sparse is not None else {})}

    def save(self, directory: Path) -> dict:
        """The CPU fp32 graph as torch's export archive, and the options it was lowered with."""
        args, kwargs = self.example
        ep = export_program(self.source, args, kwargs)  # with its dynamic axes
        if not self.options.cuda_graph:  # a CUDA graph is recorded on them
            ep.example_inputs = None
        changed = self.options != TorchOptions()
        return {"artifact": "program.json", "program": save_program(ep, directory, "program"),
                "backend_options": dataclasses.asdict(self.options) if changed else {}}


@dataclass(frozen=True)
class TorchOptions:
    device: str = "cpu"  # "cuda" runs a copy of the graph on the GPU
    dtype: str = "float32"  # "float16" / "bfloat16": floating constants and inputs cast
    # CUDA 2:4 linears: "auto" (where measured faster), "always", "never"
    semi_structured: str = "auto"
    cuda_graph: bool = False  # CUDA: record one call on the example inputs, replay it


def load(directory: Path, manifest: dict, in_spec=None, out_spec=None) -> TorchArtifact:
    if not isinstance(manifest.get("program"), dict):
        raise OptimError(f"{directory}: the manifest names no saved program; it was written by an "
                         f"older optim (a pickled program.pt2, not loaded: it could run code). "
                         f"Optimize the model again")
    ep = load_program(directory, manifest["program"])
    gm = ep.module()
    options = TorchOptions(**(manifest.get("backend_options") or {}))
    args, kwargs = ep.example_inputs or ((), {})
    if options == TorchOptions():
        return TorchArtifact(gm, example=(args, kwargs))
    try:
        return lower(gm, (args, kwargs), None, options)
    except BackendError as e:
        raise OptimError(f"{directory} was lowered with {dataclasses.asdict(options)} and cannot "
                         f"be here: {e}. To run it on the CPU, optimize the model again with "
                         f"backend_options={{}}") from e


@register_backend("torch", options=TorchOptions, load=load, dynamic=True)
def lower(gm: torch.fx.GraphModule, example: Batch, target: Target | None,
          options: TorchOptions, progress: Progress | None = None) -> TorchArtifact:
    """`device`: "cpu" or "cuda"; `dtype`: float32, float16 or bfloat16 for the weights and
    floating inputs (anything but CPU fp32 runs on a copy of the graph); `semi_structured`
    (CUDA, fp16/bf16): 2:4 linears run sparse where measured faster ("auto"), wherever a sparse
    kernel takes them ("always"), or never; `cuda_graph` (CUDA): record a call on the example
    inputs and replay it (calls must then have the example's shapes)."""
    device, dtype = options.device, options.dtype
    semi_structured, cuda_graph = options.semi_structured, options.cuda_graph
    if semi_structured not in MODES:
        raise BackendError(f"torch backend: semi_structured {semi_structured!r} is not one of "
                           f"{MODES}")
    if dtype not in DTYPES:
        raise BackendError(f"torch backend: dtype {dtype!r} is not one of {sorted(DTYPES)}")
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda"):
        raise BackendError(f"torch backend: device {device!r} must be 'cpu' or 'cuda'")
    if cuda_graph and dev.type != "cuda":
        raise BackendError("torch backend: cuda_graph needs device='cuda'")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendError("torch backend: device 'cuda' was asked for but this PyTorch sees no "
                           "CUDA GPU (a CPU-only build, or no driver); use device='cpu'")
    if dev.type == "cpu" and dtype == "float32":
        return TorchArtifact(gm, example=example)
    run = copy.deepcopy(gm).to(dev)
    run = run.to(DTYPES[dtype])
    _retarget(run, DTYPES[dtype], dev)
    sparse = None
    if dev.type == "cuda" and dtype != "float32":
        sparse = convert(run, semi_structured, graphed=cuda_graph)
    art = TorchArtifact(run, device, dtype, sparse, source=gm, options=options, example=example)
    if cuda_graph:
        try:
            with torch.inference_mode():
                art.capture(*example)
        except RuntimeError as e:
            raise BackendError(f"torch backend: recording the CUDA graph failed ("
                               f"{str(e).splitlines()[0][:300]}); lower with cuda_graph=False"
                               ) from e
    return art


def _retarget(gm: torch.fx.GraphModule, dtype: torch.dtype, device: torch.device) -> None:
    """Casts and factories traced in fp32 on the CPU (`_to_copy(dtype=float32)`,
    `full(..., dtype=float32, device=cpu)`: RoPE tables, mask fills) produce `dtype` on `device`
    instead, or they would mix precisions and devices the ops after them reject."""
    top = torch.finfo(dtype).max

    def swap(a):
        if a is torch.float32:
            return dtype
        if isinstance(a, float) and abs(a) > top:  # fp32's finfo.min as a mask fill
            return math.copysign(top, a)
        if isinstance(a, torch.device) and a.type == "cpu" or isinstance(a, str) and a == "cpu":
            return device
        return a

    for n in gm.graph.nodes:
        if n.op == "call_function":
            n.args = tuple(swap(a) for a in n.args)
            n.kwargs = {k: swap(v) for k, v in n.kwargs.items()}
        elif n.op == "get_attr":  # tensor constants that are neither parameters nor buffers
            owner_name, _, name = n.target.rpartition(".")
            owner = gm.get_submodule(owner_name) if owner_name else gm
            t = getattr(owner, name, None)
            if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter) \
                    and name not in owner._buffers and t.device != device:
                setattr(owner, name, t.to(device, dtype if t.is_floating_point() else None))
    gm.recompile()


