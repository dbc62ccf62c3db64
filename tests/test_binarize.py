"""binarize: packed 1-bit linears, their float model, distillation, skips and lowering."""

from __future__ import annotations

import copy

import pytest
import torch

import optim
import optim.ops  # noqa: F401
from optim.errors import BackendError
from optim.ir import get_constant
from passes.binarize import binary
from passes.binarize import qat as binary_qat
from passes.common.graph_runner import run


@pytest.mark.parametrize("m,n,k,group", [(9, 24, 100, 0), (16, 32, 384, 128), (3, 5, 64, 0)])
def test_binary_op_equals_its_float_model(m, n, k, group):
    """The packed XNOR/popcount op computes exactly what `binary.simulate` describes."""
    torch.manual_seed(k)
    w, b, x = torch.randn(n, k), torch.randn(n), torch.randn(2, m, k)
    layer, _ = binary.fit(w, b, x.reshape(-1, k), x.reshape(-1, k) @ w.T + b, group, True, 0)
    got = torch.ops.optim.linear_binary(x, layer.weight_bits, layer.weight_scale, layer.bias,
                                        layer.threshold, k)
    sign_w = binary.unpack_bits(layer.weight_bits.T, k)
    tau, alpha = layer.threshold, layer.weight_scale
    own_bias = layer.bias - tau @ (sign_w * binary.expand_groups(alpha, k)).T  # τ unfolded
    ref = binary.simulate(x.reshape(-1, k), sign_w, alpha, own_bias, tau)
    torch.testing.assert_close(got.reshape(-1, n), ref, rtol=1e-4, atol=1e-3)


def test_weight_only_op_is_a_float_gemm_on_sign_weights():
    torch.manual_seed(0)
    w, x = torch.randn(8, 70), torch.randn(5, 70)
    layer, _ = binary.fit(w, None, x, x @ w.T, 0, False, 0)
    got = torch.ops.optim.linear_binary(x, layer.weight_bits, layer.weight_scale, None, None, 70)
    ref = x @ (binary.signs(w) * w.abs().mean(1, keepdim=True)).T
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_distillation_reduces_held_out_error():
    """Output matching fits signs, scales and τ to a layer whose inputs are not centred."""
    torch.manual_seed(0)
    w = torch.randn(64, 128) * 0.05
    x = torch.randn(2048, 128) @ torch.randn(128, 128) * 0.3 + 0.5
    y = x @ w.T
    _, free = binary.fit(w, None, x, y, 0, True, 0)
    _, fitted = binary.fit(w, None, x, y, 0, True, 150, 1e-2)
    assert fitted["rel_mse_after"] < 0.9 * free["rel_mse_before"]


def test_binarize_bert_block_linears_and_skips(zoo_model):
    z = zoo_model("bert")
    om = optim.optimize(z.model, "cpu", z.example_args, example_kwargs=z.example_kwargs,
                        pipeline=["cleanup", "binarize"], binarize={"distill_steps": 10},
                        backend="torch", measure_latency=False)
    r = om.report.pass_result("binarize")
    assert r["counts"] == {"linear_binary": 12}  # 2 layers × (q, k, v, o, up, down)
    layers = r["details"]["layers"]
    assert len(layers) == 12 and all("sqnr_db" in x for x in layers)
    assert all(x["sqnr_db"] >= x["sqnr_db_training_free"] for x in layers)
    assert om.report["graph"]["after"]["optim.linear_binary"] == 12
    # packed weights: 1 bit per weight plus one fp32 scale per output channel
    node = next(n for n in om.graph.graph.nodes
                if n.target is torch.ops.optim.linear_binary.default)
    bits = get_constant(om.graph, node.args[1])
    assert bits.dtype == torch.int64 and bits.shape[0] == -(-node.args[5] // 64)


def test_binarized_graph_names_missing_lowering(zoo_model):
    z = zoo_model("bert")
    with pytest.raises(BackendError, match="optim::linear_binary"):
        optim.optimize(z.model, "cpu", z.example_args, example_kwargs=z.example_kwargs,
                       pipeline=["cleanup", "binarize"], binarize={"distill_steps": 0},
                       backend="onnxruntime", measure_latency=False)


def test_binary_kernel_is_costed_as_binary_math(zoo_model):
    from hardware.opcost import graph_kernels

    z = zoo_model("bert")
    om = optim.optimize(z.model, "cpu", z.example_args, example_kwargs=z.example_kwargs,
                        pipeline=["cleanup", "binarize"], binarize={"distill_steps": 0},
                        backend="torch", measure_latency=False)
    ks = [k for k in graph_kernels(om.graph) if k.weight_format == "binary"]
    assert len(ks) == 12 and all(k.dtype == "binary" for k in ks)
    dense = optim.optimize(z.model, "cpu", z.example_args, example_kwargs=z.example_kwargs,
                           pipeline=["cleanup"], backend="torch", measure_latency=False)
    dense_w = sum(k.bytes.get("weights", 0) for k in graph_kernels(dense.graph) if k.kind == "gemm")
    bin_w = sum(k.bytes.get("weights", 0) for k in graph_kernels(om.graph) if k.kind == "gemm")
    assert bin_w < dense_w / 4  # 1-bit block weights; embeddings' own kernels are not gemms


def test_this_cpu_has_a_measured_binary_peak():
    """The probe times the packed kernel, so estimates for this CPU credit binary math with
    what it measured, and an accelerator without a binary path gets only the bytes."""
    from hardware.capability import place
    from hardware.spec import load_spec
    from optim.targets import resolve_target

    cpu = resolve_target("cpu").spec
    p = place(cpu, "binary", weight_format="binary")
    assert p.peak_dtype == "binary" and not p.note
    assert cpu.peak["binary"].provenance == "measured"
    gpu = place(load_spec("a100"), "binary", weight_format="binary")
    assert gpu.peak_dtype != "binary" and "binary" in gpu.note


def test_fpga_binary_rate_comes_from_the_finn_r_lut_cost():
    """U280: binary math in LUTs at the FINN-R cost (6.6 LUTs per MAC lane), derived from an
    assumed LUT count, so labelled derived; the VHK158 has no LUT count and says so."""
    from hardware.capability import place
    from hardware.spec import load_spec

    u280 = load_spec("alveo-u280")
    p = place(u280, "binary", weight_format="binary")
    assert p.peak_dtype == "binary" and not p.note
    assert u280.peak["binary"].provenance == "derived"
    assert u280.peak["binary"].value == pytest.approx(1.304e6 * 0.5 / 6.6 * 2 * 225e6, rel=0.01)
    assert u280.peak["binary"].value > 5 * u280.peak["int8"].value
    vhk = place(load_spec("versal-vhk158"), "binary", weight_format="binary")
    assert vhk.peak_dtype != "binary" and "no sourced binary" in vhk.note


def test_binarized_model_saves_and_loads(zoo_model, tmp_path):
    z = zoo_model("bert")
    om = optim.optimize(z.model, "cpu", z.example_args, example_kwargs=z.example_kwargs,
                        pipeline=["cleanup", "binarize"], binarize={"distill_steps": 0},
                        backend="torch", measure_latency=False)
    om.save(tmp_path / "m")
    again = optim.load(tmp_path / "m")
    a = om(*z.example_args, **z.example_kwargs).last_hidden_state
    b = again(*z.example_args, **z.example_kwargs).last_hidden_state
    torch.testing.assert_close(b, a)


def _image_batches(z, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    (x,) = z.example_args
    return [((torch.randn(x.shape, generator=g),), {}) for _ in range(n)]


def _binarize_vit(z, batches, **opts):
    return optim.optimize(copy.deepcopy(z.model), "cpu", z.example_args,
                          ["cleanup", {"binarize": {"distill_steps": 20, **opts}}],
                          calibration=batches, backend="torch", measure_latency=False)


def test_training_copy_computes_what_the_packed_graph_computes(zoo_model):
    """Before any step, the float simulation (unfolded bias, latent signs) is the kernel graph."""
    z = zoo_model("vit")
    batches = _image_batches(z, 4)
    om = _binarize_vit(z, batches)
    gm = om.graph
    teacher = {id(b): [t + 0.1 for t in run(gm, b)] for b in batches}
    mags = {n.name: torch.rand(get_constant(gm, n.args[2]).shape[0], n.args[5])
            for n in gm.graph.nodes if n.target is torch.ops.optim.linear_binary.default}
    res = binary_qat.distill(gm, mags, batches[:3], batches[3:], teacher, steps=0, lr=1e-3)
    assert res["linears_trained"] == len(mags) > 0
    assert res["relative_error_after"] == pytest.approx(res["relative_error_before"], rel=1e-3)


def test_end_to_end_training_lowers_the_held_out_output_error(zoo_model):
    z = zoo_model("vit")
    batches = _image_batches(z, 4)
    om = _binarize_vit(z, batches, qat_steps=60, qat_lr=1e-2)
    qat = om.report.pass_result("binarize")["details"]["qat"]
    assert qat["kept"] and qat["held_out_batches"] == 1 and qat["train_batches"] == 3
    assert qat["relative_error_after"] < 0.8 * qat["relative_error_before"]
    # the packed graph itself now has that error on the held-out batch
    held = batches[3]
    want = run(_float_graph(z), held)
    got = run(om.graph, held)
    err = sum(float((g - w).pow(2).sum()) for g, w in zip(got, want)) / \
        sum(float(w.pow(2).sum()) for w in want)
    assert err == pytest.approx(qat["relative_error_after"], rel=0.05)


def test_training_that_does_not_help_leaves_the_graph_as_it_was(zoo_model):
    """Held-out targets the graph already meets exactly: no training can lower that error, so
    the packed constants must stay as they were, bit for bit."""
    z = zoo_model("vit")
    batches = _image_batches(z, 4)
    gm = _binarize_vit(z, batches).graph
    teacher = {id(b): [-t for t in run(gm, b)] for b in batches[:3]}
    teacher[id(batches[3])] = run(gm, batches[3])
    ops = [n for n in gm.graph.nodes if n.target is torch.ops.optim.linear_binary.default]
    before = {n.name: [get_constant(gm, a).clone() for a in n.args[1:5] if a is not None]
              for n in ops}
    mags = {n.name: torch.rand(get_constant(gm, n.args[2]).shape[0], n.args[5]) for n in ops}
    res = binary_qat.distill(gm, mags, batches[:3], batches[3:], teacher, steps=5, lr=1e-2)
    assert res["relative_error_before"] == 0.0 and not res["kept"]
    for n in ops:
        for old, a in zip(before[n.name], [a for a in n.args[1:5] if a is not None]):
            assert torch.equal(old, get_constant(gm, a))


def _float_graph(z):
    return optim.optimize(copy.deepcopy(z.model), "cpu", z.example_args, ["cleanup"],
                          backend="torch", measure_latency=False).graph
