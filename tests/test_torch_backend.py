"""The torch backend's device and dtype options, and its 2:4 semi-structured lowering."""

from __future__ import annotations

import copy

import pytest
import torch

import optim
from backends import semi_structured
from optim.errors import BackendError


def _opt(z, pipeline="cleanup", target="cpu", **kw):
    return optim.optimize(copy.deepcopy(z.model), target, z.example_args, pipeline,
                          example_kwargs=z.example_kwargs, backend="torch",
                          measure_latency=False, **kw)


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_bfloat16_runs_a_retargeted_copy_and_answers_in_fp32(name, zoo_model):
    """llama traces fp32 casts (RoPE) that would mix dtypes unless rewritten to the run dtype."""
    z = zoo_model(name)
    before = {k: v.clone() for k, v in z.model.state_dict().items()}
    om = _opt(z, backend_options={"dtype": "bfloat16"})
    assert om.report["backend"]["dtype"] == "bfloat16"
    assert om.report["fidelity"]["outputs"]["cosine_min"] > 0.98
    assert om.report["fidelity"]["outputs"]["max_abs_error"] > 0  # it did run in bf16
    out = om(*z.example_args, **z.example_kwargs)
    leaf = out[0] if isinstance(out, tuple) else next(iter(out.values()))
    assert leaf.dtype == torch.float32 and leaf.device.type == "cpu"
    assert all(p.dtype == torch.float32 for p in om.graph.parameters())  # the graph is untouched
    for k, v in z.model.state_dict().items():  # and so is the user's model
        assert torch.equal(v, before[k])


def test_a_saved_bfloat16_artifact_loads_with_its_options(zoo_model, tmp_path):
    z = zoo_model("bert")
    om = _opt(z, backend_options={"dtype": "bfloat16"})
    om.save(tmp_path / "bf16")
    again = optim.load(tmp_path / "bf16")
    assert again.report["backend"]["dtype"] == "bfloat16" and again.artifact.dtype == "bfloat16"
    torch.testing.assert_close(again(*z.example_args, **z.example_kwargs).last_hidden_state,
                               om(*z.example_args, **z.example_kwargs).last_hidden_state)


def test_bad_device_or_dtype_is_refused_with_the_fix(zoo_model):
    z = zoo_model("bert")
    with pytest.raises(BackendError, match="dtype 'int8'"):
        _opt(z, backend_options={"dtype": "int8"})
    with pytest.raises(BackendError, match="semi_structured 'yes'"):
        _opt(z, backend_options={"semi_structured": "yes"})
    with pytest.raises(BackendError, match="cuda_graph needs device='cuda'"):
        _opt(z, backend_options={"cuda_graph": True})
    with pytest.raises(BackendError, match="must be 'cpu' or 'cuda'"):
        _opt(z, backend_options={"device": "mps"})
    if not torch.cuda.is_available():
        with pytest.raises(BackendError, match="device='cpu'"):
            _opt(z, backend_options={"device": "cuda"})


def test_is_2_4():
    w = torch.randn(8, 16)
    assert not semi_structured.is_2_4(w)
    w.view(8, 4, 4)[..., :2] = 0
    assert semi_structured.is_2_4(w)
    w[0, 0] = 1.0
    assert not semi_structured.is_2_4(w)
    assert not semi_structured.is_2_4(torch.zeros(8, 6))  # inputs not a multiple of 4


def test_convert_keeps_unconvertible_linears_dense_and_says_why(zoo_model):
    z = zoo_model("bert")
    om = _opt(z, "cleanup,prune_weights", prune_weights={"pattern": "2:4"})
    gm = copy.deepcopy(om.graph)
    from optim.ir import get_constant
    from passes.common.linears import constant_linears, weight_and_bias

    marked = [n for n in constant_linears(gm) if n.meta.get("weight_format") == "2:4"]
    assert marked
    w = get_constant(gm, weight_and_bias(marked[0])[0])
    w.data.fill_(1.0)  # a later change broke the pattern
    info = semi_structured.convert(gm)
    assert info["converted"] + len(info["kept_dense"]) == len(marked)
    assert info["kept_dense"][0]["why"].startswith("the weight is no longer 2:4")
    if not torch.cuda.is_available():  # the rest fail in the kernel library: CUDA only
        assert info["converted"] == 0 and all("CUDA" in d["why"] for d in info["kept_dense"][1:])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("mode", ["always", "auto"])
def test_2_4_linears_run_semi_structured_on_the_gpu(mode):
    from optim import zoo

    z = zoo.load("bert", batch=4, seq=64, hidden_size=128, intermediate_size=512)
    opts = {"prune_weights": {"pattern": "2:4"}}
    dense = _opt(z, "cleanup,prune_weights", "h100", **opts,
                 backend_options={"device": "cuda", "dtype": "float32"})
    sparse = _opt(z, "cleanup,prune_weights", "h100", **opts,
                  backend_options={"device": "cuda", "dtype": "float16",
                                   "semi_structured": mode})
    info = sparse.report["backend"]["semi_structured_2_4"]
    marked = sum(r["density"] == 0.5 for r in sparse.report["passes"][1]["details"]["layers"])
    assert info["converted"] + len(info["kept_dense"]) == marked > 0
    assert info["timings"]  # every decision rests on a timing on this GPU
    if mode == "always":
        assert info["converted"] == marked
    else:  # each linear left dense says what was measured
        assert all(d["why"].startswith("measured slower") for d in info["kept_dense"])
    a = sparse(*z.example_args, **z.example_kwargs).last_hidden_state
    b = dense(*z.example_args, **z.example_kwargs).last_hidden_state
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.999


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_cuda_graph_replays_the_same_function_and_refuses_other_shapes():
    from optim import zoo

    z = zoo.load("bert", batch=4, seq=64, hidden_size=128, intermediate_size=512)
    kw = {"device": "cuda", "dtype": "float16"}
    eager = _opt(z, "cleanup", "h100", backend_options=kw)
    graphed = _opt(z, "cleanup", "h100", backend_options={**kw, "cuda_graph": True})
    assert graphed.report["backend"]["cuda_graph"] is True
    other = zoo.load("bert", batch=4, seq=64, seed=1, hidden_size=128, intermediate_size=512)
    for args, kwargs in ((z.example_args, z.example_kwargs),
                         (other.example_args, other.example_kwargs)):  # new inputs, same shape
        torch.testing.assert_close(graphed(*args, **kwargs).last_hidden_state,
                                   eager(*args, **kwargs).last_hidden_state, atol=2e-3, rtol=0)
    short = zoo.load("bert", batch=4, seq=32, hidden_size=128, intermediate_size=512)
    with pytest.raises(BackendError, match="CUDA graph recorded for inputs of shape"):
        graphed(*short.example_args, **short.example_kwargs)
