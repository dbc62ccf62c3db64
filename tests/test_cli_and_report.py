import json
import shutil

import pytest
from typer.testing import CliRunner

from optim import render
from optim.cli import app
from optim.errors import OptimError
from optim.report import Report

runner = CliRunner()

PIPELINE = """version: 1
name: tiny
model:
  zoo: bert
inputs: {batch: 2, seq: 16}
target: cpu
backend: torch
passes:
  - cleanup
  - fuse_attention
  - quantize
measure_latency: false
"""


@pytest.fixture(scope="module")
def report_path(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    (d / "tiny.yaml").write_text(PIPELINE)
    result = runner.invoke(app, ["run", str(d / "tiny.yaml"), "--out", str(d / "out"),
                                 "--save", str(d / "saved")])
    assert result.exit_code == 0, result.output
    assert (d / "saved" / "program.json").exists()
    return d / "out" / "tiny-cpu.json"


def test_run_writes_valid_reports(report_path):
    data = Report.load(report_path).data
    assert data["schema"] == "optim.report/1"
    assert [p["name"] for p in data["passes"]] == ["cleanup", "fuse_attention", "quantize"]
    assert data["passes"][1]["counts"] == {"attention_fused": 2}
    assert report_path.with_suffix(".html").read_text().startswith("<!doctype html>")
    assert "| pipeline |" in report_path.with_suffix(".md").read_text()


def test_show_and_compare(report_path, tmp_path):
    assert "attention_fused=2" in runner.invoke(app, ["show", str(report_path)]).output
    md = runner.invoke(app, ["show", str(report_path), "--format", "markdown"]).output
    assert md.startswith("# optim report")
    other = json.loads(report_path.read_text())
    other["target"]["name"] = "cpu-copy"
    (tmp_path / "b.json").write_text(json.dumps(other))
    out = runner.invoke(app, ["compare", str(report_path), str(tmp_path / "b.json")],
                        env={"COLUMNS": "200"}).output
    assert "cpu-copy" in out and "SQNR" in out


def test_passes_and_targets_list():
    out = runner.invoke(app, ["passes"], env={"COLUMNS": "200"}).output
    for name in ("cleanup", "fuse_attention", "quantize"):
        assert name in out
    assert "cpu" in runner.invoke(app, ["targets"]).output


def test_cli_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\npasses: [cleanup, fuse_atention]\n")
    result = runner.invoke(app, ["run", str(bad)], env={"COLUMNS": "300"})
    assert result.exit_code == 2 and "Did you mean 'fuse_attention'" in result.output
    (tmp_path / "x.json").write_text('{"schema": "other/1"}')
    result = runner.invoke(app, ["show", str(tmp_path / "x.json")], env={"COLUMNS": "300"})
    assert result.exit_code == 2 and "not an optim report" in result.output


def test_report_schema_rejects_unlabelled_latency(report_path):
    data = json.loads(report_path.read_text())
    data["latency"] = [{"label": "optimized", "status": "estimated", "median_ms": 1.0}]
    with pytest.raises(OptimError, match="'by' is a required property"):
        Report(data).validate()
    data["latency"] = [{"label": "optimized", "status": "measured", "median_ms": 1.0}]
    with pytest.raises(OptimError, match="required property"):
        Report(data).validate()


def test_renderers_read_only_json(report_path):
    data = json.loads(report_path.read_text())
    assert "quantize" in render.to_html(data) and "quantize" in render.to_markdown(data)


def test_model_sources_python_and_hf_dir(tmp_path):
    from optim.runner import run_pipeline_file
    from optim.zoo import minilm_path

    p = tmp_path / "py.yaml"
    p.write_text("version: 1\nmodel: {python: 'tests.factories:small_gpt2', options: {layers: 1}}\n"
                 "backend: torch\nmeasure_latency: false\npasses: [cleanup, fuse_attention]\n")
    (report,) = run_pipeline_file(p)
    assert report["passes"][1]["counts"] == {"attention_fused": 1}
    p.write_text(f"version: 1\nmodel: {{hf_dir: '{minilm_path()}'}}\n"
                 "inputs: {batch: 2, seq: 16}\n"
                 "backend: torch\nmeasure_latency: false\npasses: [cleanup, fuse_attention]\n")
    (report,) = run_pipeline_file(p)
    assert report["passes"][1]["counts"] == {"attention_fused": 6}
    p.write_text("version: 1\nmodel: {python: 'tests.factories:not_a_model'}\npasses: [cleanup]\n")
    with pytest.raises(OptimError, match="must return a ZooModel"):
        run_pipeline_file(p)
    p.write_text(f"version: 1\nmodel: {{hf_dir: '{tmp_path}'}}\npasses: [cleanup]\n")
    with pytest.raises(OptimError, match="no config.json"):
        run_pipeline_file(p)


@pytest.mark.parametrize("config, message", [
    ({"model_type": "nosuch"}, "does not recognize this architecture"),
    ("{not json", "not a valid JSON"),
    ([], "model_type"),
    ({"num_attention_heads": 5}, "not a multiple"),
    ({"intermediate_size": 100}, "ignore_mismatched_sizes"),
])
def test_an_hf_dir_transformers_cannot_load_is_a_config_error(tmp_path, config, message):
    """A model directory transformers refuses (unknown family, broken JSON, shapes that do not
    fit its weights) fails with the key, the directory and transformers' reason, no traceback
    from inside transformers (issue 23, item 10)."""
    from optim.runner import run_pipeline_file
    from optim.zoo import minilm_path

    model = tmp_path / "model"
    shutil.copytree(minilm_path(), model)
    if isinstance(config, dict):
        config = json.dumps({**json.loads((model / "config.json").read_text()), **config})
    (model / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    p = tmp_path / "p.yaml"
    p.write_text(f"version: 1\nmodel: {{hf_dir: '{model}'}}\nmeasure_latency: false\n"
                 "passes: [cleanup]\n")
    with pytest.raises(OptimError, match="model.hf_dir") as err:
        run_pipeline_file(p)
    assert message in str(err.value) and str(model) in str(err.value)


def test_run_with_keep_freed_memory_sets_it_in_its_own_process(tmp_path):
    # a subprocess: the setting is process-wide and must not reach the rest of the suite (its
    # effect is tested in test_host_memory.py)
    import subprocess
    import sys

    (tmp_path / "tiny.yaml").write_text(PIPELINE.replace("  - quantize\n", ""))
    script = ("import sys\n"
              "from typer.testing import CliRunner\n"
              "from optim.cli import app\n"
              "r = CliRunner().invoke(app, ['run', sys.argv[1], '--out', sys.argv[2], "
              "'--keep-freed-memory'], env={'COLUMNS': '300'})\n"
              "print(r.output)\n"
              "sys.exit(r.exit_code)\n")
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path / "tiny.yaml"),
                          str(tmp_path / "out")], capture_output=True, text=True, timeout=300,
                         check=False)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "freed memory is kept in the process" in run.stdout
    assert (tmp_path / "out" / "tiny-cpu.json").exists()


def test_an_output_path_that_cannot_be_written_fails_before_the_work(tmp_path, monkeypatch):
    """A report path that is a directory, or a save path that is a file, is an error naming it
    before anything is optimized (not after the whole run)."""
    import optim.runner

    monkeypatch.setattr(optim.runner, "optimize", lambda *a, **k: pytest.fail("it ran"))
    (tmp_path / "tiny.yaml").write_text(PIPELINE)
    (tmp_path / "out" / "tiny-cpu.html").mkdir(parents=True)
    result = runner.invoke(app, ["run", str(tmp_path / "tiny.yaml"), "--out",
                                 str(tmp_path / "out")], env={"COLUMNS": "300"})
    assert result.exit_code == 2 and "tiny-cpu.html is a directory" in result.output
    (tmp_path / "afile").write_text("x")
    result = runner.invoke(app, ["run", str(tmp_path / "tiny.yaml"), "--save",
                                 str(tmp_path / "afile")], env={"COLUMNS": "300"})
    assert result.exit_code == 2 and "afile is a file" in result.output
