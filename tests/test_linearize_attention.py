"""linearize_attention: the linear forms' math, the graph rewrite, the cost-model gate, refusals."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import optim
import passes.linearize_attention.causal_scan as scan
import passes.linearize_attention.feature_map_fit as feature_fit
import passes.linearize_attention.flow_attention as flow
import passes.linearize_attention.linear_attention as la
from optim.errors import PassError
from tests.passes.small_models import MaskedAttention

METHODS = la.METHODS


def _params(method, heads, d, scale, features=0):
    if method == "performer":
        return {"w": la.performer_projection(d, features or 4 * d, 0)}
    if method == "hedgehog":
        return feature_fit.hedgehog_init(heads, d, features or d, scale)
    if method == "ecoformer":
        return feature_fit.ecoformer_init([torch.randn(1, heads, 32, d)], features or 16)
    return {}


def _linearize(z, opts, backend="torch", kwargs=None):
    # static shapes: these tests are about the rewrite (tests/test_dynamic_shapes.py runs it at
    # other shapes), and causal linear attention would make the driver capture twice
    return optim.optimize(copy.deepcopy(z.model), "cpu", z.example_args,
                          ["cleanup", "fuse_attention", {"linearize_attention": opts}],
                          example_kwargs=kwargs or z.example_kwargs, backend=backend,
                          measure_latency=False, dynamic=False)


def test_chunked_causal_product_matches_the_quadratic_form():
    torch.manual_seed(0)
    a, b = torch.rand(2, 2, 3, 70, 8).unbind(0)
    v = torch.randn(2, 3, 70, 5)
    naive = (a @ b.transpose(-2, -1)).tril() @ v
    for chunk in (1, 16, 64, 70, 128):
        torch.testing.assert_close(scan.causal_product(a, b, v, chunk), naive, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n, chunk", [(40, 8), (8, 8), (5, 8), (17, 4)])
def test_causal_product_carries_a_state_in_and_out_with_exact_gradients(n, chunk):
    # the carried state is what earlier segments' keys contributed: it enters every position
    torch.manual_seed(n)
    a, b = torch.rand(2, 2, 3, n, 4, dtype=torch.float64).unbind(0)
    v = torch.randn(2, 3, n, 5, dtype=torch.float64)
    state = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    out, after = scan.causal_product(a, b, v, chunk, state, with_state=True)
    torch.testing.assert_close(out, (a @ b.transpose(-2, -1)).tril() @ v + a @ state)
    torch.testing.assert_close(after, state + b.transpose(-2, -1) @ v)
    inputs = [t.clone().requires_grad_() for t in (a, b, v, state)]
    assert torch.autograd.gradcheck(
        lambda *t: scan.causal_product(*t[:3], chunk, t[3], with_state=True), inputs)


@pytest.mark.parametrize("shape", [(2, 3, 300, 7), (1, 2, 64, 5), (3, 40, 1), (2, 1, 9),
                                   (4, 130, 6)])
@pytest.mark.parametrize("exclusive", [False, True])
def test_blocked_prefix_sum_is_cumsum(shape, exclusive):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    want = torch.cumsum(x, -2) - (x if exclusive else 0)
    torch.testing.assert_close(scan.prefix_sum(x, exclusive, block=64), want)
    start = torch.randn(*shape[:-2], 1, shape[-1], dtype=torch.float64)  # a carried total
    torch.testing.assert_close(scan.prefix_sum(x, exclusive, block=64, initial=start), want + start)


@pytest.mark.parametrize("method", ["elu", "hedgehog", "performer", "ecoformer", "flow"])
@pytest.mark.parametrize("causal", [False, True])
def test_long_sequences_run_in_segments_with_the_same_result(method, causal, monkeypatch):
    torch.manual_seed(7)
    q, k, v = torch.randn(3, 2, 3, 300, 16, dtype=torch.float64).unbind(0)
    k[..., 200:, :] *= 3  # later keys dominate: performer's carried summary must be rescaled
    valid = torch.ones(2, 1, 300, 1, dtype=torch.float64)
    valid[1, :, 250:] = 0
    p = {name: t.double() for name, t in _params(method, 3, 16, 0.25).items()}
    whole = la.attend(method, q, k, v, valid, causal, 0.25, p, chunk=32)
    monkeypatch.setattr(la, "SEGMENT", 64)  # 300 positions: four segments and a partial one
    monkeypatch.setattr(flow, "FLOW_SEGMENT", 64)
    monkeypatch.setattr(la, "MMAP_THRESHOLD_MAX", 0)  # bidirectional flow: segments at any size
    torch.testing.assert_close(la.attend(method, q, k, v, valid, causal, 0.25, p, chunk=32),
                               whole)


def test_performer_features_are_favor_plus_up_to_cancelling_factors():
    # FAVOR+ as published: φ(x) = exp(w·x' − ‖x'‖²/2)/√m, x' = x·s^½, the attention
    # φ(q)·Σφ(k)vᵀ / φ(q)·Σφ(k); the graph's features drop factors that cancel in that ratio
    torch.manual_seed(6)
    q, k, v = (0.5 * torch.randn(3, 2, 3, 40, 16, dtype=torch.float64)).unbind(0)
    s, w = 0.25, la.performer_projection(16, 64, 0).double()

    def favor(x):
        x = x * s ** 0.5
        return torch.exp(x @ w.T - (x * x).sum(-1, keepdim=True) / 2) / w.shape[0] ** 0.5

    fq, fk = favor(q), favor(k)
    want = (fq @ (fk.transpose(-2, -1) @ v)) / (fq @ fk.sum(-2).unsqueeze(-1))
    for causal in (False, True):
        if causal:
            want = (fq @ fk.transpose(-2, -1)).tril() @ v / \
                (fq @ fk.transpose(-2, -1)).tril().sum(-1, keepdim=True)
        got = la.attend("performer", q, k, v, None, causal, s, {"w": w}, chunk=16)
        torch.testing.assert_close(got, want)


def _flowformer(fq, fk, v, causal, eps=flow.EPS):
    """Flowformer's flow attention written out, with explicit (φ + ε) dot products and an
    [n, n] mask. Causal: every sum over keys or queries is over the prefix and divided by its
    length (the prefix's mean)."""
    n = fq.shape[-2]
    mask = torch.ones(n, n, dtype=fq.dtype)
    mask = mask.tril() if causal else mask
    count = mask.sum(-1, keepdim=True)  # terms in each prefix
    per = count if causal else 1.0  # what a sum is divided by

    def dot(phi, other):  # (φ_i + ε)·(Σ_{j in prefix of i} other_j / per_i + ε)
        return ((phi + eps) * ((mask @ other) / per + eps)).sum(-1, keepdim=True)

    incoming, outgoing = dot(fq, fk), dot(fk, fq)
    sink = dot(fq, fk / outgoing)
    source = dot(fk, fq / incoming).clamp(-1.0, 1.0)
    e = torch.exp(source)
    competition = e / (mask @ e) * count
    agg = ((fq @ fk.transpose(-2, -1)) * mask) @ (v * competition) / per
    return agg / incoming * torch.sigmoid(sink)


@pytest.mark.parametrize("causal", [False, True])
def test_flow_attention_is_flowformers_formula(causal):
    torch.manual_seed(8)
    q, k, v = torch.randn(3, 2, 3, 50, 8, dtype=torch.float64).unbind(0)
    fq, fk = torch.sigmoid(q), torch.sigmoid(k)
    want = _flowformer(fq, fk, v, causal)
    torch.testing.assert_close(flow.flow_attention(fq, fk, v, None, causal, chunk=16), want)


@pytest.mark.parametrize("method", ["elu", "performer", "flow", "hedgehog"])
@pytest.mark.parametrize("causal", [False, True])
def test_gradients_through_the_linear_forms_are_exact(method, causal):
    # attention transfer and LoLCATs stage 2 train through these forms; their in-place
    # feature maps (and performer's detached shift) must leave the gradients exact
    torch.manual_seed(9)
    q, k, v = (0.5 * torch.randn(3, 1, 2, 12, 4, dtype=torch.float64)).unbind(0)
    p = {name: t.double() for name, t in _params(method, 2, 4, 0.5).items()}
    inputs = tuple(t.clone().requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(
        lambda q, k, v: la.attend(method, q, k, v, None, causal, 0.5, p, chunk=4), inputs)


def test_segmented_bidirectional_flow_has_exact_gradients(monkeypatch):
    # long bidirectional flow recomputes its features per pass; training through it (stage 2
    # at long lengths) must still get exact gradients, padding included
    monkeypatch.setattr(flow, "FLOW_SEGMENT", 4)  # 10 positions: three segments
    monkeypatch.setattr(la, "MMAP_THRESHOLD_MAX", 0)  # taken from 32 MB of features on
    calls = []
    segmented = flow.flow_bidirectional_segmented
    monkeypatch.setattr(flow, "flow_bidirectional_segmented",
                        lambda *a: calls.append(1) or segmented(*a))
    torch.manual_seed(10)
    q, k, v = (0.5 * torch.randn(3, 2, 2, 10, 4, dtype=torch.float64)).unbind(0)
    valid = torch.ones(2, 1, 10, 1, dtype=torch.float64)
    valid[1, :, 7:] = 0
    inputs = tuple(t.clone().requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(
        lambda q, k, v: la.attend("flow", q, k, v, valid, False, 0.5, {}), inputs)
    assert calls


@pytest.mark.parametrize("method", ["elu", "performer", "hedgehog"])
def test_recurrent_state_decodes_what_the_causal_form_computes(method):
    # a decoder keeps a fixed [H, d', d+1] state per sequence instead of a growing KV cache
    torch.manual_seed(1)
    q, k, v = torch.randn(3, 2, 4, 33, 16).unbind(0)
    scale, p = 0.25, _params(method, 4, 16, 0.25)
    fq, fk = (la.feature_map(method, x, p, r, scale) for x, r in ((q, "q"), (k, "k")))
    state, steps = None, []
    for t in range(33):
        out, state = la.recurrent_step(state, fq[:, :, t:t + 1], fk[:, :, t:t + 1],
                                       v[:, :, t:t + 1])
        steps.append(out)
    assert state.shape == (2, 4, fq.shape[-1], 17)
    whole = la.attend(method, q, k, v, None, True, scale, p, chunk=8)
    if method != "performer":  # performer's key shift spans the sequence; it cancels in the
        torch.testing.assert_close(torch.cat(steps, 2), whole, rtol=1e-4, atol=1e-5)  # ratio
    torch.testing.assert_close(torch.cat(steps, 2), la.linear_attention(fq, fk, v, True, 8),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("causal", [False, True])
def test_padded_keys_have_no_effect(method, causal):
    torch.manual_seed(2)
    q, k, v = torch.randn(3, 2, 2, 24, 8).unbind(0)
    valid = torch.ones(2, 1, 24, 1)
    valid[1, :, 15:] = 0
    p = _params(method, 2, 8, 8 ** -0.5)
    out = la.attend(method, q, k, v, valid, causal, 8 ** -0.5, p)
    alone = la.attend(method, q[1:, :, :15], k[1:, :, :15], v[1:, :, :15], None, causal,
                      8 ** -0.5, p)
    rows = 15 if causal else 24  # causal: queries past the padding see the same keys anyway
    if causal:
        torch.testing.assert_close(out[1:, :, :rows], alone, rtol=1e-4, atol=1e-5)
    elif method != "flow":  # flow's sink allocation counts queries, padded ones included
        torch.testing.assert_close(out[1:, :, :15], alone[:, :, :15], rtol=1e-4, atol=1e-5)


def test_performer_estimate_improves_with_more_features():
    torch.manual_seed(3)
    q, k, v = torch.randn(3, 1, 2, 64, 16).unbind(0)
    q, k = 0.5 * q, 0.5 * k  # FAVOR+'s variance grows like exp(‖q + k‖²): keep it moderate
    ref = la.softmax_reference(q, k, v, None, False, 0.25)
    cos = [F.cosine_similarity(la.attend("performer", q, k, v, None, False, 0.25,
                                         {"w": la.performer_projection(16, m, 0)}).flatten(),
                               ref.flatten(), 0) for m in (8, 2048)]
    assert cos[1] > cos[0] and cos[1] > 0.98


def test_attention_transfer_fits_spiky_attention():
    torch.manual_seed(4)
    q, k, v = (3 * torch.randn(3, 2, 2, 48, 16)).unbind(0)  # large logits: spiky softmax
    params, fit = feature_fit.fit_hedgehog([(q, k, v, None)], False, 0.25, 16, steps=150)
    assert fit["relative_mse_fitted"] < 0.6 * fit["relative_mse_initial"]
    assert set(params) == {"w_q", "b_q", "w_k", "b_k"}


def test_ecoformer_codes_are_binary_and_fitting_helps():
    torch.manual_seed(5)
    q, k, v = (2 * torch.randn(3, 2, 2, 48, 16)).unbind(0)
    params, fit = feature_fit.fit_ecoformer([(q, k, v, None)], False, 0.25, 16, steps=150)
    codes = la.feature_map("ecoformer", q, params, "q", 0.25)
    assert codes.shape[-1] == 16 and set(codes.unique().tolist()) <= {0.0, 1.0}
    # 16 bits cannot express random spiky attention; fitting still must cut the error
    assert fit["relative_mse_fitted"] < 0.95 * fit["relative_mse_initial"]
    assert set(params) == {"anchors", "proj", "mu", "gamma"}


def test_ecoformer_lowers_to_onnxruntime(zoo_model):
    z = zoo_model("bert")
    opts = {"method": "ecoformer", "gate": False, "fit_steps": 5}
    ref, om = _linearize(z, opts), _linearize(z, opts, backend="onnxruntime")
    a = ref(*z.example_args, **z.example_kwargs).last_hidden_state
    b = om(*z.example_args, **z.example_kwargs).last_hidden_state
    torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name,kind", [("bert", "padding"), ("gpt2", "causal"),
                                       ("llama", "causal"), ("vit", "none"), ("dit", "none")])
def test_every_attention_is_linearized(name, kind, zoo_model):
    z = zoo_model(name)
    om = _linearize(z, {"method": "elu", "gate": False})
    res = om.report.pass_result("linearize_attention")
    assert res["counts"]["attention_linearized"] == z.num_attention_layers
    form = "causal" if kind == "causal" else "bidirectional"
    assert res["counts"][f"elu_{form}"] == z.num_attention_layers
    assert {la_["mask"] for la_ in res["details"]["layers"]} == {kind}
    assert not any("optim.attention" in k for k in om.report["graph"]["after"])
    if kind == "causal":
        layer = res["details"]["layers"][0]
        assert layer["state_values_per_sequence"] == 4 * 16 * 17  # H·d'·(d+1), any length


def test_learned_maps_beat_the_training_free_swap_on_real_weights():
    from optim import zoo
    from optim.zoo.data import sentences
    from optim.zoo.tasks import sentence_batches

    z = zoo.load("minilm", batch=4, seq=64)
    calib = sentence_batches(z.tokenizer, sentences(24)[8:], 4, 64)
    layers = {}
    for method in ("elu", "hedgehog"):
        om = optim.optimize(copy.deepcopy(z.model), "cpu", (), [
            "cleanup", "fuse_attention", {"linearize_attention": {
                "method": method, "gate": False, "fit_steps": 60, "fit_batches": 2}}],
            example_kwargs=z.example_kwargs, calibration=calib, backend="torch",
            measure_latency=False)
        layers[method] = om.report.pass_result("linearize_attention")["details"]["layers"]
    err = {m: sum(la_["attention_relative_mse"] for la_ in ls) for m, ls in layers.items()}
    assert err["hedgehog"] < 0.8 * err["elu"]
    assert all(la_["fit"]["relative_mse_fitted"] < la_["fit"]["relative_mse_initial"]
               for la_ in layers["hedgehog"])


def test_gate_skips_short_sequences_with_both_estimates(zoo_model):
    z = zoo_model("bert")  # 16 tokens
    with pytest.raises(PassError, match="below break-even on cpu"):
        _linearize(z, {"method": "elu", "expect": True})  # else recorded, and skipped


def test_gate_rewrites_long_sequences():
    from optim import zoo

    z = zoo.load("bert", batch=1, seq=4096, max_position_embeddings=4096)
    om = _linearize(z, {"method": "elu"})
    layers = om.report.pass_result("linearize_attention")["details"]["layers"]
    assert all(la_["rewritten"] for la_ in layers)
    assert all(la_["estimated_ms"]["linear"] < la_["estimated_ms"]["softmax"] for la_ in layers)


@pytest.mark.parametrize("mask,reason", [
    (-0.5 * (torch.arange(12)[:, None] - torch.arange(12)).abs().float(), "additive bias"),
    ((torch.arange(12)[:, None] - torch.arange(12)).abs() <= 2, "neither a padding mask"),
])
def test_refuses_masks_it_cannot_express(mask, reason):
    model = MaskedAttention(mask).eval()
    x = torch.randn(1, 12, 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PassError, match=reason):
        optim.optimize(model, "cpu", (x,), ["cleanup", "fuse_attention",
                                            {"linearize_attention": {"gate": False,
                                                                    "expect": True}}],
                       backend="torch", measure_latency=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("backend", ["onnxruntime", "tvm"])
@pytest.mark.parametrize("opts", [{"method": "hedgehog", "fit_steps": 5},
                                  {"method": "performer"}])  # performer: exp2, amax
def test_linearized_graph_lowers_to_other_backends(backend, opts, zoo_model):
    z = zoo_model("gpt2")  # causal: the chunked form (pad, reshape, cumsum) must lower too
    ref = _linearize(z, {**opts, "gate": False})
    om = _linearize(z, {**opts, "gate": False}, backend=backend)
    a = ref(*z.example_args, **z.example_kwargs).logits
    b = om(*z.example_args, **z.example_kwargs).logits
    torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3)


def test_bad_options_are_named(zoo_model):
    z = zoo_model("vit")
    with pytest.raises(optim.ConfigError, match="must be one of"):
        _linearize(z, {"method": "cosformer"})
    with pytest.raises(optim.ConfigError, match="Did you mean 'fit_steps'"):
        _linearize(z, {"fit_step": 3})
    with pytest.raises(optim.ConfigError, match="chunk must be >= 0"):
        _linearize(z, {"chunk": -1})


def test_shipped_yaml_pipeline_runs(tmp_path, shipped_pipeline):
    from optim.runner import run_pipeline_file

    path = shipped_pipeline("long_context_linear", inputs__seq=2048,
                            linearize_attention__fit_steps=15, dynamic=False,
                            measure_latency=False)
    report, = run_pipeline_file(path, out=tmp_path)
    res = next(p for p in report["passes"] if p["name"] == "linearize_attention")
    assert res["counts"]["hedgehog_causal"] == 2  # 2048 tokens: the gate lets both through
    for layer in res["details"]["layers"]:
        assert layer["fit"]["relative_mse_fitted"] < layer["fit"]["relative_mse_initial"]
        assert layer["state_values_per_sequence"] < layer["kv_cache_values_per_sequence"]
    assert (tmp_path / "long_context_linear-cpu.html").exists()


def test_low_rank_finetune_cuts_output_error_and_folds_away(zoo_model):
    """LoLCATs stage 2 on real weights: the output error drops, and no adapter op remains."""
    z = zoo_model("digits_vit")
    base = {"method": "elu", "gate": False}
    plain = _linearize(z, base)
    tuned = _linearize(z, {**base, "finetune_steps": 30, "finetune_lr": 1e-2})
    ft = tuned.report.pass_result("linearize_attention")["details"]["finetune"]
    assert ft["kept"] and ft["relative_error_after"] < 0.7 * ft["relative_error_before"]
    assert tuned.report["graph"]["after"] == plain.report["graph"]["after"]  # same ops
    ref = optim.numerics.tensor_leaves(z.model(*z.example_args, **z.example_kwargs))[0]
    err = {name: float((optim.numerics.tensor_leaves(om(*z.example_args, **z.example_kwargs))[0]
                        - ref).norm()) for name, om in (("plain", plain), ("tuned", tuned))}
    assert err["tuned"] < err["plain"]


def test_host_memory_hint_only_where_a_rewritten_layer_passes_32_mb():
    from passes.linearize_attention import host_memory_hint

    def layer(length, rewritten=True):
        return {"batch": 1, "heads": 12, "head_dim": 64, "q_len": length, "k_len": length,
                "rewritten": rewritten}

    assert host_memory_hint([layer(8192)]) is None  # 24 MB: glibc reuses it
    assert host_memory_hint([layer(16384, rewritten=False)]) is None  # softmax kept: not ours
    hint = host_memory_hint([layer(512), layer(16384)])
    assert "48 MB" in hint and "--keep-freed-memory" in hint
