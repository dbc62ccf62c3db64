"""The cost model: kernels from real captured graphs, capability rules, LLM phases, calibration."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from hardware.calibrate import fit, score
from hardware.capability import pass_advice, place
from hardware.costmodel import default_calibration, estimate_kernels
from hardware.estimate import estimate
from hardware.llm_shape import LLMShape, llm_shape
from hardware.opcost import graph_kernels
from hardware.parallel import allreduce_s, shard_tp
from hardware.spec import load_spec
from optim import zoo
from optim.errors import ConfigError
from optim.ir import capture
from optim.llm import decoder_kernels, estimate_llm
from optim.pass_base import PassContext
from optim.pipeline import Pipeline
from optim.targets import resolve_target


def _graph(name, passes=(), **load):
    z = zoo.load(name, **load)
    cap = capture(z.model, z.example_args, z.example_kwargs)
    if passes:
        Pipeline.build(list(passes)).run(cap.gm, PassContext(
            target=None, example_inputs=(z.example_args, z.example_kwargs),
            calibration=[(z.example_args, z.example_kwargs)]))
    return z, cap.gm


@pytest.mark.parametrize("name", ["bert", "llama", "vit"])
def test_kernel_flops_match_torch_flop_counter(name):
    z, gm = _graph(name, ["cleanup", "fuse_attention"], seq=32)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        z.model(*z.example_args, **z.example_kwargs)
    ks = graph_kernels(gm)
    matmul = sum(k.flops for k in ks if k.kind == "gemm")
    attn = sum(4.0 * k.shape[0] * k.shape[1] * k.shape[2] * k.shape[3] * k.shape[4]
               for k in ks if k.kind == "attention")
    assert sum(k.kind == "attention" for k in ks) == z.num_attention_layers
    # torch's counter sees eager attention's bmm but not the CPU SDPA kernel
    counted = {str(op) for op in fc.get_flop_counts()["Global"]}
    expected_attention = attn if "aten.bmm" in counted else 0.0
    assert matmul + expected_attention == pytest.approx(fc.get_total_flops(), rel=0.02)


def test_pointwise_runs_fuse_within_a_layer_not_across():
    _, gm = _graph("bert", ["cleanup", "fuse_attention"], seq=16)
    fused = [k for k in graph_kernels(gm) if k.kind == "fused"]
    for k in fused:
        assert sum("layer_norm" in n for n in k.nodes) <= 2, k.nodes  # residual add+LN, not a chain
    assert len(fused) >= 2 * 2 + 1  # per layer: attention residual+LN, MLP act, MLP residual+LN


def test_fused_attention_costs_less_than_the_decomposed_chain():
    _, unfused = _graph("bert", ["cleanup"], seq=256, hidden_size=256, num_attention_heads=4)
    _, fused = _graph("bert", ["cleanup", "fuse_attention"], seq=256, hidden_size=256,
                      num_attention_heads=4)
    a100 = resolve_target("a100")
    a, b = (estimate(g, a100.spec, a100.calibration) for g in (unfused, fused))
    assert b.seconds < a.seconds
    assert b.bytes_by_class()["activations"] < a.bytes_by_class()["activations"]


def test_capability_matrix_never_credits_what_a_target_lacks():
    h100, a100, t4, v100 = (load_spec(n) for n in ("h100", "a100", "t4", "v100"))
    assert place(h100, "int8").peak_dtype == "int8"
    p = place(h100, "int4")
    assert p.peak_dtype != "int4" and "no int4" in p.note
    assert place(a100, "int4").peak_dtype == "int4"
    assert place(a100, "fp16", weight_format="2:4").sparse_factor == 2.0
    p = place(t4, "fp16", weight_format="2:4")
    assert p.sparse_factor == 1.0 and "2:4" in p.note
    assert "binary" in place(a100, "fp16", weight_format="binary").note
    assert any("int8" in a for a in pass_advice(v100, ["quantize"]))
    assert any("VNNI" in a for a in pass_advice(resolve_target("cpu").spec, ["quantize"])) or \
        {"avx512_vnni", "avx_vnni", "amx_int8"} & resolve_target("cpu").spec.features
    assert pass_advice(a100, ["cleanup", "fuse_attention"]) == []


def test_estimate_is_physical():
    _, gm = _graph("bert", ["cleanup", "fuse_attention"], seq=64)
    a100 = resolve_target("a100")
    est = estimate(gm, a100.spec, a100.calibration)
    assert est.roofline_s <= est.seconds
    for e in est.kernels:
        assert e.seconds >= max(e.compute_s, e.memory_s)
        assert e.seconds == pytest.approx(max(e.compute_s, e.memory_s) + e.overhead_s)
    # more bytes never makes a kernel faster
    k = next(e.kernel for e in est.kernels if e.kernel.kind == "fused")
    big = dataclasses.replace(k, bytes={c: b * 10 for c, b in k.bytes.items()})
    spec = a100.spec
    cal = default_calibration(spec)
    assert estimate_kernels([big], spec, cal).seconds > estimate_kernels([k], spec, cal).seconds


def test_llm_layer_replication_equals_a_full_capture():
    small = LLMShape("tiny", 4, 256, 4, 2, 512, 1000)
    replicated = decoder_kernels(small, batch=1, seq=8)
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
                      use_cache=False, attn_implementation="sdpa")
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg).to(torch.float16).eval()
    ids = torch.zeros(1, 8, dtype=torch.long, device="meta")
    cap = capture(model, (ids,), {"logits_to_keep": 1})
    Pipeline.build(["cleanup", "fuse_attention"]).run(cap.gm, PassContext(
        target=None, example_inputs=((ids,), {"logits_to_keep": 1}), calibration=[]))
    full = graph_kernels(cap.gm)
    assert len(replicated) == len(full)
    assert sum(k.flops for k in replicated) == pytest.approx(sum(k.flops for k in full))
    assert sum(k.total_bytes for k in replicated) == pytest.approx(
        sum(k.total_bytes for k in full))


def test_llama2_7b_decode_on_a100_is_memory_bound_and_below_the_bandwidth_ceiling():
    r = estimate_llm("llama2-7b", "a100", batch=1, prompt_len=512, context_len=1024)
    a100 = load_spec("a100")
    ceiling = a100.mem_bandwidth.value / r["memory"]["weights_bytes"]  # tokens/s at 100% BW
    assert r["decode"]["bound"] in ("memory", "overhead")
    assert 0.3 * ceiling < r["decode"]["tokens_per_s"] < ceiling
    assert r["prefill"]["ttft_s"] > r["decode"]["seconds"]
    int8 = estimate_llm("llama2-7b", "a100", batch=1, prompt_len=512, weights="int8")
    assert int8["decode"]["tokens_per_s"] > r["decode"]["tokens_per_s"]
    h100_int4 = estimate_llm("llama2-7b", "h100", prompt_len=128, weights="int4")
    assert h100_int4["decode"]["seconds"] > 0
    longer = estimate_llm("llama2-7b", "a100", batch=8, prompt_len=512, context_len=4096)
    assert longer["decode"]["bytes_by_class"]["kv_cache"] > r["decode"]["bytes_by_class"][
        "kv_cache"]


def test_llama2_70b_needs_tensor_parallelism_on_a100():
    one = estimate_llm("llama2-70b", "a100", prompt_len=128)
    assert not one["memory"]["fits"]
    eight = estimate_llm("llama2-70b", "a100", prompt_len=128, tp=8)
    assert eight["memory"]["fits"] and eight["decode"]["tp_comm_s"] > 0
    assert eight["decode"]["compute_s"] < one["decode"]["compute_s"]
    with pytest.raises(ConfigError, match="exceeds"):
        estimate_llm("llama2-70b", "a100", prompt_len=128, tp=16)
    with pytest.raises(ConfigError, match="weights"):
        estimate_llm("llama2-7b", "a100", weights="int3")


def test_tensor_parallel_sharding_and_allreduce():
    ks = decoder_kernels(llm_shape("llama2-7b"), batch=1, seq=1, context_len=128)
    w1 = sum(k.bytes.get("weights", 0) for k in ks if k.kind == "gemm")
    w4 = sum(k.bytes.get("weights", 0) for k in shard_tp(ks, 4) if k.kind == "gemm")
    assert w4 == pytest.approx(w1 / 4)
    a100 = load_spec("a100")
    ic = a100.interconnect
    assert allreduce_s(a100, 1e6, 1) == 0
    assert allreduce_s(a100, 1e6, 4) == pytest.approx(1.5 * 1e6 / ic.bandwidth.value
                                                      + 6 * ic.latency.value)


def test_calibration_fit_recovers_known_parameters():
    spec = load_spec("a100")
    graphs = []
    for seq in (16, 64, 128):
        for name in ("bert", "llama"):
            graphs.append(graph_kernels(_graph(name, ["cleanup", "fuse_attention"], seq=seq)[1]))
    truth = dataclasses.replace(default_calibration(spec), gemm_eff={"*": 0.4, "int8": 0.4},
                                launch_s=30e-6, mem_eff=0.5)
    measured = [estimate_kernels(g, spec, truth).seconds for g in graphs]
    cal = fit(spec, graphs, measured, source="synthetic")
    pred = [estimate_kernels(g, spec, cal).seconds for g in graphs]
    assert score(pred, measured)["mape"] < 0.02
    assert cal.launch_s == pytest.approx(30e-6, rel=0.2)


def test_unknown_target_and_bad_spec_errors(tmp_path):
    from optim.errors import UnknownNameError

    with pytest.raises(UnknownNameError, match="Did you mean 'h100'"):
        load_spec("h10O")
    bad = tmp_path / "bad.yaml"
    bad.write_text("schema: optim.target/1\nname: x\nkind: gpu\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_spec(bad)


def test_sparsity_is_credited_only_where_the_target_has_it():
    from hardware.opcost import Kernel

    dense = Kernel("fc", "gemm", "fp16", 2.0 * 4096 * 4096 * 4096,
                   {"weights": 4096 * 4096 * 2.0, "activations": 2 * 4096 * 4096 * 2.0},
                   (1, 4096, 4096, 4096))
    two_four = dataclasses.replace(dense, weight_format="2:4", density=0.5)
    a100, t4 = load_spec("a100"), load_spec("t4")
    speedup = {s.name: estimate_kernels([dense], s).seconds / estimate_kernels([two_four], s)
               .seconds for s in (a100, t4)}
    assert speedup["a100"] > 1.5  # compute-bound GEMM on sparse tensor cores
    assert speedup["t4"] == pytest.approx(1.0, abs=0.05)  # no sparse math: only bytes
    half = dataclasses.replace(dense, weight_format="unstructured", density=0.5)
    assert estimate_kernels([half], a100).seconds == pytest.approx(
        estimate_kernels([dense], a100).seconds)
    assert "above" in estimate_kernels([half], a100).notes()[0]
    very = dataclasses.replace(dense, weight_format="unstructured", density=0.02)
    assert estimate_kernels([very], a100).seconds < estimate_kernels([dense], a100).seconds
    # where the spec has a measured 2:4 GEMM speedup, that is what is credited, and said
    h200 = load_spec("h200")
    assert h200.sparse_2_4_speedup.provenance == "measured"
    assert place(h200, "fp16", weight_format="2:4").sparse_factor == pytest.approx(1.36)
    assert "measured" in place(h200, "fp16", weight_format="2:4").note
    assert place(a100, "fp16", weight_format="2:4").sparse_factor == 2.0


def test_a_16_bit_deployment_moves_half_the_bytes_of_an_fp32_graph():
    from hardware.opcost import Kernel

    copy = Kernel("add", "fused", "fp32", 0.0, {"activations": 3 * 4.0 * 2**24}, (2**24,))
    spec, cal = load_spec("h100"), default_calibration(load_spec("h100"))
    fp16 = estimate_kernels([copy], spec, cal, "fp16").kernels[0].memory_s
    fp32 = estimate_kernels([copy], spec, cal, "fp32").kernels[0].memory_s
    assert fp16 == pytest.approx(fp32 / 2, rel=0.05)  # the transfer-size fall-off moves it slightly


def test_fit_runs_each_graph_at_its_precision_and_h200_ships_a_fit():
    from hardware.calibrate import SHIPPED
    from optim.targets import calibration_for

    spec = load_spec("h200")
    g = graph_kernels(_graph("bert", ["cleanup"], seq=64)[1])
    truth = dataclasses.replace(default_calibration(spec), launch_s=20e-6)
    measured = [estimate_kernels(g, spec, truth, p).seconds for p in ("fp16", "fp32")]
    cal = fit(spec, [g, g], measured, "synthetic", precisions=["fp16", "fp32"])
    pred = [estimate_kernels(g, spec, cal, p).seconds for p in ("fp16", "fp32")]
    assert score(pred, measured)["mape"] < 0.05
    shipped = calibration_for(spec, backend="no-local-fit-for-this")
    assert (SHIPPED / "h200.json").exists() and shipped.fit and "H200" in shipped.source


def test_llm_estimates_on_fpga_targets_use_the_instruction_model():
    r = estimate_llm("llama2-7b", "alveo-u280", prompt_len=128, context_len=512, weights="int4")
    assert "instruction-level" in r["by"]
    assert 30 < r["decode"]["tokens_per_s"] < 90  # FlightLLM measured 55 tok/s (sparser q/k)
    with pytest.raises(ConfigError, match="interconnect"):
        estimate_llm("llama2-7b", "alveo-u280", tp=2)
