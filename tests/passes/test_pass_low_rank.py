"""low_rank, one pass on small graphs: counts, one linear becoming two with the factor shapes the
rank implies, a fidelity floor that follows the kept energy, the layers it must leave dense (with
the reason), and the options that set the rank."""

from __future__ import annotations

import pytest
import torch

from optim.errors import ConfigError, PassError
from optim.ir import get_constant
from optim.testing import capture_example, capture_zoo, run_pass

LINEAR = torch.ops.aten.linear.default


def _spectrum(out_f: int, in_f: int, sigma: list[float], seed: int) -> torch.Tensor:
    """A weight [out_f, in_f] with exactly the singular values `sigma` (random directions)."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(out_f, out_f, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(in_f, in_f, generator=g, dtype=torch.float64))
    m = len(sigma)
    return ((u[:, :m] * torch.tensor(sigma, dtype=torch.float64)) @ v[:, :m].T).float()


# σ_i = 4·2^-i: the first r keep 1 - 4^-r of the energy, so energy 0.9 -> rank 2, 0.99 -> 4,
# 0.999 -> 5, and the relative weight error is 2^-r (≈ 6 dB of output SQNR per rank on white x)
GEOMETRIC = _spectrum(96, 128, [4 * 2.0 ** -i for i in range(96)], seed=0)


class _One(torch.nn.Module):
    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.fc = torch.nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            self.fc.weight.copy_(w)

    def forward(self, x):
        return self.fc(x)


class _NearMiss(torch.nn.Module):
    """Every layer reads white inputs (channel RMS ≈ 1), so activation-aware SVD sees the
    weights' own spectra."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(128, 96)  # geometric spectrum: factorized
        self.flat = torch.nn.Linear(128, 128)  # random init: flat spectrum, would cost more
        self.small = torch.nn.Linear(128, 32)  # 32 outputs < min_features 64
        self.classifier = torch.nn.Linear(96, 96)  # in the skip list
        with torch.no_grad():
            self.fc.weight.copy_(GEOMETRIC)

    def forward(self, x):
        return self.classifier(self.fc(x)), self.flat(x), self.small(x)


class _Chain(torch.nn.Module):
    """A random 96x96 layer reading the geometric layer's output: a few loud channels."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(128, 96)
        self.flat = torch.nn.Linear(96, 96)
        with torch.no_grad():
            self.fc.weight.copy_(GEOMETRIC)

    def forward(self, x):
        return self.flat(self.fc(x))


def _x(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def bert():
    return capture_zoo("bert")  # 2 layers: q/k/v/o 64x64, intermediate 128x64, output 64x128


@pytest.fixture(scope="module")
def halved(bert):
    gm, z = bert
    return run_pass("low_rank", gm, z.example_args, z.example_kwargs, options={"flops": 0.5})


@pytest.fixture(scope="module")
def geometric():
    torch.manual_seed(0)
    x = _x(4, 16, 128)
    return capture_example(_One(GEOMETRIC).eval(), (x,)), (x,)


def test_counts_on_bert(halved):
    assert [r.name for r in halved.results] == ["low_rank"]  # no prerequisite
    assert halved.result.counts == {"linears_factorized": 12}
    assert halved.result.skipped == []
    # rank = int(flops · in · out / (in + out)): 16 for 64x64, 21 for 128x64 and 64x128
    assert [x["rank"] for x in halved.result.details["layers"]] == [16, 16, 16, 16, 21, 21] * 2
    assert all(x["flops_fraction"] <= 0.5 for x in halved.result.details["layers"])


def test_histogram_one_linear_becomes_two(halved):
    assert halved.ops_added()["aten.linear"] == 12
    assert halved.histogram_after["aten.linear"] == 24
    # nothing else is added (export's dead arange/unsqueeze go with dead-code elimination)
    assert {k for k, v in halved.ops_added().items() if v > 0} == {"aten.linear"}


def test_factors_replace_the_dense_weight(halved):
    gm = halved.gm
    names = [n.target for n in gm.graph.nodes if n.op == "get_attr"]
    assert not any(t.endswith("query.weight") or t.endswith("dense.weight") for t in names)
    ranks = {x["where"]: x["rank"] for x in halved.result.details["layers"]}
    for n in gm.graph.nodes:
        if n.target is LINEAR and str(n.args[1].target).endswith("_lr_up"):
            down_node = n.args[0]
            assert down_node.target is LINEAR and str(down_node.args[1].target).endswith("_lr_down")
            up, down = get_constant(gm, n.args[1]), get_constant(gm, down_node.args[1])
            assert up.shape[1] == down.shape[0] in set(ranks.values())
            assert len(down_node.args) == 2  # the bias stays on the second (up) factor
    q = get_constant(gm, next(n for n in gm.graph.nodes
                              if n.target == "encoder_layer_0_attention_self_query_weight_lr_down"))
    assert q.shape == (16, 64)


def test_default_energy_on_bert_leaves_the_square_projections_dense(bert):
    gm, z = bert
    run = run_pass("low_rank", gm, z.example_args, z.example_kwargs)  # energy 0.9
    # random weights: 0.9 of the energy needs rank 32-33 of 64, no cheaper than 64x64 dense
    assert run.result.counts == {"linears_factorized": 6}
    assert sorted(s.where for s in run.result.skipped) == sorted(
        f"encoder.layer.{i}.attention.self.{p}" for i in (0, 1) for p in ("query", "key", "value"))
    assert all(s.reason.endswith("keeps 0.9 of the energy but would cost more than the dense "
                                 "64×64 layer") for s in run.result.skipped)
    assert run.histogram_after["aten.linear"] == 6 + 2 * 6


def test_an_exactly_low_rank_weight_is_recovered():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(128, 8, generator=g) @ torch.randn(8, 96, generator=g)  # rank 8
    x = _x(4, 10, 96)
    gm = capture_example(_One(w).eval(), (x,))
    run = run_pass("low_rank", gm, (x,), options={"energy": 0.999999})
    (layer,) = run.result.details["layers"]
    assert layer["rank"] == 8 and layer["relative_weight_error"] < 1e-5
    assert run.sqnr_db() > 60.0


def test_numerics_floor_follows_the_kept_energy(geometric):
    gm, args = geometric
    sqnr = {}
    for energy, rank in ((0.9, 2), (0.99, 4), (0.999, 5)):
        run = run_pass("low_rank", gm, args, options={"energy": energy})
        (layer,) = run.result.details["layers"]
        assert layer["rank"] == rank
        assert layer["relative_weight_error"] == pytest.approx(2.0 ** -rank, rel=0.01)
        sqnr[energy] = run.sqnr_db()
        # ≈ 6.02 dB per kept rank on white inputs (measured 11.9, 22.8, 28.6)
        assert 6.02 * rank - 2.0 <= sqnr[energy] <= 6.02 * rank + 2.0
    assert sqnr[0.9] < sqnr[0.99] < sqnr[0.999]


def test_flops_budget_sets_the_rank(geometric):
    gm, args = geometric
    run = run_pass("low_rank", gm, args, options={"flops": 0.1})
    (layer,) = run.result.details["layers"]
    assert layer["rank"] == int(0.1 * 96 * 128 / (96 + 128)) == 5
    up = next(get_constant(run.gm, n) for n in run.gm.graph.nodes
              if n.op == "get_attr" and n.target.endswith("_lr_up"))
    assert up.shape == (96, 5)


def test_near_misses_stay_dense_with_the_reason():
    torch.manual_seed(0)
    x = _x(4, 16, 128)
    gm = capture_example(_NearMiss().eval(), (x,))
    run = run_pass("low_rank", gm, (x,))
    assert run.result.counts == {"linears_factorized": 1}
    reasons = {s.where: s.reason for s in run.result.skipped}
    assert set(reasons) == {"flat", "small", "classifier"}
    assert reasons["small"] == "32×128 is below min_features 64"
    assert reasons["classifier"] == "in the skip list (output heads stay dense)"
    assert reasons["flat"].endswith("would cost more than the dense 128×128 layer")
    assert run.histogram_after["aten.linear"] == 3 + 2
    # min_features 16 and an empty skip list: `small` (32×128: rank 25 breaks even) and
    # `classifier` (reading fc's few loud channels) are factorized too
    tried = run_pass("low_rank", gm, (x,), options={"min_features": 16, "skip": []})
    assert tried.result.counts == {"linears_factorized": 3}
    assert [s.where for s in tried.result.skipped] == ["flat"]


def test_activation_aware_ranks_by_the_channels_the_inputs_use():
    torch.manual_seed(0)
    x = _x(4, 16, 128)
    gm = capture_example(_Chain().eval(), (x,))
    aware = run_pass("low_rank", gm, (x,))
    plain = run_pass("low_rank", gm, (x,), options={"activation_aware": False})
    # W·diag(rms) of `flat` is far from flat: 0.9 of its energy fits in a rank that pays
    assert aware.result.counts == {"linears_factorized": 2}
    assert aware.result.details["layers"][1]["where"] == "flat"
    assert aware.result.details["layers"][1]["rank"] < 48
    assert plain.result.counts == {"linears_factorized": 1}
    assert [s.where for s in plain.result.skipped] == ["flat"]


def test_a_graph_with_nothing_worth_factorizing_is_an_error():
    torch.manual_seed(0)
    x = _x(2, 96)
    gm = capture_example(_One(torch.randn(128, 96)).eval(), (x,))
    with pytest.raises(PassError, match=r"expected \['linears_factorized'\] > 0.*"
                                        r"would cost more than the dense 128×96 layer") as e:
        run_pass("low_rank", gm, (x,), options={"energy": 0.99})
    assert isinstance(e.value.cause, ConfigError) and e.value.before == []


def test_bad_options_are_named(geometric):
    gm, args = geometric
    with pytest.raises(ConfigError, match=r"energy must be in \(0, 1\]"):
        run_pass("low_rank", gm, args, options={"energy": 0})
    with pytest.raises(ConfigError, match=r"flops must be a fraction in \(0, 1\)"):
        run_pass("low_rank", gm, args, options={"flops": 1.5})
