import pytest
import torch

import optim
from backends.onnx_lowering import OPSET  # noqa: F401  (backend package imports cleanly)
from optim.ir import get_constant
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
    # 4 per block (c_attn, c_proj, c_fc, c_proj), each reading its own input tensor; the
    # smoothing of c_attn and c_fc folds into ln_1 / ln_2 (pre-norm), the other two are applied
    # by the quantization kernel
    assert r["counts"] == {"linear_quantized": 8, "input_smoothed": 4,
                           "smoothing_folded_into_norm": 4}
    assert any(s["where"] == "lm_head" and "skip pattern" in s["reason"] for s in r["skipped"])
    layers = r["details"]["layers"]
    assert len(layers) == 8 and all(x["sqnr_db"] > 20 for x in layers)
    assert om.report["graph"]["after"]["optim.linear_int8"] == 8
    assert om.report["model"]["weight_bytes_after"] < om.report["model"]["weight_bytes"]


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
    # one shared input, folded into the norm that only these two linears read
    assert results[0.5]["counts"] == {"linear_quantized": 2, "smoothing_folded_into_norm": 1}
    assert "smoothing_folded_into_norm" not in results[0.0]["counts"]
    assert results[0.5]["details"]["sqnr_db_min"] > results[0.0]["details"]["sqnr_db_min"] + 3


class _PostNorm(_OutlierMLP):
    """The norm output also feeds a residual (post-norm BERT): folding s into γ, β would
    change it."""

    def forward(self, x):
        h = self.norm(x)
        return self.a(h) + h, self.b(h)


def test_smoothing_is_not_folded_into_a_norm_the_residual_reads():
    torch.manual_seed(0)
    m, x = _PostNorm().eval(), torch.randn(4, 32, 64)
    om = optim.optimize(m, "cpu", (x,), pipeline=["cleanup", "quantize"], backend="torch",
                        measure_latency=False)
    assert om.report.pass_result("quantize")["counts"] == {"linear_quantized": 2,
                                                           "input_smoothed": 1}
    ref, got = m(x), om(x)
    assert sqnr_db(ref[0], got[0]) > 15 and sqnr_db(ref[1], got[1]) > 15


def test_folding_into_the_norm_is_exact():
    """Folded (x / s inside γ, β) and unfolded (x / s in the kernel) int8 models agree."""
    torch.manual_seed(0)
    m, x = _OutlierMLP().eval(), torch.randn(4, 32, 64)
    om = optim.optimize(m, "cpu", (x,), pipeline=["cleanup", "quantize"], backend="torch",
                        measure_latency=False)
    gm = om.graph
    norm_w = [n for n in gm.graph.nodes if n.op == "get_attr" and "norm_smoothed" in n.target]
    assert len(norm_w) == 2  # γ/s and β/s, new constants
    assert torch.equal(m.norm.weight[7], torch.tensor(40.0))  # the user's norm is untouched
    lin = [n for n in gm.graph.nodes if n.target is torch.ops.optim.linear_int8.default]
    s_inv = get_constant(gm, norm_w[0]) / m.norm.weight.detach()
    h = m.norm(x).reshape(-1, 64)
    for n in lin:
        w_q, w_s, b = (get_constant(gm, a) for a in n.args[1:4])
        folded = torch.ops.optim.linear_int8(h * s_inv, w_q, w_s, b)
        in_kernel = torch.ops.optim.linear_int8(h, w_q, w_s, b, s_inv)
        assert sqnr_db(folded, in_kernel) > 60


@pytest.mark.parametrize("m, k", [(1, 16), (7, 33), (64, 40), (130, 384), (3, 1536)])
def test_fused_quantization_kernel_matches_eager(m, k):
    from optim.kernels import quantize_rows

    torch.manual_seed(0)
    x, mult = torch.randn(m, k) * 3, torch.rand(k) + 0.5
    q, s = quantize_rows(x, mult)
    xs = x * mult
    s_ref = xs.abs().amax(-1, keepdim=True).clamp(min=1e-8) / 127
    q_ref = torch.floor(xs / s_ref + 128.5).clamp(1, 255)
    torch.testing.assert_close(s, s_ref)
    assert q.dtype == torch.uint8 and (q.float() - q_ref).abs().max() <= 1  # fp32 op order
    assert (q.float() != q_ref).float().mean() < 1e-3


@pytest.mark.parametrize("method", ["minmax", "percentile"])
def test_static_int8_uses_one_calibrated_scale_on_both_backends(method, zoo_model):
    z = zoo_model("bert")
    outs = {}
    for backend in ("torch", "onnxruntime"):
        om = optim.optimize(z.model, "cpu", z.example_args, example_kwargs=z.example_kwargs,
                            pipeline=["cleanup", "fuse_attention", "quantize"], backend=backend,
                            quantize={"activations": "static", "calibration_method": method},
                            calibration=[(z.example_args, z.example_kwargs)],
                            measure_latency=False)
        outs[backend] = optim.numerics.tensor_leaves(om(*z.example_args, **z.example_kwargs))[0]
        scales = [n for n in om.graph.graph.nodes if n.op == "get_attr" and "act_scale" in n.target]
        assert len(scales) == 12 and all(get_constant(om.graph, n).dim() == 0 for n in scales)
        layers = om.report.pass_result("quantize")["details"]["layers"]
        assert all(x["sqnr_db"] > 15 for x in layers)
    ref = optim.numerics.tensor_leaves(z.model(*z.example_args, **z.example_kwargs))[0]
    assert sqnr_db(ref, outs["torch"]) > 15
    assert sqnr_db(outs["torch"], outs["onnxruntime"]) > 35


def test_static_scale_clips_outliers_with_percentile():
    from passes.quantize import QuantizeConfig, _static_scale

    x = torch.randn(10000, 8)
    x[0, 0] = 1000.0  # one outlier
    mm = _static_scale(x, QuantizeConfig(calibration_method="minmax"))
    pc = _static_scale(x, QuantizeConfig(calibration_method="percentile", percentile=99.9))
    assert mm == pytest.approx(1000.0 / 127) and pc < 5.0 / 127
