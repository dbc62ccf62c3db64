"""Dynamic shapes: every pass on every small zoo model keeps a graph that runs at other batch
sizes and lengths within its numerics contract (or the driver makes the axis static and says
why); torch and ONNX Runtime artifacts run three shapes and survive save/load in a fresh
process with their ranges; calls outside the ranges get a clear error."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import optim
from optim import numerics, render, shapes
from optim.capture import token_mask
from optim.pass_base import Exact
from optim.registry import PASSES
from optim.shapes import ShapeError
from optim.testing import capture_example, run_pass
from tests.conftest import SMALL
from tests.test_pass_contracts import BEFORE, OPTIONS, REFUSES

# (pass, model) pairs whose rewrite holds only at the traced shape: causal linear attention is
# traced at the example's batch and length (its chunked scan pads to whole chunks of it)
STATIC = {("linearize_attention", "gpt2"), ("linearize_attention", "llama")}
# passes with nothing to do on a model, and the reason they record
NOTHING_TO_DO = {("fuse_linears", "gpt2"): "already be one projection"}


@pytest.fixture(scope="module")
def dynamic_graph(zoo_model):
    cache = {}

    def get(name):
        if name not in cache:
            z = zoo_model(name)
            cache[name] = (capture_example(z.model, z.example_args, z.example_kwargs, True), z)
        return cache[name]

    return get


def _shapes_to_try(spec, example):
    """The example, a larger size on each dynamic axis alone, and every axis smaller."""
    out = [("example", example)]
    smaller = example
    for axis, (lo, hi) in spec.ranges.items():
        size = spec.traced[axis]
        out.append((f"{axis} {min(hi, size * 2 + 1)}",
                    shapes.resize(spec, example, axis, min(hi, size * 2 + 1))))
        smaller = shapes.resize(spec, smaller, axis, max(lo, size // 2 + 1))
    return out + [("all", smaller)]


@pytest.mark.parametrize("model_name", SMALL)
@pytest.mark.parametrize("pass_name", PASSES.names())
def test_pass_keeps_the_graph_dynamic(pass_name, model_name, dynamic_graph):
    """The contract of every pass on every small zoo model: it changes something and stays
    within its declared numerics, at the traced shape and three others."""
    if (pass_name, model_name) in REFUSES:
        pytest.skip("the pass refuses this model (tests/test_pass_contracts.py)")
    gm, z = dynamic_graph(model_name)
    spec = gm.meta["shapes"]
    example = (z.example_args, z.example_kwargs)
    start = run_pass(BEFORE[pass_name], gm, *example).gm if pass_name in BEFORE else gm
    run = run_pass(pass_name, start, *example, options=OPTIONS.get(pass_name), teacher=gm)
    contract = PASSES.get(pass_name).numerics
    for label, (args, kwargs) in _shapes_to_try(spec, example):
        if (pass_name, model_name) in STATIC and label != "example":
            if label == "all":  # the driver's probes turn this into static axes
                with pytest.raises(RuntimeError):
                    run.gm(*args, **kwargs)
            continue
        with torch.no_grad():
            fid = numerics.compare(z.model(*args, **kwargs), run.gm(*args, **kwargs),
                                   token_mask(kwargs))  # padded positions are never read
        if isinstance(contract, Exact):
            assert fid["max_abs_error"] <= contract.atol, label
        else:
            assert fid[contract.metric] >= contract.min_value, label
    if (pass_name, model_name) in NOTHING_TO_DO:
        assert not run.result.changed and NOTHING_TO_DO[pass_name, model_name] in \
            run.result.skipped[0].reason
        return
    assert run.result.changed, f"{pass_name} changed nothing on {model_name}"


@pytest.fixture(scope="module")
def minilm():
    from optim import zoo

    return zoo.load("minilm", batch=4, seq=32)


def _tokens(z, texts_batch: int, seq: int) -> dict:
    from optim.zoo.data import sentences

    enc = z.tokenizer(sentences(texts_batch, seed=3), padding="max_length", truncation=True,
                      max_length=seq, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "tvm"])
def test_optimized_minilm_runs_other_shapes_and_loads_with_them(backend, minilm, tmp_path):
    om = optim.optimize(minilm.model, "cpu", example_kwargs=minilm.example_kwargs,
                        backend=backend, measure_latency=False)
    facts = om.report["model"]["shapes"]
    assert facts["ranges"] == {"batch": [1, 1024], "seq": [1, 512]}  # 512 positions in BERT
    assert [f["shape"] for f in om.report["fidelity"]["other_shapes"]] == ["batch 5", "seq 17"]
    page = render.to_markdown(om.report.data)
    assert "batch 1..1024; seq 1..512" in page and "fidelity at seq 17" in page
    for batch, seq in [(1, 1), (3, 9), (8, 128)]:
        kwargs = _tokens(minilm, batch, seq)
        fid = numerics.compare(minilm.model(**kwargs), om(**kwargs), kwargs["attention_mask"])
        assert fid["cosine_mean"] > 0.99, (batch, seq, fid)
    om.save(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "manifest.json").read_text())["shapes"]
    assert saved["ranges"] == facts["ranges"]
    script = textwrap.dedent(f"""
        import torch, optim
        om = optim.load({str(tmp_path / "m")!r}, trust_compiled_code=True)  # our own save
        for b, s in [(2, 7), (5, 40)]:
            out = om(input_ids=torch.full((b, s), 1000), attention_mask=torch.ones(b, s,
                     dtype=torch.long))
            print(tuple(out.last_hidden_state.shape))
        try:
            om(input_ids=torch.ones(1, 600, dtype=torch.long),
               attention_mask=torch.ones(1, 600, dtype=torch.long))
        except optim.shapes.ShapeError as e:
            print(e)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out == ["(2, 7, 384)", "(5, 40, 384)", "input 'input_ids' has shape (1, 600); the "
                   "model accepts [batch 1..1024, seq 1..512]"]


def test_calls_outside_the_ranges_name_the_input_and_what_it_accepts(minilm):
    om = optim.optimize(minilm.model, "cpu", example_kwargs=minilm.example_kwargs,
                        pipeline="cleanup", backend="torch", measure_latency=False,
                        dynamic={"batch": (1, 8), "seq": (4, 64)})
    ok = _tokens(minilm, 8, 64)
    om(**ok)
    cases = [
        ({**ok, "input_ids": ok["input_ids"].float()}, "input 'input_ids' must be int64, got "
                                                       "float32"),
        ({**ok, "attention_mask": ok["attention_mask"][None]}, "must have 2 dimensions"),
        (_tokens(minilm, 9, 16), r"has shape \(9, 16\); the model accepts \[batch 1..8, "
                                 r"seq 4..64\]"),
        (_tokens(minilm, 2, 3), r"has shape \(2, 3\)"),
        ({"input_ids": ok["input_ids"]}, "takes the inputs"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ShapeError, match=message):
            om(**kwargs)


def test_static_shapes_when_asked(minilm):
    static = optim.optimize(minilm.model, "cpu", example_kwargs=minilm.example_kwargs,
                            pipeline="cleanup", backend="torch", measure_latency=False,
                            dynamic=False)
    assert static.report["model"]["shapes"]["ranges"] == {}
    with pytest.raises(ShapeError, match=r"accepts \[4, 32\] \(batch is static: dynamic shapes "
                                         r"are off for it\)"):
        static(**_tokens(minilm, 2, 32))


def test_a_pass_that_bakes_the_length_makes_it_static_with_the_reason(zoo_model):
    z = zoo_model("gpt2")
    om = optim.optimize(z.model, "cpu", z.example_args, example_kwargs=z.example_kwargs,
                        pipeline=["cleanup", "fuse_attention",
                                  {"linearize_attention": {"gate": False, "fit_steps": 5}}],
                        backend="torch", measure_latency=False)
    facts = om.report["model"]["shapes"]
    assert facts["ranges"] == {}  # the batch probe runs first: it fails, then the length's
    assert facts["static"]["batch"].startswith("linearize_attention needs it (at batch 3:")
    assert facts["static"]["seq"].startswith("linearize_attention needs it (at seq 9:")
    with pytest.raises(ShapeError, match=r"\(batch is static: linearize_attention needs it"):
        om(torch.randint(0, 100, (5, 16)), use_cache=False)
    with pytest.raises(optim.PassError, match="needs a static batch"):
        optim.optimize(z.model, "cpu", z.example_args, example_kwargs=z.example_kwargs,
                       pipeline=["cleanup", "fuse_attention",
                                 {"linearize_attention": {"gate": False, "fit_steps": 5}}],
                       backend="torch", measure_latency=False,
                       dynamic={"batch": (1, 8), "seq": (1, 64)})


def test_an_example_batch_of_one_is_static_with_the_fix(zoo_model):
    z = zoo_model("gpt2")
    om = optim.optimize(z.model, "cpu", (z.example_args[0][:1],),
                        example_kwargs=z.example_kwargs, pipeline="cleanup", backend="torch",
                        measure_latency=False)
    facts = om.report["model"]["shapes"]
    assert list(facts["ranges"]) == ["seq"]
    assert "trace with a batch of 2 or more" in facts["static"]["batch"]


def test_dynamic_ranges_in_a_pipeline_file(tmp_path):
    from optim.runner import run_pipeline_file

    p = tmp_path / "p.yaml"
    p.write_text("version: 1\nmodel: {zoo: bert}\ninputs: {batch: 2, seq: 16}\n"
                 "backend: torch\nmeasure_latency: false\npasses: [cleanup]\n"
                 "dynamic: {batch: [1, 4], seq: null}\n")
    report, = run_pipeline_file(p, out=tmp_path)
    assert report["model"]["shapes"]["ranges"] == {"batch": [1, 4]}
    assert "seq" in report["model"]["shapes"]["static"]


@pytest.mark.parametrize("dynamic, message", [
    ("yes", "dynamic must be True, False or a dict"),
    ({"time": (1, 4)}, r"unknown axis \['time'\]"),
    ({"batch": (0, 4)}, r"dynamic\['batch'\] must be \(min, max\) with 1 <= min <= max"),
    ({"seq": (8, 4)}, r"dynamic\['seq'\] must be"),
])
def test_bad_ranges_are_named(dynamic, message):
    ids = torch.ones(2, 8, dtype=torch.long)
    with pytest.raises(optim.ConfigError, match=message):
        shapes.infer((ids,), {}, dynamic)


def test_seq_range_stops_at_the_position_table_export_does_not_bound():
    """RoBERTa counts positions from the mask (export sees no bound) and offsets them by its
    padding index: 512 table rows hold 510 tokens. Beyond, the model would read past the table
    (an IndexError in torch, garbage from a compiled backend), so the range stops there."""
    from transformers import RobertaConfig, RobertaModel

    torch.manual_seed(0)
    model = RobertaModel(RobertaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                                       num_attention_heads=2, vocab_size=200)).eval()
    example = {"input_ids": torch.randint(3, 200, (2, 12)),
               "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    om = optim.optimize(model, "cpu", example_kwargs=example, pipeline="cleanup",
                        backend="torch", measure_latency=False)
    assert om.report["model"]["shapes"]["ranges"]["seq"] == [1, 510]
    tokens = {"input_ids": torch.randint(3, 200, (1, 510)),
              "attention_mask": torch.ones(1, 510, dtype=torch.long)}
    torch.testing.assert_close(om(**tokens).last_hidden_state,
                               model(**tokens).last_hidden_state, atol=1e-4, rtol=1e-4)
    with pytest.raises(ShapeError, match="seq 1..510"):
        om(input_ids=torch.ones(1, 511, dtype=torch.long),
           attention_mask=torch.ones(1, 511, dtype=torch.long))
