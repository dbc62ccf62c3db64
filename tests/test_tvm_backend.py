"""The tvm backend: every zoo model lowered to Relax and built for this CPU matches PyTorch."""

from __future__ import annotations

import copy

import pytest
import torch

import optim
from optim import numerics

from conftest import SMALL


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
    again = optim.load(tmp_path / "saved")
    torch.testing.assert_close(again(*z.example_args), om(*z.example_args))
    assert again.report["backend"]["name"] == "tvm"


def test_gpu_target_gets_cuda_code_from_tvm(zoo_model, tmp_path):
    import shutil

    z = zoo_model("bert")
    om = optim.optimize(copy.deepcopy(z.model), "a100", z.example_args, "cleanup,fuse_attention",
                        example_kwargs=z.example_kwargs, backend="tvm")
    cuda = om.report["backend"]["cuda"]
    assert cuda["target"]["arch"] == "sm_80" and cuda["ran"] is False
    assert cuda["kernels"] > 5 and "__global__" in om.cuda_source
    assert cuda["compiled"] == (shutil.which("nvcc") is not None)
    om.save(tmp_path / "a100")
    assert (tmp_path / "a100" / "kernels.cu").read_text() == om.cuda_source
