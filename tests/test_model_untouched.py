"""optimize() hands the user's model back as it came: every module's train/eval flag and every
buffer bit for bit, even when the model updates a buffer in place as it runs and the user had
set submodules to different modes (issue 23, item 5)."""

from __future__ import annotations

import pytest
import torch

import optim
from optim.errors import OptimError
from optim.model_state import untouched


class _Counting(torch.nn.Module):
    """Counts its calls in a buffer, in place (as running statistics and caches do)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(8, 8)
        self.drop = torch.nn.Dropout(0.1)
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(self, x):
        self.calls.add_(1)
        return self.drop(self.lin(x))


def _modes(m):
    return {name: sub.training for name, sub in m.named_modules()}


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_modes_and_buffers_come_back_bit_for_bit(backend):
    model = _Counting()
    model.train()
    model.lin.eval()  # the user's own mix of modes
    model.calls.fill_(7)
    modes, state = _modes(model), {k: v.clone() for k, v in model.state_dict().items()}
    optim.optimize(model, "cpu", (torch.randn(2, 8),), pipeline="cleanup", backend=backend,
                   measure_latency=True)
    assert _modes(model) == modes
    after = model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)
    assert int(model.calls) == 7


def test_a_failed_optimize_restores_too(monkeypatch):
    import optim.api

    def failing_lower(*args, **kwargs):  # after the model has been run and captured
        raise OptimError("lowering failed")

    monkeypatch.setattr(optim.api, "lower", failing_lower)
    model = _Counting()
    model.calls.fill_(3)
    with pytest.raises(OptimError, match="lowering failed"):
        optim.optimize(model, "cpu", (torch.randn(2, 8),), pipeline="cleanup",
                       measure_latency=False)
    assert int(model.calls) == 3 and model.training


def test_a_buffer_replaced_by_another_object_is_put_back():
    model = _Counting()
    original = model.calls
    with untouched(model):
        model.calls = torch.ones(())
    assert model.calls is original and int(model.calls) == 0


def test_a_parameter_changed_in_place_is_reported_not_hidden():
    model = _Counting()
    with pytest.raises(OptimError, match="changed parameters of the model in place"):
        with untouched(model), torch.no_grad():
            model.lin.weight.mul_(2)
