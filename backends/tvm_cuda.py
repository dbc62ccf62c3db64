"""TVM for GPU targets: the rewritten graph → Relax → dlight's GPU schedules → CUDA C, compiled by
nvcc for the target's arch when nvcc is installed.

The build keeps the generated source for the report and, when compiled, the executable and the
weights: `save_to` writes them as a library any machine with a CUDA GPU and TVM's runtime can
load (`load_cuda`; TVM's compiler is not needed there). Where a CUDA GPU is present, `run_on_gpu`
runs the code, checks it against the PyTorch outputs and times it with TVM's time evaluator.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.fx

from backends.tvm_relax import TvmArtifact, save_executable, to_relax
from hardware.target import Target
from optim import numerics
from optim.errors import BackendError

# The host side of a CUDA build (argument packing, the VM's glue) is plain x86-64 code: built for
# this CPU's -mcpu it could use instructions (AVX-512, AMX) the GPU machine's CPU lacks.
PORTABLE_HOST = {"kind": "llvm", "mtriple": "x86_64-pc-linux-gnu"}


def cuda_target(arch: str) -> dict:
    return {"kind": "cuda", "arch": arch, "max_threads_per_block": 1024,
            "max_shared_memory_per_block": 49152, "thread_warp_size": 32}


class CudaBuild:
    """What `build_cuda` made: the report fields, and the runnable executable when compiled."""

    def __init__(self, info: dict, source: str, executable=None, params=(), in_spec=None,
                 out_spec=None, target_name: str = ""):
        self.info, self.source, self.executable = info, source, executable
        self.target_name = target_name
        self.params = [np.ascontiguousarray(p) for p in params]
        self.in_spec, self.out_spec = in_spec, out_spec

    def save_to(self, directory) -> dict:
        """Write the CUDA library and its weights; the manifest `load_cuda` reads."""
        if self.executable is None:
            raise BackendError("this CUDA build was not compiled (no nvcc on the build machine): "
                               "only its source exists; install the CUDA toolkit and rebuild")
        return {**save_executable(self.executable, self.params, Path(directory)),
                "target": self.info["target"], "schedule": "dlight GPU rules (untuned)",
                "compile_seconds": self.info["compile_seconds"]}

    def artifact(self):
        """The build as a runnable TvmArtifact on this machine's first CUDA GPU."""
        _require_gpu()
        _use_nvcc_at_load()
        return TvmArtifact(self.executable, self.params, self.info["target"], self.in_spec,
                           self.out_spec, self.info["compile_seconds"],
                           schedule="dlight GPU rules (untuned)")


def build_cuda(gm: torch.fx.GraphModule, args: tuple, kwargs: dict, arch: str) -> CudaBuild:
    """CUDA code for a GPU target: dlight's GPU rules (matmul, GEMV, reduction, general
    fallback) schedule every kernel; nvcc compiles them for `arch` when it is installed."""
    import tvm
    from tvm import relax
    from tvm.s_tir import dlight as dl

    t0 = time.perf_counter()
    info = getattr(gm._graph._codegen, "pytree_info", None)
    mod, params = to_relax(gm, args, kwargs)
    target = cuda_target(arch)
    tgt = tvm.target.Target(target, host=PORTABLE_HOST)
    with tgt:
        mod = relax.get_pipeline("zero")(mod)
        mod = dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                      dl.gpu.GeneralReduction(), dl.gpu.Fallback())(mod)
    try:
        ex = tvm.compile(mod, target=tgt)
        source = _cuda_source(ex)
    except Exception as e:
        raise BackendError(f"CUDA build for {arch} failed: {type(e).__name__}: "
                           f"{str(e)[:400]}") from e
    nvcc = shutil.which("nvcc")
    binary = nvcc_compile(source, arch) if nvcc else b""  # proves the source compiles
    report = {"target": target, "host": PORTABLE_HOST, "compiled": bool(nvcc),
              "compiler": nvcc or "none (source only)", "kernels": source.count("__global__"),
              "source_bytes": len(source), "fatbin_bytes": len(binary),
              "source_sha256": hashlib.sha256(source.encode()).hexdigest(), "ran": False,
              "compile_seconds": round(time.perf_counter() - t0, 2)}
    return CudaBuild(report, source, ex if nvcc else None,
                     [p.numpy() for p in params.get("main", [])],
                     info.in_spec if info else None, info.out_spec if info else None)


def nvcc_compile(source: str, arch: str) -> bytes:
    """CUDA C → a fatbin for `arch` (sm_XY) with nvcc, with the flags TVM's own nvcc path uses."""
    import subprocess
    import tempfile

    cc = arch.removeprefix("sm_")
    with tempfile.TemporaryDirectory(prefix="optim-nvcc-") as tmp:
        src, out = Path(tmp) / "kernels.cu", Path(tmp) / "kernels.fatbin"
        src.write_text(source)
        cmd = ["nvcc", "--fatbin", "-O3", "-gencode", f"arch=compute_{cc},code=sm_{cc}",
               "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
               "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
               "--expt-relaxed-constexpr", "--use_fast_math", "-o", str(out), str(src)]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode:
            raise BackendError(f"nvcc could not compile the generated CUDA for {arch}: "
                               f"{run.stderr[-800:]}")
        return out.read_bytes()


def _use_nvcc_at_load() -> None:
    """TVM stores CUDA source in the built module and compiles it when the module is loaded,
    through the global `tvm_callback_cuda_compile(code)`. TVM's own callback needs its compiler
    library (and NVRTC's Python bindings); with TVM's runtime alone, nvcc does it here, for
    this machine's GPU."""
    import tvm
    from tvm import base

    if not base._RUNTIME_ONLY:
        if not _has_nvrtc() and shutil.which("nvcc"):
            os.environ.setdefault("TVM_CUDA_COMPILE_MODE", "nvcc")
        return
    if not shutil.which("nvcc"):
        raise BackendError("loading a CUDA build compiles its kernels, and with TVM's runtime "
                           "alone that needs nvcc on PATH: install the CUDA toolkit")
    arch = "sm_" + tvm.cuda(0).compute_version.replace(".", "")
    tvm.register_global_func("tvm_callback_cuda_compile", lambda code: nvcc_compile(code, arch),
                             override=True)


def _has_nvrtc() -> bool:
    try:
        import cuda.bindings.nvrtc  # noqa: F401
    except ImportError:
        return False
    return True


def _cuda_source(ex) -> str:
    from tvm import relax

    lib = ex.mod if isinstance(ex, relax.VMExecutable) else ex
    stack = [lib]
    while stack:
        m = stack.pop()
        if "cuda" in str(m.kind):
            return m.inspect_source()
        stack += list(m.imports)
    raise BackendError("the build produced no CUDA module")


def _load_cuda_runtime() -> None:
    """TVM's CUDA runtime library, which its CUDA backend hook loads at import; with the runtime
    alone (TVM_USE_RUNTIME_LIB=1, as on a GPU machine without TVM's compiler) nothing does."""
    from tvm import base

    if "tvm_runtime_cuda" in base._LOADED_LIBS:
        return
    from tvm_ffi.libinfo import load_lib_ctypes

    here = Path(base._LOADED_LIBS["tvm_runtime"]._name).resolve().parent
    try:
        base._LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(
            package="tvm", target_name="tvm_runtime_cuda", extra_lib_paths=[here],
            mode="RTLD_LOCAL")
    except (OSError, RuntimeError):  # no CUDA driver or runtime here: no GPU to run on
        pass


def gpu_available() -> bool:
    """Whether TVM's runtime sees a CUDA GPU here (False where its CUDA library cannot load)."""
    try:
        import tvm

        _load_cuda_runtime()
        return bool(tvm.cuda(0).exist)
    except Exception:
        return False


def _require_gpu() -> None:
    if not gpu_available():
        raise BackendError("no CUDA GPU is visible to TVM's runtime here: run the CUDA build on "
                           "a machine with an NVIDIA GPU and driver (save it with save_to and "
                           "load it there with backends.tvm_cuda.load_cuda)")


def load_cuda(directory, manifest: dict, in_spec=None, out_spec=None):
    """A saved CUDA build as a TvmArtifact on this machine's GPU (TVM's runtime suffices)."""
    _require_gpu()
    _use_nvcc_at_load()
    return TvmArtifact.load_from(Path(directory), manifest, in_spec, out_spec)


def run_on_gpu(artifact, args: tuple, kwargs: dict, refs, token_mask=None, *,
               repeat: int = 20, min_repeat_ms: int = 50) -> dict:
    """Run a CUDA TvmArtifact: its outputs against `refs` (PyTorch's), and its latency from TVM's
    time evaluator (device-synchronized, inputs and weights already on the GPU)."""
    out = artifact(*args, **kwargs)
    fid = numerics.compare(refs, out, token_mask)
    inputs = artifact.device_inputs(args, kwargs)
    timer = artifact.vm.time_evaluator("main", artifact.device, number=1, repeat=repeat,
                                       min_repeat_ms=min_repeat_ms)
    ms = [r * 1e3 for r in timer(*inputs, *artifact.params).results]
    q = statistics.quantiles(ms, n=10)
    name = _device_name(artifact.device)
    return {"ran": True, "fidelity": fid,
            "latency": {"status": "measured", "median_ms": statistics.median(ms), "p10_ms": q[0],
                        "p90_ms": q[-1], "runs": len(ms), "threads": None,
                        "machine": f"{name} (TVM time evaluator, device-synchronized)"}}


def _device_name(dev) -> str:
    try:
        return str(dev.device_name)
    except Exception:
        return "CUDA GPU"


def build_and_run(gm: torch.fx.GraphModule, example: tuple, target: Target,
                  progress=None) -> CudaBuild:
    """The CUDA build for `target`; where TVM sees a GPU, run it against the graph's own outputs
    (computed here on the CPU) and time it."""
    say = progress or (lambda msg: None)
    args, kwargs = example
    say(f"generating CUDA code for {target.name} ({target.cuda_arch})")
    build = build_cuda(gm, args, kwargs, target.cuda_arch)
    build.target_name = target.name
    if build.executable is not None and gpu_available():
        say("running the CUDA build on this machine's GPU")
        with torch.no_grad():
            refs = gm(*args, **kwargs)
        mask = kwargs.get("attention_mask")
        mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        build.info.update(run_on_gpu(build.artifact(), args, kwargs, refs, mask))
    return build
