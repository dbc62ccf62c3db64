"""Plots (hardware/plots.py) and the per-target parts of the renderers (optim/render.py), on a
small hand-built report: no optimize() run, so this stays fast."""

import copy

import pytest
from rich.console import Console

from hardware import plots
from optim import render
from optim.report import Report

PNG = b"\x89PNG\r\n\x1a\n"
BY = "optim cost model (roofline x efficiency, fp16 float math), calibration: spec defaults"


def _kernel(name, kind, flops, weights, acts, seconds, bound, module=""):
    return {"name": name, "kind": kind, "dtype": "fp16", "peak_dtype": "fp16", "flops": flops,
            "bytes": {"weights": weights, "activations": acts}, "shape": [1, 64, 128, 64],
            "seconds": seconds, "bound": bound, "compute_s": seconds / 2,
            "memory_s": seconds / 3, "overhead_s": 0.0, "note": "", "module": module}


def _estimate(target, kind, ms, bound_ms, stages, energy=None):
    return {
        "target": target, "kind": kind, "description": f"{target} test device",
        "provenance": "datasheet", "status": "estimated", "by": BY, "precision": "fp16",
        "estimated_ms": ms, "bound_ms": bound_ms, "speedup_vs_captured": stages[0] / ms,
        "throughput_per_s": 1e3 / ms, "bound": "memory",
        "time_by_bound_ms": {"memory": ms * 0.7, "compute": ms * 0.3},
        "time_by_kind_ms": {"gemm": ms * 0.6, "fused": ms * 0.3, "attention": ms * 0.1},
        "bytes_by_class": {"weights": 1.3e5, "activations": 1.2e6, "kv_cache": 0.0},
        "memory": {"needed_bytes": 4.7e5, "capacity_bytes": 8e10, "fits": True},
        "energy_j": energy,
        "energy_basis": "estimated latency x TDP (an upper bound on energy)" if energy else
                        "no published power figure",
        "stages": [{"after": after, "estimated_ms": v, "bound_ms": bound_ms,
                    "gain_vs_previous": None if i == 0 else stages[i - 1] / v}
                   for i, (after, v) in enumerate(zip(
                       ["captured", "cleanup", "fuse_attention", "quantize"], stages))],
        "top_kernels": [
            _kernel("linear_4", "gemm", 1.05e6, 9216, 53248, 2.4e-5, "compute",
                    "encoder.layer.0.intermediate.dense"),
            _kernel("attention_0", "attention", 2.6e5, 0, 24576, 1.2e-5, "memory",
                    "encoder.layer.0.attention.self"),
            _kernel("layer_norm_1", "fused", 4.1e4, 256, 32768, 8e-6, "memory", "encoder"),
            _kernel("arange", "fused", 0.0, 0, 256, 2e-6, "overhead"),  # no FLOPs: not plotted
        ],
        "notes": [f"{target}: int8 runs on the fp16 path"] if kind == "gpu" else [],
    }


@pytest.fixture
def report():
    ests = [_estimate("a100", "gpu", 0.33, 0.0018, [0.40, 0.39, 0.34, 0.33], energy=0.13),
            _estimate("h100", "gpu", 0.21, 0.0011, [0.26, 0.25, 0.217, 0.21], energy=0.15),
            _estimate("cpu", "cpu", 2.0, 1.1, [3.2, 3.1, 2.7, 2.0])]
    return {
        "schema": "optim.report/1", "created": "2026-01-01T00:00:00+00:00",
        "optim_version": "0.1.0",
        "model": {"name": "BertModel", "parameters": 163968, "flops": 8.4e6,
                  "weight_bytes": 664064, "weight_bytes_after": 473600,
                  "inputs": [{"name": "input_ids", "shape": [2, 32], "dtype": "int64"}]},
        "target": {"name": "a100", "kind": "gpu"},
        "backend": {"name": "torch"},
        "pipeline": [{"cleanup": {}}, {"fuse_attention": {}}, {"quantize": {}}],
        "passes": [{"name": n, "changed": True, "counts": {"x": 1}, "skipped": [],
                    "seconds": 0.01, "numerics": "exact", "fidelity": None}
                   for n in ("cleanup", "fuse_attention", "quantize")],
        "graph": {"before": {"aten.linear": 12}, "after": {"optim.linear_int8": 12}},
        "fidelity": {"outputs": {"max_abs_error": 0.002, "cosine_mean": 1.0,
                                 "cosine_min": 0.99999, "sqnr_db": 64.3}},
        "latency": [
            {"label": "original @ a100", "status": "estimated", "target": "a100",
             "median_ms": 0.40, "by": BY},
            {"label": "optimized @ a100", "status": "estimated", "target": "a100",
             "median_ms": 0.33, "bound_kind": "memory", "by": BY},
            {"label": "optimized @ a100 (roofline bound)", "status": "bound", "target": "a100",
             "median_ms": 0.0018, "by": "datasheet peaks and bandwidth at 100%, no overhead"}],
        "speedup": {},
        "estimates": ests,
        "advice": ["quantize (int8): cpu has no VNNI/AMX; int8 GEMMs use AVX2 u8s8 madd."],
        "warnings": [],
    }


def _with_measured(d):
    d = copy.deepcopy(d)
    m = {"status": "measured", "median_ms": 1.9, "p10_ms": 1.8, "p90_ms": 2.1, "runs": 50,
         "threads": 2, "machine": "Test CPU (2 cores)"}
    d["latency"] = [{"label": "original", **m, "median_ms": 2.5},
                    {"label": "optimized", **m}] + d["latency"]
    d["speedup"] = {"optimized_vs_original": 2.5 / 1.9, "basis": "ratio of medians"}
    return d


def _rich_text(renderable) -> str:
    console = Console(record=True, width=250)
    console.print(renderable)
    return console.export_text()


def test_fixture_follows_report_schema(report):
    Report(report).validate()
    Report(_with_measured(report)).validate()


def test_stage_bars_png(report):
    png = plots.stage_bars_png(report["estimates"])  # spread > 100x: log axis
    assert png.startswith(PNG) and len(png) > 1024
    png = plots.stage_bars_png(report["estimates"][:1], show_bound=False)  # linear axis
    assert png.startswith(PNG) and len(png) > 1024


def test_roofline_png_on_a_real_spec(report):
    from hardware.spec import load_spec

    spec = load_spec("a100")
    pts = plots.kernel_points(report["estimates"][0])
    assert [p["kind"] for p in pts] == ["gemm", "attention", "fused"]  # zero-FLOP one skipped
    assert pts[0]["achieved_flops"] == pytest.approx(1.05e6 / 2.4e-5)
    assert pts[0]["intensity"] == pytest.approx(1.05e6 / (9216 + 53248))
    png = plots.roofline_png(spec, pts, "bert on a100")
    assert png.startswith(PNG) and len(png) > 1024
    # a plain dict works as the spec, and no points still draws the roof
    png = plots.roofline_png({"name": "toy", "peak": {"fp32": 1e12}, "mem_bandwidth": 1e11}, [])
    assert png.startswith(PNG) and len(png) > 1024


def test_kernel_points_from_an_estimate():
    from hardware.costmodel import estimate_kernels
    from hardware.opcost import Kernel
    from hardware.spec import load_spec

    kernels = [Kernel("mm", "gemm", "fp16", 2 * 256**3, {"weights": 2 * 256**2,
                                                         "activations": 4 * 256**2},
                      shape=(1, 256, 256, 256)),
               Kernel("view", "fused", "fp16", 0.0, {"activations": 1024})]
    pts = plots.kernel_points(estimate_kernels(kernels, load_spec("a100")))
    assert len(pts) == 1 and pts[0]["kind"] == "gemm" and pts[0]["achieved_flops"] > 0


def test_html_embeds_plots(report):
    roof = plots.roofline_png({"name": "a100", "peak": {"fp16": 3.12e14}, "mem_bandwidth": 2e12},
                              plots.kernel_points(report["estimates"][0]))
    page = render.to_html(report, rooflines={"a100": roof})
    assert page.startswith("<!doctype html>")
    assert page.count('<img src="data:image/png;base64,') == 2
    assert "Advice" in page and "VNNI" in page
    assert "data:image/png" not in render.to_html(report, plots=False)


def test_tables_name_targets_and_statuses(report):
    md = render.compare_targets_markdown(report)
    full_md = render.to_markdown(report)
    rich_targets = _rich_text(render.compare_targets_table(report))
    rich_report = _rich_text(render.to_rich(report))
    for text in (md, full_md, rich_targets, rich_report):
        for target in ("a100", "h100", "cpu"):
            assert target in text
        assert "estimated" in text and "bound" in text
    assert "fuse_attention 1.15x" in md  # per-pass gain from the stages
    assert "encoder.layer.0.intermediate.dense" in md  # top op
    assert "0.13 (<=)" in md and "no published power figure" in md  # energy and its basis
    assert "## Advice" in full_md and "VNNI" in full_md and "VNNI" in rich_report
    assert "int8 runs on the fp16 path" in md  # estimate notes
    assert not any("| measured |" in line for line in md.splitlines())  # nothing was timed


def test_measured_row_is_labelled(report):
    d = _with_measured(report)
    md = render.compare_targets_markdown(d)
    row = next(line for line in md.splitlines() if "here (cpu)" in line)
    assert "| host | measured | 1.9 |" in row and "1.32x" in row
    assert "measured on Test CPU" in md  # the machine is named in the notes
    assert "here (cpu)" in _rich_text(render.compare_targets_table(d))
    assert "1.9 ms measured" in render.to_markdown(d)


def test_every_summary_latency_shows_its_status(report):
    for label, value in render.summary_rows(_with_measured(report)):
        if label.startswith("latency"):
            assert any(s in value for s in ("measured", "estimated", "bound")), (label, value)


def test_report_without_estimates_still_renders(report):
    old = copy.deepcopy(report)
    del old["estimates"], old["advice"]
    assert render.summary_rows(old)
    assert render.target_rows(old) == []
    assert "no per-target estimates" in render.compare_targets_markdown(old)
    assert "| pipeline |" in render.to_markdown(old)
    assert "Targets" not in render.to_markdown(old)
    page = render.to_html(old)
    assert page.startswith("<!doctype html>") and "data:image/png" not in page
    assert "optim report" in _rich_text(render.to_rich(old))
    assert "BertModel" in _rich_text(render.compare_table([("old", old), ("new", report)]))
