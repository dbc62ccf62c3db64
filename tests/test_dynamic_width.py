"""dynamic_width: importance ordering is exact, every width is a prefix, head counts in views."""

from __future__ import annotations

import copy

import pytest
import torch

import optim
from optim.ir import get_constant
from passes.common.linears import weight_and_bias, weight_axis


def _nest(z, opts=None, backend="torch"):
    # static shapes: these tests are about widths (other shapes: tests/test_dynamic_shapes.py)
    return optim.optimize(copy.deepcopy(z.model), "cpu", z.example_args,
                          ["cleanup", "fuse_attention", {"dynamic_width": opts or {}}],
                          example_kwargs=z.example_kwargs, backend=backend,
                          measure_latency=False, dynamic=False)


def _first(out):
    return out[0] if isinstance(out, tuple) else next(iter(out.values()))


@pytest.mark.parametrize("name,heads", [("bert", True), ("vit", True), ("llama", True),
                                        ("dit", True), ("gpt2", False)])
def test_ordering_is_a_permutation(name, heads, zoo_model):
    z = zoo_model(name)
    om = _nest(z)
    res = om.report.pass_result("dynamic_width")
    assert res["details"]["permutation_max_abs_error"] <= 1e-5
    layers = z.num_attention_layers
    assert res["counts"]["layers_nested"] == layers
    assert res["counts"]["mlp_neurons_ordered"] == layers
    assert res["counts"].get("attention_heads_ordered", 0) == (layers if heads else 0)
    if not heads:  # GPT-2 projects q, k and v in one matmul
        assert all("fused q/k/v projection" in s["reason"] for s in res["skipped"])
    flops = [w["flops_fraction"] for w in res["details"]["widths"]]
    assert flops == sorted(flops, reverse=True) and flops[0] == 1.0


def test_a_width_is_the_full_model_without_the_last_units(zoo_model):
    # running the first half of the heads and neurons equals the full graph with the other
    # half's output-projection columns zeroed: slicing changed nothing else
    z = zoo_model("llama")  # GQA: heads move with their key/value head
    om = _nest(z)
    plan = om.report.pass_result("dynamic_width")["details"]["plan"]
    ref_gm = copy.deepcopy(om.graph)
    nodes = {n.name: n for n in ref_gm.graph.nodes}
    for layer in plan["layers"]:
        h, m = layer["heads"], layer["mlp"]
        keep_heads = (h["kv_heads"] + 1) // 2 * h["heads"] // h["kv_heads"]
        for proj, keep in ((nodes[h["o"]], keep_heads * h["head_dim"]),
                           (nodes[m["down"]], m["neurons"] // 2)):
            w = get_constant(ref_gm, weight_and_bias(proj)[0])
            w.data.narrow(weight_axis(proj, "in"), keep, w.shape[weight_axis(proj, "in")] - keep
                          ).zero_()
    half = om.at_width(0.5)(*z.example_args, **z.example_kwargs).logits
    torch.testing.assert_close(half, ref_gm(*z.example_args, **z.example_kwargs).logits,
                               rtol=1e-4, atol=1e-5)
    full = om.at_width(1.0)(*z.example_args, **z.example_kwargs).logits
    torch.testing.assert_close(full, om(*z.example_args, **z.example_kwargs).logits)


def test_head_counts_in_reshapes_are_rewritten(zoo_model):
    from passes.common.nested_width import at_width

    z = zoo_model("dit")  # diffusers writes the head count into its views: view(B, -1, 2, D)
    om = _nest(z)
    plan = om.report.pass_result("dynamic_width")["details"]["plan"]
    heads, d = plan["layers"][0]["heads"]["heads"], plan["layers"][0]["heads"]["head_dim"]
    views = lambda g: [list(n.args[1]) for n in g.graph.nodes  # noqa: E731
                       if n.target in (torch.ops.aten.view.default, torch.ops.aten.reshape.default)]
    assert any(v[-2:] == [heads, d] for v in views(om.graph))
    gm = at_width(om.graph, plan, 0.5, z.example_args, z.example_kwargs)
    assert not any(v[-2:] == [heads, d] for v in views(gm))  # no stale head count
    assert any(v[-2:] == [heads // 2, d] for v in views(gm))
    name = plan["layers"][0]["heads"]["q"]
    q_half = next(n for n in gm.graph.nodes if n.name == name)
    q_full = next(n for n in om.graph.graph.nodes if n.name == name)
    half_w, full_w = get_constant(gm, q_half.args[1]), get_constant(om.graph, q_full.args[1])
    assert half_w.shape[0] * 2 == full_w.shape[0] == heads * d
    assert half_w.data_ptr() == full_w.data_ptr()  # a view of the first rows, not a copy


def test_mix_and_match_and_bad_widths(zoo_model):
    z = zoo_model("vit")
    om = _nest(z)
    out = om.at_width([1.0, 0.25])(*z.example_args)  # per layer
    assert out.logits.shape == om(*z.example_args).logits.shape
    with pytest.raises(optim.ConfigError, match="list of 2"):
        om.at_width([1.0, 0.5, 0.5])
    with pytest.raises(optim.ConfigError, match=r"\(0, 1\]"):
        om.at_width(0)


def test_at_width_needs_the_pass(zoo_model):
    z = zoo_model("vit")
    om = optim.optimize(copy.deepcopy(z.model), "cpu", z.example_args,
                        ["cleanup", "fuse_attention"], backend="torch", measure_latency=False)
    with pytest.raises(optim.ConfigError, match="needs the dynamic_width pass"):
        om.at_width(0.5)


def test_timestep_schedule_picks_the_width(zoo_model):
    z = zoo_model("dit")
    om = _nest(z)
    sched = om.timestep_widths([(500, 1.0), (0, 0.5)])  # DyDiT: narrow at low noise
    kwargs = dict(z.example_kwargs)
    for t, w in ((900, 1.0), (100, 0.5)):
        kwargs["timestep"] = torch.full_like(z.example_kwargs["timestep"], t)
        torch.testing.assert_close(_first(sched(*z.example_args, **kwargs)),
                                   _first(om.at_width(w)(*z.example_args, **kwargs)))
    assert not torch.equal(_first(om.at_width(0.5)(*z.example_args, **kwargs)),
                           _first(om.at_width(1.0)(*z.example_args, **kwargs)))


def test_a_batch_of_mixed_timesteps_runs_each_element_at_its_own_width(zoo_model):
    """Issue 24: [500, 20] used to run the whole batch at the first element's width."""
    z = zoo_model("dit")
    om = _nest(z)
    sched = om.timestep_widths([(500, 1.0), (0, 0.5)])
    kwargs = dict(z.example_kwargs)
    kwargs["timestep"] = torch.tensor([20, 900][:len(kwargs["timestep"])]).to(
        z.example_kwargs["timestep"].dtype)
    got = _first(sched(*z.example_args, **kwargs))
    for i, w in enumerate((0.5, 1.0)):  # row i of the whole batch run at row i's width
        want = _first(om.at_width(w)(*z.example_args, **kwargs))[i]
        torch.testing.assert_close(got[i], want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got[0], _first(om.at_width(1.0)(*z.example_args, **kwargs))[0])


def test_widths_lower_to_onnxruntime(zoo_model):
    z = zoo_model("bert")
    ref = _nest(z)
    om = _nest(z, backend="onnxruntime")
    a = ref.at_width(0.5)(*z.example_args, **z.example_kwargs).last_hidden_state
    b = om.at_width(0.5)(*z.example_args, **z.example_kwargs).last_hidden_state
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_widths_survive_save_and_load(backend, zoo_model, tmp_path):
    z = zoo_model("llama")  # GQA heads: the plan's head groups must map onto the loaded graph
    om = _nest(z, backend=backend)
    om.save(tmp_path / "m")
    again = optim.load(tmp_path / "m")
    assert again.backend == backend
    # each width is a lowering of its own: ONNX Runtime checks the per-layer one only
    for width in (0.5, [1.0, 0.5]) if backend == "torch" else ([1.0, 0.5],):
        a = _first(om.at_width(width)(*z.example_args, **z.example_kwargs))
        b = _first(again.at_width(width)(*z.example_args, **z.example_kwargs))
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_bad_options_are_named(zoo_model):
    z = zoo_model("vit")
    with pytest.raises(optim.ConfigError, match=r"widths must be numbers in \(0, 1\]"):
        _nest(z, {"widths": [1.5]})
    with pytest.raises(optim.ConfigError, match="nothing to nest"):
        _nest(z, {"heads": False, "mlp": False})


def test_report_shows_each_width(zoo_model):
    from optim.render import to_html

    om = _nest(zoo_model("vit"), {"widths": [1.0, 0.5]})
    page = to_html(om.report.data, plots=False)
    assert "dynamic_width: widths" in page and "flops_fraction" in page


def test_real_minilm_permutation_is_exact_in_float64():
    # real weights, real sentences: in float64 what is left of the reordering is rounding
    from optim import zoo
    from optim.zoo.data import sentences
    from optim.zoo.tasks import sentence_batches

    z = zoo.load("minilm", batch=4, seq=32)
    batches = sentence_batches(z.tokenizer, sentences(8), 4, 32)
    model = copy.deepcopy(z.model).double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    om = optim.optimize(model, "cpu", (), ["cleanup", "fuse_attention", "dynamic_width"],
                        example_kwargs=batches[0][1], calibration=batches[1:],
                        backend="torch", measure_latency=False)
    res = om.report.pass_result("dynamic_width")
    assert res["counts"]["attention_heads_ordered"] == 6
    assert res["details"]["permutation_max_abs_error"] < 1e-10
    assert res["details"]["permutation_max_rel_error"] < 1e-11
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_shipped_yaml_pipeline_runs(tmp_path, shipped_pipeline):
    from optim.runner import run_pipeline_file

    path = shipped_pipeline("minilm_widths", inputs__count=16, inputs__seq=32,
                            distill_widths__steps=6, dynamic=False,
                            measure_latency=False)
    # `out` as a str, as a script passes it (a Path works too)
    report, = run_pipeline_file(path, out=str(tmp_path))
    res = next(p for p in report["passes"] if p["name"] == "dynamic_width")
    assert res["counts"] == {"attention_heads_ordered": 6, "mlp_neurons_ordered": 6,
                             "layers_nested": 6}
    assert [w["width"] for w in res["details"]["widths"]] == [1.0, 0.75, 0.5]
    # exact at full width up to fp32 summation order: 2.8e-5 of the largest output of this
    # 6-layer BERT on an AMD EPYC (1.7e-4 absolute); in float64 it is rounding (test above)
    assert res["details"]["permutation_max_rel_error"] < 1e-4
    trained = next(p for p in report["passes"] if p["name"] == "distill_widths")["details"]
    assert trained["kept"] and trained["held_out_batches"] == 1
    for w in ("0.75", "0.5"):  # held-out sentences
        assert trained["relative_error_after"][w] < trained["relative_error_before"][w]


def test_node_profile_tells_narrowed_nodes_from_fixed_ones(zoo_model):
    # the split benchmarks/dynamic_width.py reports: layer norms keep their shapes at a
    # narrower width, the query projections do not, and every node is timed once per run
    from optim.measure import node_times
    from passes.common.nested_width import at_width

    z = zoo_model("bert")
    om = _nest(z)
    plan = om.report.pass_result("dynamic_width")["details"]["plan"]
    profiles = {w: node_times(at_width(om.graph, plan, w, *om.example), *om.example, runs=2)
                for w in (1.0, 0.5)}
    full, half = profiles[1.0], profiles[0.5]
    calls = [n for n in om.graph.graph.nodes if n.op == "call_function"]
    assert set(full) == {n.name for n in calls}
    assert all(r["ms"] > 0 for r in full.values())
    norms = [n.name for n in calls if "layer_norm" in str(n.target)]
    queries = [layer["heads"]["q"] for layer in plan["layers"]]
    assert norms and queries
    for name in norms:
        assert (half[name]["inputs"], half[name]["shape"]) == \
            (full[name]["inputs"], full[name]["shape"])
    for name in queries:
        assert half[name]["shape"][-1] * 2 == full[name]["shape"][-1]
