"""The FlightLLM-style FPGA cost model (hardware/fpga.py) and the two FPGA target specs."""

import pytest

from hardware.fpga import CLASSES, MODULES, estimate_llm
from hardware.llm_shape import LLAMA2
from hardware.spec import PROVENANCES, load_spec
from optim.errors import ConfigError

LLAMA7B = LLAMA2["llama2-7b"]
# FlightLLM's released IR/profiler (FlightLLM/flightllm_test_demo, profile/): INT4 weights
# ("2 stands for INT4" in IR_linear_mv.py), q_proj and k_proj at sparse_ratio 0.7 (30% zeros),
# every other projection dense, int8 activations and KV cache. Context 512: the U280 demo case
# decode_token_512 that the README says reproduces Fig. 1.
FLIGHTLLM = dict(weight_bits=4, act_bits=8, kv_bits=8, sparsity={"q": 0.3, "k": 0.3})
U280_MEASURED_TOK_S = 55.0  # FlightLLM (FPGA'24) Fig. 1, on board, LLaMA2-7B, batch 1


@pytest.fixture(scope="module")
def u280():
    return load_spec("alveo-u280")


@pytest.fixture(scope="module")
def vhk158():
    return load_spec("versal-vhk158")


def decode(spec, **kw):
    return estimate_llm(spec, LLAMA7B, phase="decode", context_len=kw.pop("context_len", 512),
                        **{**FLIGHTLLM, **kw})


@pytest.mark.parametrize("context_len", [128, 512])
def test_u280_anchor_within_30_percent_of_measured(u280, context_len):
    est = decode(u280, context_len=context_len)
    assert est.activations_on_chip and est.fits_memory
    assert est.bound == "load"  # batch-1 decode streams the weights
    assert abs(est.tokens_per_s / U280_MEASURED_TOK_S - 1) <= 0.30, est.tokens_per_s


def test_decode_faster_with_fewer_weight_bits(u280):
    tps = [decode(u280, weight_bits=b, sparsity=0.0).tokens_per_s for b in (8, 4, 3)]
    assert tps[0] < tps[1] < tps[2]


def test_decode_faster_with_more_sparsity(u280):
    tps = [decode(u280, sparsity=s).tokens_per_s for s in (0.0, 0.5, 0.75)]
    assert tps[0] < tps[1] < tps[2]
    # zeros skip compute only: stored dense, the weight bytes do not shrink
    dense = decode(u280, sparsity=0.75, weight_format="dense")
    assert dense.hbm_bytes["weights"] == decode(u280, sparsity=0.0).hbm_bytes["weights"]
    comp = decode(u280, sparsity=0.75, weight_format="compressed")
    assert comp.hbm_bytes["weights"] < dense.hbm_bytes["weights"]
    assert comp.hbm_bytes["metadata"] > 0 and comp.tokens_per_s > dense.tokens_per_s


def test_prefill_time_grows_about_linearly(u280):
    t = {n: estimate_llm(u280, LLAMA7B, phase="prefill", prompt_len=n, **FLIGHTLLM).seconds
         for n in (128, 256, 1024)}
    assert 1.8 <= t[256] / t[128] <= 2.2
    assert 3.6 <= t[1024] / t[256] <= 4.4
    assert estimate_llm(u280, LLAMA7B, phase="prefill", prompt_len=512).bound == "compute"


def test_vhk158_faster_than_u280(u280, vhk158):
    assert decode(vhk158).tokens_per_s > decode(u280).tokens_per_s
    pre = [estimate_llm(s, LLAMA7B, phase="prefill", prompt_len=256, **FLIGHTLLM).seconds
           for s in (u280, vhk158)]
    assert pre[1] < pre[0]


def test_breakdown_is_consistent(u280):
    est = decode(u280)
    b = est.breakdown()
    assert set(b["instructions"]) == set(CLASSES) and set(b["modules_s"]) == set(MODULES)
    assert b["instructions"]["MV"]["count"] > 0 and b["instructions"]["MM"]["count"] == 0
    assert est.seconds >= max(est.modules.values()) and est.non_overlapped >= 0
    assert abs(sum(r["seconds"] for r in b["ops"]) - est.seconds) < 1e-9
    moved = b["instructions"]["LD"]["bytes"] + b["instructions"]["ST"]["bytes"]
    assert moved == pytest.approx(sum(est.hbm_bytes.values()), rel=1e-9)
    off = decode(u280, always_on_chip=False)
    assert not off.activations_on_chip and off.seconds > est.seconds


@pytest.mark.parametrize("name", ["alveo-u280", "versal-vhk158"])
def test_every_spec_number_has_a_source(name):
    spec = load_spec(name)
    assert spec.kind == "fpga"
    for key, q in spec.quantities().items():
        assert q.source.strip() and q.provenance in PROVENANCES, key
    for key in ("dsp_count", "kernel_clock_mhz", "slr_count", "hbm_channels", "hbm_channel_gbs",
                "hbm_same_channel_eff", "hbm_cross_channel_eff", "uram_mb", "bram_mb"):
        assert key in spec.fpga, key
    assert {"int8", "int4", "fp16"} <= set(spec.fpga["ops_per_dsp"])


def test_bad_inputs_raise_config_error(u280):
    with pytest.raises(ConfigError, match="phase"):
        estimate_llm(u280, LLAMA7B, phase="generate")
    with pytest.raises(ConfigError):
        estimate_llm(load_spec("a100"), LLAMA7B, phase="decode")
    with pytest.raises(ConfigError):
        estimate_llm(u280, LLAMA7B, phase="decode", sparsity={"qkv": 0.5})
    with pytest.raises(ConfigError):
        estimate_llm(u280, LLAMA7B, phase="decode", sparsity=1.0)
