"""TVM kernels vs references on random data, including odd sizes."""

from __future__ import annotations

import pytest
import torch

from optim.bits import expand_groups, group_mean_abs, pack_bits, signs, unpack_bits
from optim.errors import ConfigError
from optim.kernels import binary_linear, int8_matmul, pack_rows


@pytest.mark.parametrize("m,k,groups", [(8, 64, 1), (97, 100, 1), (5, 1, 1), (33, 384, 3)])
def test_pack_rows_matches_offline_packing(m, k, groups):
    torch.manual_seed(m + k)
    x, tau = torch.randn(m, k), torch.randn(k) * 0.1
    bits, beta = pack_rows(x, tau, groups)
    assert torch.equal(bits, pack_bits(x - tau))
    assert torch.equal(unpack_bits(bits, k), signs(x - tau))
    torch.testing.assert_close(beta, group_mean_abs(x - tau, groups))


@pytest.mark.parametrize("m,n,k,groups", [(8, 16, 64, 1), (97, 33, 100, 1), (5, 7, 1, 1),
                                          (64, 48, 384, 1), (19, 40, 384, 3)])
def test_binary_linear_equals_scaled_sign_matmul(m, n, k, groups):
    torch.manual_seed(m + n + k)
    a, w, bias = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
    a_scale, w_scale = torch.rand(m, groups) + 0.5, torch.rand(n, groups) + 0.5
    bits, _ = pack_rows(a)
    ref = (signs(a) * expand_groups(a_scale, k)) @ (signs(w) * expand_groups(w_scale, k)).T
    got = binary_linear(bits, pack_bits(w).T, k, a_scale, w_scale, bias)
    torch.testing.assert_close(got, ref + bias, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("m,n,k", [(16, 32, 64), (97, 33, 100), (3, 5, 7)])
def test_int8_matmul_accumulates_exactly(m, n, k):
    g = torch.Generator().manual_seed(k)
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    ref = a.to(torch.int32) @ w.to(torch.int32).T
    assert torch.equal(int8_matmul(a, w), ref)


def test_bad_kernel_inputs_are_named():
    with pytest.raises(ConfigError, match="int8"):
        int8_matmul(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.int8))
    with pytest.raises(ConfigError, match="fp32 \\[rows, K\\]"):
        pack_rows(torch.zeros(2, 3, 4))
    with pytest.raises(ConfigError, match="want \\[words, N\\]"):
        binary_linear(torch.zeros(2, 1, dtype=torch.int64), torch.zeros(3, 1, dtype=torch.int64),
                      64, torch.ones(2, 1), torch.ones(3, 1))
