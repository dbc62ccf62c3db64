"""Targets in optimize() reports, compare_targets, and the targets/compare/llm commands."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import optim
from optim import zoo
from optim.cli import app
from optim.report import Report


@pytest.fixture(scope="module")
def bert_on_a100():
    z = zoo.load("bert", batch=2, seq=32)
    return optim.optimize(z.model, "a100", z.example_args, "cleanup,fuse_attention,quantize",
                          example_kwargs=z.example_kwargs, estimate_targets=["v100", "cpu"])


def test_estimated_target_report_labels_every_latency(bert_on_a100):
    r = bert_on_a100.report
    statuses = {row["label"]: row["status"] for row in r["latency"]}
    assert statuses == {"original @ a100": "estimated", "optimized @ a100": "estimated",
                        "optimized @ a100 (roofline bound)": "bound"}  # nothing measured for a100
    assert [e["target"] for e in r["estimates"]] == ["a100", "v100", "cpu"]
    for e in r["estimates"]:
        assert e["status"] == "estimated" and e["by"].startswith("optim cost model")
        assert [s["after"] for s in e["stages"]] == ["captured", "cleanup", "fuse_attention",
                                                    "quantize"]
        assert e["bound_ms"] <= e["estimated_ms"]
        assert e["memory"]["fits"] is True
    a100, v100 = r["estimates"][0], r["estimates"][1]
    assert a100["energy_j"] == pytest.approx(a100["estimated_ms"] / 1e3 * 400)
    assert a100["estimated_ms"] < v100["estimated_ms"]
    Report(r.data).validate()


def test_advice_says_when_a_pass_cannot_help(bert_on_a100):
    # a100 has int8 tensor cores: no capability advice; the estimate may still find int8 slower
    # on this overhead-bound toy model, and then says why
    advice = bert_on_a100.report["advice"]
    assert [a for a in advice if a.startswith("quantize (int8)")] == [
        "quantize (int8): the a100 estimate assumes a backend with int8 GEMM kernels (TensorRT, "
        "cuBLASLt); optim's torch and onnxruntime backends run optim::linear_int8 with CPU "
        "kernels only."]
    assert all("slower on" in a and "-bound" in a for a in advice
               if not a.startswith("quantize (int8)"))
    z = zoo.load("bert", batch=2, seq=32)
    om = optim.optimize(z.model, "v100", z.example_args, "cleanup,fuse_attention,quantize",
                        example_kwargs=z.example_kwargs)
    assert any("int8" in a and "v100" in a for a in om.report["advice"])


def test_estimate_method_reaches_any_target(bert_on_a100):
    h100 = bert_on_a100.estimate("h100")
    assert h100["target"] == "h100" and h100["estimated_ms"] > 0


def test_compare_targets_measures_cpu_and_estimates_the_rest():
    z = zoo.load("bert", batch=2, seq=32)
    om = optim.compare_targets(z.model, z.example_args, ["a100", "cpu"],
                               "cleanup,fuse_attention", example_kwargs=z.example_kwargs)
    r = om.report
    assert r["target"]["name"] == "cpu"
    assert {row["status"] for row in r["latency"]} == {"measured", "estimated", "bound"}
    assert {e["target"] for e in r["estimates"]} == {"cpu", "a100"}


def test_cli_targets_lists_every_spec_with_provenance():
    runner = CliRunner()
    out = runner.invoke(app, ["targets"], env={"COLUMNS": "250"}).output
    for name in ("a100", "h100", "cpu", "alveo-u280", "tpu-v5e"):
        assert name in out
    one = runner.invoke(app, ["targets", "h100"], env={"COLUMNS": "250"}).output
    assert "datasheet" in one and "peak.fp8" in one
    bad = runner.invoke(app, ["targets", "h10"])
    assert bad.exit_code == 2 and "Did you mean" in bad.output


def test_cli_compare_across_targets_and_llm(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["compare", "--model", "bert", "--targets", "cpu,a100",
                              "--pipeline", "cleanup,fuse_attention", "--seq", "16",
                              "--json", str(tmp_path / "r.json")], env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "r.json").read_text())
    assert {e["target"] for e in data["estimates"]} == {"cpu", "a100"}
    res = runner.invoke(app, ["llm", "llama2-7b", "--targets", "a100", "--prompt", "128"],
                        env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    assert "tokens/s" in res.output and "a100" in res.output
