import pytest

import optim
from tests.conftest import SMALL


@pytest.mark.parametrize("name", SMALL + ["minilm"])
def test_every_attention_fused_torch(name, zoo_model):
    z = zoo_model(name)
    om = optim.optimize(z.model, "cpu", z.example_args, example_kwargs=z.example_kwargs,
                        pipeline="cpu_fp32", backend="torch", measure_latency=False)
    r = om.report
    assert r.pass_result("fuse_attention")["counts"]["attention_fused"] == z.num_attention_layers
    after = r["graph"]["after"]
    assert after["optim.attention"] == z.num_attention_layers
    assert "aten.softmax" not in after and "aten.scaled_dot_product_attention" not in after
    assert r["fidelity"]["outputs"]["max_abs_error"] <= 1e-4
    info = r.pass_result("fuse_attention")["details"]["attentions"][0]
    assert info["heads"] > 0 and info["head_dim"] > 0


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_fused_attention_reaches_ort(name, zoo_model):
    z = zoo_model(name)
    om = optim.optimize(z.model, "cpu", z.example_args, example_kwargs=z.example_kwargs,
                        pipeline="cpu_fp32", backend="onnxruntime", measure_latency=False)
    ops = om.report["backend"]["ops"]
    assert ops.get("Attention") == z.num_attention_layers  # fused nodes in ORT's final graph
    assert "Softmax" not in ops
    assert om.report["fidelity"]["outputs"]["max_abs_error"] <= 1e-4
