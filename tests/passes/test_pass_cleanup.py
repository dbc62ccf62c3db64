"""cleanup, one pass on small graphs: what each rule removes, what it must keep, exactness."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from optim.testing import capture_example, capture_zoo, run_pass

aten = torch.ops.aten


class _NoOps(torch.nn.Module):
    """One of each inference no-op, next to look-alikes that are not no-ops."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        self.drop = torch.nn.Dropout(0.1)

    def forward(self, x):
        y = self.drop(self.lin(x))  # eval dropout: removed
        y = y.to(torch.float32)  # same-dtype cast: removed
        y = y.clone()  # copy nothing mutates: removed
        z = y.to(torch.float64)  # a real cast: kept
        w = y.clone(memory_format=torch.contiguous_format)  # explicit layout: kept
        c = y.clone()
        c.add_(1.0)  # the copy is written into: kept
        return z.float() + w + c


class _LookAlikes(torch.nn.Module):
    """Only look-alikes: removing any of them changes the outputs or the semantics."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        a = self.lin(x)
        d = F.dropout(a, 0.0, training=True)  # training-mode dropout
        b = a.clone()
        a.add_(1.0)  # the source of `b` is mutated after the copy: b must not alias a
        c = d.clone()
        c.mul_(2.0)  # the copy itself is mutated
        e = a.clone(memory_format=torch.contiguous_format)
        return a + b + c + e


@pytest.fixture(scope="module")
def no_ops():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8)
    return capture_example(_NoOps().eval(), (x,), {}), (x,)


@pytest.fixture(scope="module")
def bert():
    return capture_zoo("bert")


def _targets(gm):
    return [(n.target, n.args[1:], dict(n.kwargs)) for n in gm.graph.nodes
            if n.op == "call_function"]


def test_counts_one_per_rule_on_a_hand_written_graph(no_ops):
    gm, args = no_ops
    run = run_pass("cleanup", gm, args)
    # 3 metadata asserts are what export emits for the three .to() calls
    assert run.result.counts == {"dropout_removed": 1, "cast_removed": 1, "copy_removed": 1,
                                 "assert_removed": 3}
    assert run.result.changed and run.result.skipped == []
    assert [r.name for r in run.results] == ["cleanup"]  # no prerequisites


def test_histogram_loses_exactly_the_no_ops(no_ops):
    gm, args = no_ops
    run = run_pass("cleanup", gm, args)
    assert run.ops_added() == {"aten._assert_tensor_metadata": -3, "aten.dropout": -1,
                               "aten.to": -1, "aten.clone": -1}
    kept = _targets(run.gm)
    assert (aten.to.dtype, (torch.float64,), {}) in kept  # the real cast
    assert (aten.clone.default, (), {"memory_format": torch.contiguous_format}) in kept
    assert any(t is aten.add_.Tensor for t, _, _ in kept)
    # the mutated copy survives: add_ still writes into a clone, not into the shared value
    add_ = next(n for n in run.gm.graph.nodes if n.target is aten.add_.Tensor)
    assert add_.args[0].target is aten.clone.default


def test_numerics_are_exact(no_ops):
    gm, args = no_ops
    run = run_pass("cleanup", gm, args)
    assert run.max_abs_error() <= 1e-6  # the pass's Exact(atol=1e-6) contract


def test_look_alikes_are_kept_and_numerics_hold():
    torch.manual_seed(1)
    x = torch.randn(2, 3, 8)
    gm = capture_example(_LookAlikes().eval(), (x,), {})
    run = run_pass("cleanup", gm, (x,))
    assert not run.result.changed and run.result.counts == {} and run.result.skipped == []
    assert run.histogram_after == run.histogram_before
    assert run.histogram_after["aten.clone"] == 3 and run.histogram_after["aten.dropout"] == 1
    # had the copy of the later-mutated value been dropped, b would alias a: error 1.0
    assert run.max_abs_error() == 0.0


def test_counts_and_histogram_on_bert(bert):
    gm, z = bert
    run = run_pass("cleanup", gm, z.example_args, z.example_kwargs)
    assert run.result.counts == {"dropout_removed": 5, "assert_removed": 3, "cast_removed": 2}
    for gone in ("aten.dropout", "aten._assert_tensor_metadata"):
        assert gone in run.histogram_before and gone not in run.histogram_after
    # everything that computes stays
    for op in ("aten.linear", "aten.layer_norm", "aten.scaled_dot_product_attention"):
        assert run.histogram_after[op] == run.histogram_before[op]
    assert run.max_abs_error() <= 1e-6


def test_second_run_finds_nothing(bert):
    gm, z = bert
    once = run_pass("cleanup", gm, z.example_args, z.example_kwargs)
    twice = run_pass("cleanup", once.gm, z.example_args, z.example_kwargs)
    assert not twice.result.changed and twice.result.counts == {}
    assert twice.histogram_after == once.histogram_after


class _HandLinears(torch.nn.Module):
    """Linears written out (`x @ W.T + b`, as Falcon does), next to matmuls that are not."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.w1, self.b1 = torch.nn.Parameter(torch.randn(16, 8)), torch.nn.Parameter(
            torch.randn(16))
        self.w2 = torch.nn.Parameter(torch.randn(4, 16))
        self.w3 = torch.nn.Parameter(torch.randn(4, 16))  # x @ W, not transposed: kept

    def forward(self, x):
        h = x @ self.w1.T + self.b1  # matmul + bias: one linear
        y = torch.matmul(h, self.w2.transpose(0, 1))  # no bias
        scores = h @ h.transpose(-1, -2)  # two activations: kept
        return y @ self.w3, scores


def test_hand_written_linears_become_linears():
    x = torch.randn(2, 5, 8)
    gm = capture_example(_HandLinears(), (x,))
    run = run_pass("cleanup", gm, (x,))
    assert run.result.counts["linear_canonicalized"] == 2
    assert run.histogram_after.get("aten.linear") == 2 and "aten.numpy_T" not in run.histogram_after
    assert run.max_abs_error() < 1e-5
    quantized = run_pass("quantize", gm, (x,), options={"min_features": 1})
    assert quantized.result.counts["linear_quantized"] == 2
