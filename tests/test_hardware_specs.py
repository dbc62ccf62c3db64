"""Target spec files: every number sourced, capability caveats encoded, bad files rejected by name.

`cpu` is skipped: it is filled by probing this machine at load time (hardware/cpu_probe.py).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from hardware.spec import DTYPES, PROVENANCES, load_spec, specs_dir, target_names
from optim.errors import ConfigError, UnknownNameError

NAMES = [n for n in target_names() if n != "cpu"]

# Which targets have which tensor-math paths (hardware.md, "Capability caveats to encode").
# A new target with FP8 or 2:4 sparse tensor cores must be added here.
FP8_TARGETS = {"h100", "h200", "l4", "rtx4090"}  # Ada and Hopper only
SPARSE_24_TARGETS = {"a100", "h100", "h200", "l4", "rtx4090", "jetson-orin"}  # Ampere/Ada/Hopper
NO_INT4_TARGETS = {"h100", "h200", "v100"}  # Hopper has no INT4 tensor cores; Volta none at all

OUR_TARGETS = {"a100", "h100", "h200", "v100", "l4", "t4", "rtx4090", "jetson-orin", "xeon-spr",
               "apple-m2", "tpu-v5e"}


def _spec_or_skip(name: str):
    if name not in NAMES:
        pytest.skip(f"no spec file for {name!r}")
    return load_spec(name)


def test_expected_targets_are_present():
    assert OUR_TARGETS <= set(NAMES), sorted(OUR_TARGETS - set(NAMES))


@pytest.mark.parametrize("name", NAMES)
def test_every_number_is_sourced(name):
    spec = load_spec(name)
    assert spec.name == name
    assert Path(spec.path).stem == name.replace("-", "_")
    qs = spec.quantities()
    for key in ("memory.bandwidth", "memory.capacity", "onchip", "launch_overhead",
                "efficiency.gemm", "efficiency.memory"):
        assert key in qs, f"{name}: {key} missing"
    assert spec.peak, f"{name}: no peaks"
    for key, q in qs.items():
        assert q.source.strip(), f"{name}: {key} has an empty source"
        assert q.provenance in PROVENANCES, f"{name}: {key} provenance {q.provenance!r}"
        assert q.value >= 0, f"{name}: {key} is negative"
    # every source in the table is a reference with a known provenance
    for key, src in spec.sources.items():
        assert src["ref"].strip() and src["provenance"] in PROVENANCES, (name, key)
    # peaks are per-dtype, and efficiencies are fractions
    assert set(spec.peak) <= set(DTYPES)
    for key in ("gemm", "memory"):
        assert 0 < spec.efficiency[key].value <= 1, (name, key)
    # a sparse path only for dtypes with a dense peak, and only with a source
    assert set(spec.sparse_2_4) <= set(spec.peak), (name, spec.sparse_2_4)
    assert bool(spec.sparse_2_4) == bool(spec.sparse_2_4_source), name


@pytest.mark.parametrize("name", NAMES)
def test_fp8_only_on_ada_and_hopper(name):
    spec = load_spec(name)
    assert ("fp8" in spec.peak) == (name in FP8_TARGETS), name
    assert ("fp8_tensor_cores" in spec.features) == (name in FP8_TARGETS), name


@pytest.mark.parametrize("name", NAMES)
def test_2_4_only_on_ampere_ada_hopper(name):
    spec = load_spec(name)
    assert bool(spec.sparse_2_4) == (name in SPARSE_24_TARGETS), (name, spec.sparse_2_4)


@pytest.mark.parametrize("name", sorted(NO_INT4_TARGETS))
def test_no_int4_peak_without_int4_tensor_cores(name):
    spec = _spec_or_skip(name)
    assert "int4" not in spec.peak
    assert "int4_tensor_cores" not in spec.features


def test_v100_int8_is_dp4a_not_tensor_cores():
    spec = _spec_or_skip("v100")
    assert "int8_tensor_cores" not in spec.features
    assert "dp4a" in spec.features
    assert spec.sparse_2_4 == ()
    assert set(spec.peak) == {"fp32", "fp16", "int8"}
    assert spec.peak["int8"].value < spec.peak["fp16"].value  # DP4A: ~4x FP32, below FP16 TC
    assert spec.peak["int8"].value == pytest.approx(4 * spec.peak["fp32"].value, rel=0.03)


def test_t4_has_int4_but_no_2_4():
    spec = _spec_or_skip("t4")
    assert "int4" in spec.peak and "int4_tensor_cores" in spec.features
    assert spec.sparse_2_4 == ()
    assert not {"tf32", "bf16", "fp8"} & set(spec.peak)


def test_hopper_caveats():
    for name in ("h100", "h200"):
        spec = _spec_or_skip(name)
        assert "int4" not in spec.peak
        assert "int4" not in spec.sparse_2_4
        assert spec.interconnect is not None and spec.interconnect.topology == "switch"
        assert spec.interconnect.bandwidth.value == pytest.approx(450e9)  # per direction


def test_h200_is_h100_compute_with_more_memory():
    h100, h200 = _spec_or_skip("h100"), _spec_or_skip("h200")
    assert {k: q.value for k, q in h100.peak.items()} == {k: q.value for k, q in h200.peak.items()}
    assert h200.mem_bandwidth.value > h100.mem_bandwidth.value
    assert h200.mem_capacity.value > h100.mem_capacity.value


def test_xeon_spr_has_amx():
    spec = _spec_or_skip("xeon-spr")
    assert spec.kind == "cpu"
    assert {"amx", "avx512", "popcount"} <= spec.features
    assert spec.peak["bf16"].value > spec.peak["fp32"].value  # AMX tiles vs AVX-512
    assert spec.sparse_2_4 == ()
    assert spec.launch_overhead.value < load_spec("a100").launch_overhead.value


def test_kinds_of_the_non_gpu_targets():
    kinds = {"xeon-spr": "cpu", "apple-m2": "soc", "tpu-v5e": "tpu", "jetson-orin": "gpu"}
    for name, kind in kinds.items():
        assert _spec_or_skip(name).kind == kind, name
    assert "unified_memory" in load_spec("apple-m2").features
    assert "unified_memory" in load_spec("jetson-orin").features


def test_derived_peaks_say_so():
    # numbers hardware.md marks [derived] must not claim to be datasheet values
    assert load_spec("jetson-orin").peak["fp16"].provenance == "derived"
    for dtype in ("fp32", "bf16", "int8"):
        assert load_spec("xeon-spr").peak[dtype].provenance == "derived", dtype


# ------------------------------------------------------------ malformed files

def _a100_raw() -> dict:
    return yaml.safe_load((specs_dir() / "a100.yaml").read_text())


def _write(tmp_path: Path, raw: dict, stem: str) -> Path:
    path = tmp_path / f"{stem}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.parametrize("case, key", [
    ("number_without_source", "tdp_w"),
    ("unknown_source_key", "tdp_w"),
    ("unknown_dtype", "fp64"),
    ("unknown_provenance", "ds"),
    ("missing_required", "onchip_mb"),
])
def test_malformed_spec_names_file_and_key(tmp_path, case, key):
    raw = _a100_raw()
    if case == "number_without_source":
        raw["tdp_w"] = [400]
    elif case == "unknown_source_key":
        raw["tdp_w"] = [400, "no_such_source"]
    elif case == "unknown_dtype":
        raw["peak_tflops"]["fp64"] = [9.7, "ds"]
    elif case == "unknown_provenance":
        raw["sources"]["ds"]["provenance"] = "vendor said so"
    elif case == "missing_required":
        del raw["onchip_mb"]
    path = _write(tmp_path, raw, f"bad_{case}")
    with pytest.raises(ConfigError) as err:
        load_spec(path)
    msg = str(err.value)
    assert str(path) in msg or path.name in msg, msg
    assert key in msg, msg
    if case == "unknown_source_key":
        assert "no_such_source" in msg and "sources table" in msg


def test_not_yaml_is_a_config_error(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match=re.escape(path.name)):
        load_spec(path)


def test_missing_path_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no target spec"):
        load_spec(tmp_path / "nope.yaml")


# ------------------------------------------------------------ unknown names

def test_unknown_target_name_lists_valid_names():
    with pytest.raises(UnknownNameError) as err:
        load_spec("a1OO")
    assert err.value.kind == "target" and err.value.name == "a1OO"
    assert "a100" in err.value.valid
    assert "Valid targets:" in str(err.value) and "a100" in str(err.value)


def test_unknown_target_name_did_you_mean():
    with pytest.raises(UnknownNameError, match=r"Did you mean 'a100'\?"):
        load_spec("a10O")  # one letter O for a zero
    with pytest.raises(UnknownNameError, match=r"Did you mean 'rtx4090'\?"):
        load_spec("rtx-4090")


def test_unknown_target_name_did_you_mean_two_lookalikes():
    with pytest.raises(UnknownNameError, match=r"Did you mean 'a100'\?"):
        load_spec("a1OO")
