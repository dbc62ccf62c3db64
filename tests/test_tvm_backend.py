"""The tvm backend: every zoo model lowered to Relax and built for this CPU matches PyTorch."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import SMALL

import optim
from backends import tvm_cuda
from optim import numerics
from optim.errors import BackendError, OptimError


@pytest.mark.parametrize("name", SMALL)
def test_zoo_models_match_pytorch_through_tvm(name, zoo_model, tmp_path, monkeypatch):
    monkeypatch.setenv("OPTIM_CACHE_DIR", str(tmp_path))  # no tuning records from other runs
    z = zoo_model(name)
    om = optim.optimize(copy.deepcopy(z.model), "cpu", z.example_args,
                        "cleanup,fuse_attention", example_kwargs=z.example_kwargs,
                        backend="tvm", measure_latency=False)
    assert om.report["fidelity"]["outputs"]["max_abs_error"] <= 1e-4
    info = om.report["backend"]
    assert info["runtime"].startswith("tvm ") and info["target"]["kind"] == "llvm"
    assert info["schedule"] == "untuned" and info["compile_seconds"] > 0


def test_int8_linear_in_tvm_matches_the_torch_kernel(zoo_model):
    z = zoo_model("bert")
    outs = {}
    for backend in ("torch", "tvm"):
        om = optim.optimize(copy.deepcopy(z.model), "cpu", z.example_args,
                            "cleanup,fuse_attention,quantize", example_kwargs=z.example_kwargs,
                            backend=backend, measure_latency=False)
        outs[backend] = om(*z.example_args, **z.example_kwargs)
    cmp = numerics.compare(outs["torch"], outs["tvm"])
    assert cmp["cosine_min"] > 0.9999  # same integers; only rounding ties may differ


def test_tvm_artifact_save_load_round_trip(zoo_model, tmp_path):
    z = zoo_model("vit")
    om = optim.optimize(copy.deepcopy(z.model), "cpu", z.example_args, "cleanup,fuse_attention",
                        backend="tvm", measure_latency=False)
    om.save(tmp_path / "saved")
    assert (tmp_path / "saved" / "model.so").exists()
    with pytest.raises(OptimError, match="compiled tvm library.*trust_compiled_code=True"):
        optim.load(tmp_path / "saved")  # loading would dlopen model.so: asked for, not assumed
    again = optim.load(tmp_path / "saved", trust_compiled_code=True)
    torch.testing.assert_close(again(*z.example_args), om(*z.example_args))
    assert again.report["backend"]["name"] == "tvm"


def test_gpu_target_gets_cuda_code_from_tvm(zoo_model, tmp_path):
    import shutil

    z = zoo_model("bert")
    om = optim.optimize(copy.deepcopy(z.model), "a100", z.example_args, "cleanup,fuse_attention",
                        example_kwargs=z.example_kwargs, backend="tvm")
    cuda = om.report["backend"]["cuda"]
    assert cuda["target"]["arch"] == "sm_80" and cuda["ran"] is tvm_cuda.gpu_available()
    assert cuda["kernels"] > 5 and "__global__" in om.cuda_source
    assert cuda["compiled"] == (shutil.which("nvcc") is not None)
    assert cuda["host"] == tvm_cuda.PORTABLE_HOST  # no -mcpu of this machine in GPU builds
    om.save(tmp_path / "a100")
    assert (tmp_path / "a100" / "kernels.cu").read_text() == om.cuda_source
    manifest = json.loads((tmp_path / "a100" / "manifest.json").read_text())
    if cuda["compiled"]:  # the library a GPU machine loads with TVM's runtime alone
        assert (tmp_path / "a100" / "cuda" / manifest["cuda"]["artifact"]).stat().st_size > 0
        assert manifest["cuda"]["target"]["kind"] == "cuda"
    else:
        assert "cuda" not in manifest


def test_saved_tvm_artifact_runs_on_tvm_runtime_alone(zoo_model, tmp_path):
    """A GPU machine loads the CUDA build with TVM's runtime only (no 260 MB compiler library):
    the same loading path, checked here on a CPU build in a process that cannot load the
    compiler."""
    z = zoo_model("bert")
    om = optim.optimize(copy.deepcopy(z.model), "cpu", z.example_args, "cleanup",
                        example_kwargs=z.example_kwargs, backend="tvm", measure_latency=False)
    om.save(tmp_path / "saved")
    torch.save((z.example_args, z.example_kwargs, om(*z.example_args, **z.example_kwargs)),
               tmp_path / "io.pt")
    script = f"""
import json, sys, torch, tvm.base, transformers.modeling_outputs  # registers output pytrees
from pathlib import Path
from torch.utils._pytree import treespec_loads
assert tvm.base._RUNTIME_ONLY and "tvm_compiler" not in tvm.base._LOADED_LIBS
from backends.tvm import TvmArtifact
d = Path({str(tmp_path / "saved")!r}); m = json.loads((d / "manifest.json").read_text())
art = TvmArtifact.load_from(d, m, treespec_loads(m["in_spec"]), treespec_loads(m["out_spec"]))
args, kwargs, want = torch.load({str(tmp_path / "io.pt")!r}, weights_only=False)
torch.testing.assert_close(art(*args, **kwargs), want)
print("ok")
"""
    env = {**os.environ, "TVM_USE_RUNTIME_LIB": "1"}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-2000:]


def test_cuda_build_without_gpu_or_compiler_says_what_is_missing():
    build = tvm_cuda.CudaBuild({"target": tvm_cuda.cuda_target("sm_90"), "compile_seconds": 0},
                               "__global__ void k() {}")
    with pytest.raises(BackendError, match="not compiled"):
        build.save_to(".")
    if not tvm_cuda.gpu_available():
        with pytest.raises(BackendError, match="no CUDA GPU"):
            tvm_cuda.load_cuda(".", {})


@pytest.mark.gpu
@pytest.mark.skipif(not tvm_cuda.gpu_available(), reason="needs an NVIDIA GPU visible to TVM")
def test_cuda_build_runs_on_this_gpu_and_matches_pytorch(zoo_model):
    z = zoo_model("bert")
    om = optim.optimize(copy.deepcopy(z.model), "h100", z.example_args, "cleanup,fuse_attention",
                        example_kwargs=z.example_kwargs, backend="tvm")
    cuda = om.report["backend"]["cuda"]
    assert cuda["ran"] and cuda["fidelity"]["max_abs_error"] < 1e-3
    gpu = [r for r in om.report["latency"] if r.get("backend") == "tvm cuda"]
    assert gpu and gpu[0]["status"] == "measured" and gpu[0]["median_ms"] > 0
