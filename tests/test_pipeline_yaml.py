import pytest

from optim.config import load_pipeline_file, shipped_pipelines
from optim.errors import ConfigError, UnknownNameError
from optim.pipeline import Pipeline, parse_text


def test_shipped_pipelines_validate():
    assert {"cpu_default", "cpu_fp32", "minilm_cpu"} <= set(shipped_pipelines())
    for path in shipped_pipelines().values():
        assert load_pipeline_file(path)["passes"]


def test_text_form_parses_options():
    assert parse_text("cleanup,fuse_attention{min_seq_len=128},quantize{skip=[a, b]}") == [
        "cleanup", {"fuse_attention": {"min_seq_len": 128}}, {"quantize": {"skip": ["a", "b"]}}]
    p = Pipeline.build("cleanup,quantize{min_sqnr_db=20}")
    assert p.steps[1].config.min_sqnr_db == 20.0


def test_unknown_pass_did_you_mean():
    with pytest.raises(UnknownNameError, match="Did you mean 'quantize'"):
        Pipeline.build(["cleanup", "quantise"])


def test_exact_prerequisites_are_inserted_once_and_say_why():
    pipe = Pipeline.build(["sparsify"])
    assert pipe.names == ["cleanup", "fuse_attention", "sparsify"]
    assert [s.inserted_for for s in pipe.steps] == ["fuse_attention", "sparsify", None]
    assert Pipeline.build(["cleanup", "fuse_attention", "sparsify"]).inserted == []


def test_requires_checked_before_running_when_not_inserted():
    with pytest.raises(ConfigError, match="requires \\['cleanup'\\]"):
        Pipeline.build(["fuse_attention"], insert_prerequisites=False)


def test_bad_option_type_and_name():
    with pytest.raises(ConfigError, match="must be an integer"):
        Pipeline.build([{"cleanup": {}}, {"fuse_attention": {"min_seq_len": "long"}}])
    with pytest.raises(ConfigError, match="Did you mean 'min_seq_len'"):
        Pipeline.build(["cleanup", {"fuse_attention": {"min_seq_length": 3}}])


def _write(tmp_path, text):
    p = tmp_path / "p.yaml"
    p.write_text(text)
    return p


def test_yaml_error_names_file_line_and_key(tmp_path):
    p = _write(tmp_path, "version: 1\npasses:\n  - cleanup\n  - quantise\n")
    with pytest.raises(ConfigError, match=r"p.yaml:4: passes\[1\].*Did you mean 'quantize'"):
        load_pipeline_file(p)
    p = _write(tmp_path, "version: 1\npasses: [cleanup]\nbackend_name: torch\n")
    with pytest.raises(ConfigError, match=r"p.yaml:1: .*backend_name.*allowed keys"):
        load_pipeline_file(p)
    p = _write(tmp_path, "version: 1\npasses:\n  - cleanup\n  - quantize: {min_sqnr: 3}\n")
    with pytest.raises(ConfigError, match=r"p.yaml:4: passes\[1\] \(quantize\).*min_sqnr"):
        load_pipeline_file(p)
    p = _write(tmp_path, "version: 1\ntarget: cpuu\npasses: [cleanup]\n")
    with pytest.raises(ConfigError, match=r"p.yaml:2: target: unknown target 'cpuu'"):
        load_pipeline_file(p)


def test_malformed_yaml(tmp_path):
    p = _write(tmp_path, "version: 1\npasses: [cleanup\n")
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_pipeline_file(p)
    with pytest.raises(ConfigError, match="no such pipeline file"):
        load_pipeline_file(tmp_path / "missing.yaml")


@pytest.mark.parametrize("text,message", [
    ("version: 1\ntarget: cpu\npasses: [cleanup]\ntarget: a100\n",
     r":4: key 'target' appears twice \(first on line 2\)"),
    ("version: 1\npasses:\n  - quantize: {granularity: per_channel, granularity: per_tensor}\n",
     r":3: key 'granularity' appears twice"),
    ("version: 1\ntarget: cpu\ntargets: [a100]\npasses: [cleanup]\n", "not both"),
    ("version: 1\npasses: " + "[" * 2000 + "]" * 2000 + "\n", "nested too deeply"),
    ("? [a]\n: 1\nversion: 1\npasses: []\n", "unhashable key"),  # a list as a key (fuzzing)
])
def test_silent_yaml_surprises_are_errors(tmp_path, text, message):
    """Duplicate keys (YAML keeps the last silently), target with targets, and nesting that
    would blow the stack are errors naming the line, not surprises (issue 23, item 10)."""
    with pytest.raises(ConfigError, match=message):
        load_pipeline_file(_write(tmp_path, text))


def test_a_one_line_option_yaml_cannot_read_is_a_config_error():
    """Found by fuzzing: a value YAML refuses (a control character, an open bracket)."""
    for text in ("quantize{skip=\x1b}", "quantize{skip=[}"):
        with pytest.raises(ConfigError, match="option 'skip': cannot read the value"):
            Pipeline.build(text)


@pytest.mark.parametrize("name", ["../../x", "/tmp/x", "a/b", ".hidden", ""])
def test_a_pipeline_name_cannot_write_outside_the_output_folder(tmp_path, name):
    text = f"version: 1\nname: {name!r}\npasses: [cleanup]\n"
    with pytest.raises(ConfigError, match="name"):
        load_pipeline_file(_write(tmp_path, text))


@pytest.mark.parametrize("budget,message", [
    ("{cosine_min: .nan}", "must be a finite number, got nan"),
    ("{cosine: 0.9}", "names no metric"),
    ("{cosine_min: 0.9, enforce: 2}", "'enforce' must be true or false"),
])
def test_a_fidelity_budget_that_would_pass_silently_is_an_error(tmp_path, budget, message):
    text = f"version: 1\npasses: [cleanup]\nfidelity_budget: {budget}\n"
    with pytest.raises(ConfigError, match=f":3: .*{message}"):
        load_pipeline_file(_write(tmp_path, text))


def test_a_bad_skip_pattern_is_a_config_error_naming_it():
    with pytest.raises(ConfigError, match=r"skip pattern '\(' is not a regular expression"):
        Pipeline.build(["cleanup", {"quantize": {"skip": ["("]}}])


@pytest.mark.parametrize("steps", [-1, 10 ** 9])
def test_step_counts_are_bounded(steps):
    with pytest.raises(ConfigError, match=r"'distill_steps' must be in 0\.\.100,000"):
        Pipeline.build(["cleanup", {"binarize": {"distill_steps": steps}}])
