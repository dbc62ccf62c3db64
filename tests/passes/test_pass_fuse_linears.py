"""fuse_linears, one pass on small graphs: projections of one input stacked, others left."""

from __future__ import annotations

import torch

from optim.testing import capture_example, capture_zoo, histogram_diff, run_pass


class _Block(torch.nn.Module):
    """q, k, v of one input (one without bias), and a linear of another input."""

    def __init__(self):
        super().__init__()
        self.q, self.k = torch.nn.Linear(16, 16), torch.nn.Linear(16, 8)
        self.v, self.other = torch.nn.Linear(16, 8, bias=False), torch.nn.Linear(16, 16)

    def forward(self, x, y):
        return self.q(x) + torch.cat([self.k(x), self.v(x)], -1) + self.other(y)


def test_linears_of_one_input_become_one_gemm_and_exact():
    torch.manual_seed(0)
    x, y = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    run = run_pass("fuse_linears", capture_example(_Block().eval(), (x, y), {}), (x, y))
    assert run.result.counts == {"linears_fused": 3, "groups": 1}
    assert histogram_diff(run.histogram_before, run.histogram_after) == {
        "aten.linear": -2, "aten.split_with_sizes": 1, "getitem": 3}
    assert run.max_abs_error() < 1e-5


def test_llama_qkv_and_gate_up_fused_then_quantized():
    gm, z = capture_zoo("llama")
    args, kwargs = z.example_args, z.example_kwargs
    fused = run_pass("fuse_linears", gm, args, kwargs)
    layers = z.num_attention_layers
    assert fused.result.counts == {"linears_fused": 5 * layers, "groups": 2 * layers}
    assert fused.max_abs_error() < 1e-5
    quantized = run_pass("quantize", fused.gm, args, kwargs)
    assert quantized.result.counts["linear_quantized"] == 4 * layers  # qkv, o, gate_up, down
