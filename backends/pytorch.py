"""torch backend: runs the rewritten FX graph eagerly (optim's ops run their CPU kernels).

By default on the CPU in fp32, on the graph itself. With `device="cuda"` (and optionally
`dtype="float16"`/`"bfloat16"`) it runs a copy of the graph on the GPU; in fp16/bf16 the linears
`prune_weights` masked 2:4 run on sparse tensor cores (`semi_structured`). Calls take and return
CPU tensors, as every backend's do.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.fx
from torch.utils import _pytree as pytree

from optim.errors import BackendError
from optim.ir import op_histogram
from optim.registry import BACKENDS

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class TorchArtifact:
    def __init__(self, gm: torch.fx.GraphModule, device: str = "cpu", dtype: str = "float32",
                 sparse: dict | None = None, source: torch.fx.GraphModule | None = None,
                 options: dict | None = None):
        self.gm, self.device, self.dtype, self.sparse = gm, torch.device(device), dtype, sparse
        self.graph = None  # a CUDA graph of one call, replayed (`capture`)
        self.source = source if source is not None else gm  # the CPU fp32 graph lowered
        self.options = options or {}  # the lowering's options, to lower it again after loading

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


def lower(gm: torch.fx.GraphModule, args: tuple, kwargs: dict, *, device: str = "cpu",
          dtype: str = "float32", semi_structured: str = "auto",
          cuda_graph: bool = False) -> TorchArtifact:
    """`device`: "cpu" or "cuda"; `dtype`: float32, float16 or bfloat16 for the weights and
    floating inputs (anything but CPU fp32 runs on a copy of the graph); `semi_structured`
    (CUDA, fp16/bf16): 2:4 linears run sparse where measured faster ("auto"), wherever a sparse
    kernel takes them ("always"), or never; `cuda_graph` (CUDA): record a call on the example
    inputs and replay it (calls must then have the example's shapes)."""
    from backends.semi_structured import MODES, convert

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
        return TorchArtifact(gm)
    run = copy.deepcopy(gm).to(dev)
    run = run.to(DTYPES[dtype])
    _retarget(run, DTYPES[dtype], dev)
    sparse = None
    if dev.type == "cuda" and dtype != "float32":
        sparse = convert(run, semi_structured, graphed=cuda_graph)
    options = {"device": device, "dtype": dtype, "semi_structured": semi_structured,
               "cuda_graph": cuda_graph}
    art = TorchArtifact(run, device, dtype, sparse, source=gm, options=options)
    if cuda_graph:
        try:
            with torch.inference_mode():
                art.capture(args, kwargs)
        except RuntimeError as e:
            raise BackendError(f"torch backend: recording the CUDA graph failed ("
                               f"{str(e).splitlines()[0][:300]}); lower with cuda_graph=False"
                               ) from e
    return art


def cuda_times(fn, reps: int = 10, warmup: int = 3, graphed: bool = False) -> list[float]:
    """Sorted milliseconds of `reps` calls of `fn` (or replays of its CUDA graph), each timed by
    CUDA events after `warmup` calls."""
    if graphed:
        fn = cuda_graph(fn)[0].replay
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return sorted(ts)


def cuda_graph(fn):
    """(graph, outputs): `fn` warmed up on a side stream, then recorded as a CUDA graph whose
    replay recomputes `outputs` in place."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


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


BACKENDS.add("torch", lower)
