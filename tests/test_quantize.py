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
    # 4 per block (c_attn, c_proj, c_fc, c_proj), each reading its own input tensor
    assert r["counts"] == {"linear_quantized": 8, "input_smoothed": 8}
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


class _OutlierMLP(torch.nn.Module):
    """LayerNorm whose output has one outlier channel (as in BERT), then two linears reading it."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(64)
        with torch.no_grad():
            self.norm.weight[7] = 40.0
        self.a, self.b = torch.nn.Linear(64, 64), torch.nn.Linear(64, 32)

    def forward(self, x):
        h = self.norm(x)
        return self.a(h), self.b(h)


def test_smoothing_recovers_outlier_channels():
    torch.manual_seed(0)
    m, x = _OutlierMLP().eval(), torch.randn(4, 32, 64)
    results = {}
    for alpha in (0.0, 0.5):
        om = optim.optimize(m, "cpu", (x,), pipeline=["cleanup", "quantize"], backend="torch",
                            quantize={"smooth_alpha": alpha}, measure_latency=False)
        results[alpha] = om.report.pass_result("quantize")
        ref, got = m(x), om(x)
        assert sqnr_db(ref[0], got[0]) > 15
    assert results[0.5]["counts"] == {"linear_quantized": 2, "input_smoothed": 1}  # shared input
    assert "input_smoothed" not in results[0.0]["counts"]
    assert results[0.5]["details"]["sqnr_db_min"] > results[0.0]["details"]["sqnr_db_min"] + 3
