import pytest
import torch

import optim
from backends.onnx_lowering import OPSET  # noqa: F401  (backend package imports cleanly)
from optim.numerics import sqnr_db


def _reference_int8(x, w, b):
    """Per-token symmetric int8 activations × per-channel int8 weights, computed in int64."""
    ws = w.abs().amax(1) / 63  # 7-bit weights: no int16 saturation in u8×s8 kernels
    wq = torch.round(w / ws[:, None]).clamp(-63, 63).to(torch.int64)
    xs = x.abs().amax(-1, keepdim=True).clamp(min=1e-8) / 127
    xq = torch.round(x / xs).to(torch.int64)
    return (xq @ wq.T).double() * xs.double() * ws.double() + b.double(), wq.to(torch.int8), ws


@pytest.mark.parametrize("m, k, n", [(1, 16, 8), (7, 33, 5), (64, 384, 96)])
def test_int8_kernel_matches_integer_reference(m, k, n):
    torch.manual_seed(0)
    x, w, b = torch.randn(m, k), torch.randn(n, k) * 0.1, torch.randn(n)
    ref, wq, ws = _reference_int8(x, w, b)
    got = torch.ops.optim.linear_int8(x, wq, ws, b)
    # oneDNN's u8s8 path may round differently in the last bit of the int32 -> float scaling
    assert sqnr_db(ref.float(), got) > 60
    assert sqnr_db(torch.nn.functional.linear(x, w, b), got) > 25


def test_quantize_gpt2_skips_lm_head_with_reason(zoo_model):
    z = zoo_model("gpt2")
    om = optim.optimize(z.model, "cpu", z.example_args, example_kwargs=z.example_kwargs,
                        pipeline=["cleanup", "quantize"], backend="torch", measure_latency=False)
    r = om.report.pass_result("quantize")
    assert r["counts"] == {"linear_quantized": 8}  # 4 per block (c_attn, c_proj, c_fc, c_proj)
    assert any(s["where"] == "lm_head" and "skip pattern" in s["reason"] for s in r["skipped"])
    layers = r["details"]["layers"]
    assert len(layers) == 8 and all(x["sqnr_db"] > 20 for x in layers)
    assert om.report["graph"]["after"]["optim.linear_int8"] == 8
    assert om.report["model"]["weight_bytes_after"] < om.report["model"]["weight_bytes"]


def test_min_sqnr_keeps_layers_float(zoo_model):
    z = zoo_model("bert")
    with pytest.raises(optim.PassError, match="calibrated SQNR"):
        optim.optimize(z.model, "cpu", z.example_args, example_kwargs=z.example_kwargs,
                       pipeline=["cleanup", "quantize"], quantize={"min_sqnr_db": 200.0},
                       backend="torch", measure_latency=False)
    om = optim.optimize(z.model, "cpu", z.example_args, example_kwargs=z.example_kwargs,
                        pipeline=["cleanup", "quantize"], quantize={"min_sqnr_db": 31.0},
                        backend="torch", measure_latency=False)
    r = om.report.pass_result("quantize")
    kept = [x for x in r["details"]["layers"] if x.get("kept_float")]
    assert all(x["sqnr_db"] < 31.0 for x in kept)
    assert r["counts"].get("linear_quantized", 0) + len(kept) == 12


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_ort_int8_matches_torch_int8(name, zoo_model):
    z = zoo_model(name)
    outs = {}
    for backend in ("torch", "onnxruntime"):
        om = optim.optimize(z.model, "cpu", z.example_args, example_kwargs=z.example_kwargs,
                            pipeline="cpu_default", backend=backend, measure_latency=False)
        outs[backend] = om(*z.example_args, **z.example_kwargs)
        if backend == "onnxruntime":
            ops = om.report["backend"]["ops"]
            assert ops["com.microsoft.MatMulIntegerToFloat"] == \
                om.report.pass_result("quantize")["counts"]["linear_quantized"]
    a, b = (optim.numerics.tensor_leaves(outs[k])[0] for k in ("torch", "onnxruntime"))
    assert sqnr_db(a, b) > 35  # both run int8 GEMMs; rounding differs only at .5 ties
