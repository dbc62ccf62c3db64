"""optim's backends: a rewritten graph lowered to something that runs (`backends.base`: a backend
is a name, an options dataclass and `lower(graph, example, target, options) -> Artifact`).
Importing this package registers each one in `optim.registry.BACKENDS`.

Owns: `pytorch` (eager FX graph, CUDA fp16/bf16, CUDA graphs, 2:4 via `semi_structured`),
`onnxruntime` (ONNX export via `onnx_lowering`, ORT session), `tvm` (Relax for this CPU via
`tvm_relax`, `tvm_lowering`, `tvm_schedules`, `tvm_tuning`; CUDA for GPU targets via
`tvm_cuda`). May import: `optim`'s bottom layer, `hardware`, `passes.common`; never the driver.
"""

from backends import onnxruntime, pytorch, tvm  # noqa: F401
