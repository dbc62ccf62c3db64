"""TVM kernels vs references on random data, including odd sizes."""

from __future__ import annotations

import pytest
import torch

from backends.tvm_kernels import binary_matmul, int8_matmul, pack_signs
from optim.errors import ConfigError


@pytest.mark.parametrize("m,n,k", [(8, 16, 64), (97, 33, 100), (5, 7, 1), (64, 48, 384)])
def test_binary_matmul_equals_sign_matmul(m, n, k):
    torch.manual_seed(m + n + k)
    a, w = torch.randn(m, k), torch.randn(n, k)
    a_scale, w_scale = torch.rand(m) + 0.5, torch.rand(n) + 0.5
    (a_bits, ka), (w_bits, kw) = pack_signs(a), pack_signs(w)
    assert ka == kw == k and a_bits.shape == (m, -(-k // 64))
    sign = lambda x: torch.where(x >= 0, 1.0, -1.0)  # noqa: E731
    ref = (sign(a) @ sign(w).T) * a_scale[:, None] * w_scale[None, :]
    torch.testing.assert_close(binary_matmul(a_bits, w_bits, k, a_scale, w_scale), ref)


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
    with pytest.raises(ConfigError, match="2-D"):
        pack_signs(torch.zeros(2, 3, 4))
