"""quantize_int4: packing, GPTQ vs round-to-nearest, ONNX Runtime's MatMulNBits lowering."""

from __future__ import annotations

import copy

import pytest
import torch

import optim
from optim import numerics
from optim.ops import linear_int4, pack_int4, unpack_int4
from passes.quantize_int4 import gptq, rtn


def _q4(z, opts=None, backend="torch", backend_options=None):
    return optim.optimize(copy.deepcopy(z.model), "cpu", z.example_args,
                          ["cleanup", {"quantize_int4": {"group_size": 32, **(opts or {})}}],
                          example_kwargs=z.example_kwargs, backend=backend,
                          backend_options=backend_options, measure_latency=False)


def test_packing_round_trips_and_matches_matmulnbits_layout():
    codes = torch.randint(0, 16, (6, 64), dtype=torch.uint8)
    scales = torch.rand(6, 2) + 0.5
    packed = pack_int4(codes, 32)
    assert packed.shape == (6, 2, 16) and packed.dtype == torch.uint8
    assert int(packed[0, 0, 0]) == int(codes[0, 0]) | int(codes[0, 1]) << 4  # low nibble first
    w = unpack_int4(packed, scales)
    torch.testing.assert_close(w, (codes.float() - 8) * scales.repeat_interleave(32, 1))
    x = torch.randn(3, 64)
    torch.testing.assert_close(linear_int4(x, packed, scales, None, 32), x @ w.T)


def test_gptq_beats_round_to_nearest_on_correlated_inputs():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(128, 256, generator=g)
    x = torch.randn(1024, 256, generator=g) @ torch.randn(256, 256, generator=g) * 0.1
    err = {}
    for name, (codes, scales) in (("rtn", rtn(w, 64)), ("gptq", gptq(w, x, 64, 0.01))):
        w_hat = unpack_int4(pack_int4(codes, 64), scales)
        err[name] = float((x @ (w_hat - w).T).pow(2).sum() / (x @ w.T).pow(2).sum())
    assert err["gptq"] < 0.7 * err["rtn"]
    assert err["rtn"] < 0.05  # 4-bit with 64-wide groups is already close


@pytest.mark.parametrize("name", ["bert", "llama", "gpt2"])
def test_onnxruntime_runs_matmulnbits_and_matches_torch(name, zoo_model):
    z = zoo_model(name)
    ref = _q4(z)
    exact = _q4(z, backend="onnxruntime", backend_options={"int4_accuracy_level": 0})
    n = ref.report.pass_result("quantize_int4")["counts"]["linear_int4"]
    assert exact.report["backend"]["ops"]["com.microsoft.MatMulNBits"] == n
    a = ref(*z.example_args, **z.example_kwargs)
    b = exact(*z.example_args, **z.example_kwargs)
    torch.testing.assert_close(b[0], a[0], rtol=1e-3, atol=1e-3)  # fp32 compute: the same
    fast = _q4(z, backend="onnxruntime")  # default: int8 activations per block, int8 kernel
    c = fast(*z.example_args, **z.example_kwargs)
    assert numerics.compare(a[0], c[0])["cosine_min"] > 0.999
