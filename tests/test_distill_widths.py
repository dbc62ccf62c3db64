"""distill_widths: width-aware training lowers every width's error and loses nothing when it
does not; the attention op has gradients."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import optim
import optim.ops  # registers torch.ops.optim
from optim.render import to_html


def _batches(z, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    (x,) = z.example_args
    return [((torch.randn(x.shape, generator=g),), {}) for _ in range(n)]


def _distill(z, opts, batches):
    return optim.optimize(copy.deepcopy(z.model), "cpu", z.example_args,
                          ["cleanup", "fuse_attention", "dynamic_width",
                           {"distill_widths": opts}],
                          calibration=batches, backend="torch", measure_latency=False)


def test_training_lowers_the_error_of_every_narrow_width(zoo_model):
    z = zoo_model("vit")
    batches = _batches(z, 4)
    om = _distill(z, {"widths": [1.0, 0.5, 0.25], "steps": 40, "lr": 1e-3}, batches)
    res = om.report.pass_result("distill_widths")
    d = res["details"]
    assert d["kept"] and d["held_out_batches"] == 1 and d["train_batches"] == 3
    before, after = d["relative_error_before"], d["relative_error_after"]
    for w in ("0.5", "0.25"):
        assert after[w] < 0.7 * before[w], (w, before[w], after[w])
    assert res["counts"]["weights_trained"] == d["weights_trained"] > 0
    assert "distill_widths" in to_html(om.report.data, plots=False)
    # the trained weights are what every width runs: the held-out error is reproduced
    held = batches[-1][0][0]
    with torch.no_grad():
        ref = z.model(held).logits
    for w in ("0.5", "0.25"):
        got = om.at_width(float(w))(held).logits
        rel = float((got - ref).pow(2).sum() / ref.pow(2).sum())
        assert rel == pytest.approx(after[w], rel=1e-3)


def test_a_failed_training_leaves_the_graph_exact(zoo_model):
    # one huge Adam step makes things worse: the weights must come back unchanged
    z = zoo_model("vit")
    om = _distill(z, {"widths": [1.0, 0.5], "steps": 1, "lr": 0.9}, _batches(z, 2))
    res = om.report.pass_result("distill_widths")
    assert not res["details"]["kept"] and "weights_trained" not in res["counts"]
    assert any("did not lower" in s["reason"] for s in res["skipped"])
    (x,) = z.example_args
    torch.testing.assert_close(om(x).logits, z.model(x).logits, atol=1e-4, rtol=1e-4)


def test_it_gets_dynamic_width_inserted_and_needs_sane_options(zoo_model):
    z = zoo_model("vit")
    pipe = optim.Pipeline.build(["cleanup", "fuse_attention", "distill_widths"])
    assert pipe.names == ["cleanup", "fuse_attention", "dynamic_width", "distill_widths"]
    assert pipe.steps[2].inserted_for == "distill_widths"
    with pytest.raises(optim.ConfigError, match="at least two"):
        _distill(z, {"widths": [0.5]}, _batches(z, 2))


@pytest.mark.parametrize("kv_heads,causal", [(4, False), (2, True)])
def test_attention_op_gradients_match_sdpa(kv_heads, causal):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 9, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, kv_heads, 9, 8, generator=g, dtype=torch.float64,
                        requires_grad=True) for _ in range(2))
    mask = None if causal else torch.randn(2, 1, 9, 9, generator=g, dtype=torch.float64)
    ours = torch.autograd.grad(torch.ops.optim.attention(q, k, v, mask, 0.3, causal).sum(),
                               (q, k, v))
    ref = torch.autograd.grad(F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=0.3, is_causal=causal,
        enable_gqa=kv_heads != 4).sum(), (q, k, v))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)
