"""optim.measure's op-level timers: what they count, and what they leave out."""

from __future__ import annotations

import torch

from optim.measure import GemmTimer


def test_gemm_timer_counts_every_product_and_nothing_else():
    a, b = torch.randn(2, 3, 4), torch.randn(2, 4, 5)
    m, n = torch.randn(6, 7), torch.randn(7, 8)
    with torch.no_grad(), GemmTimer() as timer:
        torch.exp(a).sum()  # not a product: not counted
        a @ b  # bmm: 2·(2·3·5)·4
        torch.baddbmm(torch.zeros(2, 3, 5), a, b)  # the same again
        m @ n  # mm: 2·(6·8)·7
        torch.nn.functional.linear(m, n.T, torch.zeros(8))  # addmm: 2·(6·8)·7
        torch.randn(1, 2, 3, 4) @ torch.randn(4, 5)  # folded into one mm: 2·(6·5)·4
    assert timer.flops == 2 * (2 * 30 * 4 + 2 * 48 * 7 + 30 * 4)
    assert timer.ms > 0


def test_gemm_timer_sees_nothing_under_inference_mode():
    # the documented limit: Python dispatch modes do not run under inference_mode
    with torch.inference_mode(), GemmTimer() as timer:
        torch.randn(4, 4) @ torch.randn(4, 4)
    assert timer.flops == 0
