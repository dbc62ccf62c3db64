"""The tvm backend's tuning database: tuned once, reused from cache, rebuilt when corrupt."""

from __future__ import annotations

import copy
import json

import pytest

import optim
from backends.tvm_schedules import MatmulConfig
from backends.tvm_tuning import TuningDB
from optim import render
from optim.errors import ConfigError


@pytest.fixture
def tuning_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OPTIM_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "tvm"


def _compile(z, **options):
    return optim.optimize(copy.deepcopy(z.model), "cpu", z.example_args, "cleanup,fuse_attention",
                          example_kwargs=z.example_kwargs, backend="tvm",
                          backend_options=options, measure_latency=False)


def test_tuning_is_recorded_then_reused_from_cache(zoo_model, tuning_cache):
    z = zoo_model("bert")
    first = _compile(z, tune=True)
    info = first.report["backend"]
    assert info["schedule"] == "tuned"
    # batch and length are dynamic: every matmul is tuned at each of three shape buckets, and
    # the buckets' winners are dispatched on within one kernel
    assert len(info["tuning"]["buckets"]) == 3
    assert info["tuning"]["tuned_now"] == info["tuning"]["points"] == 3 * info["tuning"][
        "workloads"]
    assert f"shape buckets {info['tuning']['buckets'][0]}" in render.to_markdown(
        first.report.data)
    assert info["tuning"]["workloads"] >= 3 and info["tuning"]["unscheduled_kernels"] == []
    assert first.report["fidelity"]["outputs"]["max_abs_error"] <= 1e-4
    db = json.loads(next(tuning_cache.glob("tuning-*.json")).read_text())
    for rec in db["records"].values():  # every record: the measured winner among candidates
        assert rec["ms"] == min(rec["candidates"].values())

    again = _compile(z, tune=True)
    tuning = again.report["backend"]["tuning"]
    assert again.report["backend"]["schedule"] == "tuned (cache hit)"
    assert tuning["from_cache"] == tuning["points"] and tuning["tuned_now"] == 0
    assert tuning["seconds"] < info["tuning"]["seconds"] / 5
    # without tune=True the recorded choices are still used, nothing is measured
    assert _compile(z).report["backend"]["schedule"] == "tuned (cache hit)"


@pytest.mark.parametrize("damage", ["garbage", "edited record", "other schema"])
def test_corrupt_database_is_set_aside_and_rebuilt(tuning_cache, damage):
    target = {"kind": "llvm", "mcpu": "znver1", "num-cores": 2}
    db = TuningDB(target)
    record = {"shape": "b1-m8-n8-k8", "config": MatmulConfig(4, 16, True).as_dict(), "ms": 1.0}
    db.put("0123456789abcdef", record)
    assert TuningDB(target).get("0123456789abcdef") == MatmulConfig(4, 16, True)
    data = json.loads(db.path.read_text())
    if damage == "garbage":
        db.path.write_text(db.path.read_text()[:40])
    elif damage == "edited record":  # valid JSON, changed without its checksum: not trusted
        data["records"]["0123456789abcdef"]["config"]["mr"] = 1
        db.path.write_text(json.dumps(data))
    else:
        data["schema"] = "optim.tvm-tuning/0"
        db.path.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="failed its checks"):
        again = TuningDB(target)
    assert again.state.startswith("rebuilt") and again.records == {}
    assert again.get("0123456789abcdef") is None
    assert db.path.with_suffix(".corrupt").exists() and not db.path.exists()
    again.put("0123456789abcdef", record)  # rebuilt whole, readable again
    assert TuningDB(target).state == "loaded"


def test_database_is_per_target(tuning_cache):
    a = TuningDB({"kind": "llvm", "mcpu": "znver1", "num-cores": 2})
    b = TuningDB({"kind": "llvm", "mcpu": "znver1", "num-cores": 4})
    assert a.path != b.path and a.path.parent == b.path.parent == tuning_cache


def test_budget_stops_tuning_and_leaves_defaults(zoo_model, tuning_cache):
    z = zoo_model("gpt2")
    om = _compile(z, tune=True, tune_budget_s=1e-9)
    tuning = om.report["backend"]["tuning"]
    assert tuning["left_default"] == tuning["points"] >= tuning["workloads"] > 0
    assert om.report["backend"]["schedule"] == "untuned"
    assert om.report["fidelity"]["outputs"]["max_abs_error"] <= 1e-4


def test_backend_options_are_checked(zoo_model):
    z = zoo_model("bert")
    with pytest.raises(ConfigError, match="unknown option 'tune'.*Valid options: int4_accuracy"):
        optim.optimize(copy.deepcopy(z.model), "cpu", z.example_args, "cleanup",
                       example_kwargs=z.example_kwargs, backend="onnxruntime",
                       backend_options={"tune": True}, measure_latency=False)
    with pytest.raises(ConfigError, match="tunee.*tune_budget_s"):
        _compile(z, tunee=True)
