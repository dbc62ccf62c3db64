"""int8 GEMM kernels vs fp32 at MiniLM's linear shapes (M = 8 × 128 tokens).

Run: .venv/bin/python -m pytest benchmarks/test_int8_kernels.py --benchmark-group-by=param:shape
Compare the `fp32` and `int8` rows of one group, taken in the same run. On a Zen 1 host (cpu
family 23) the two were equal: its AVX2 units are 128 bits wide, so vpmaddubsw gains nothing
over FMA; on Zen 3 / Intel with VNNI the int8 rows should be faster.
"""

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import optim.ops  # noqa: F401

SHAPES = {"qkv 1024x384x384": (1024, 384, 384), "ffn-in 1024x384x1536": (1024, 384, 1536),
          "ffn-out 1024x1536x384": (1024, 1536, 384)}


def _ort(nodes, inputs, output, inits):
    model = helper.make_model(
        helper.make_graph(nodes, "g", inputs, [output], inits), ir_version=10,
        opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


@pytest.fixture(params=list(SHAPES), scope="module")
def shape(request):
    return request.param


@pytest.mark.parametrize("kind", ["fp32", "int8"])
def test_torch_linear(benchmark, shape, kind):
    torch.set_num_threads(2)
    m, k, n = SHAPES[shape]
    x, w, b = torch.randn(m, k), torch.randn(n, k) * 0.05, torch.randn(n)
    if kind == "fp32":
        benchmark(torch.nn.functional.linear, x, w, b)
    else:
        ws = w.abs().amax(1) / 63
        wq = torch.round(w / ws[:, None]).to(torch.int8)
        benchmark(torch.ops.optim.linear_int8, x, wq, ws, b)


@pytest.mark.parametrize("kind", ["fp32", "int8"])
def test_ort_gemm(benchmark, shape, kind):
    m, k, n = SHAPES[shape]
    rng = np.random.default_rng(0)
    vi = helper.make_tensor_value_info
    if kind == "fp32":
        s = _ort([helper.make_node("MatMul", ["x", "W"], ["y"])],
                 [vi("x", TensorProto.FLOAT, [m, k])],
                 vi("y", TensorProto.FLOAT, [m, n]),
                 [numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32), "W")])
        feeds = {"x": rng.standard_normal((m, k), dtype=np.float32)}
    else:
        inits = [numpy_helper.from_array(rng.integers(-63, 63, (k, n)).astype(np.int8), "W"),
                 numpy_helper.from_array(np.array(1.0, np.float32), "a"),
                 numpy_helper.from_array(np.full(n, 0.01, np.float32), "b"),
                 numpy_helper.from_array(np.array(128, np.uint8), "z")]
        s = _ort([helper.make_node("MatMulIntegerToFloat", ["q", "W", "a", "b", "z"], ["y"],
                                   domain="com.microsoft")],
                 [vi("q", TensorProto.UINT8, [m, k])], vi("y", TensorProto.FLOAT, [m, n]), inits)
        feeds = {"q": rng.integers(0, 255, (m, k)).astype(np.uint8)}
    benchmark(s.run, None, feeds)
