"""Fitting learned feature maps by attention transfer (Hedgehog map, LoLCATs stage 1).

The model is frozen; one layer's feature-map parameters are fitted so that its linear attention
(`passes.linearize_attention.linear_attention.attend`) reproduces the layer's softmax attention
output on calibration samples [(q, k, v, valid)], by MSE.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from passes.linearize_attention.linear_attention import ECO_ANCHORS, attend, softmax_reference


def ecoformer_init(keys: list[Tensor], bits: int, seed: int = 0) -> dict[str, Tensor]:
    """Anchors drawn from each head's calibration keys, γ = 1 / mean squared key-anchor
    distance, μ = the keys' mean RBF features, A Gaussian (random-hyperplane hashing of the
    kernel features before any fitting). keys: [B, H, L, D] tensors."""
    g = torch.Generator().manual_seed(seed)
    k = torch.cat([t.transpose(0, 1).reshape(t.shape[1], -1, t.shape[-1]) for t in keys], 1)
    heads, rows, _ = k.shape
    idx = torch.randperm(rows, generator=g)[:ECO_ANCHORS]
    anchors = k[:, idx].clone()  # [H, m, D]
    d2 = torch.cdist(k, anchors).pow(2)  # [H, rows, m]
    gamma = 1.0 / d2.mean((1, 2)).clamp_min(1e-12)
    mu = torch.exp(-d2 * gamma[:, None, None]).mean(1)
    proj = torch.randn(heads, anchors.shape[1], bits, generator=g)
    return {"anchors": anchors, "proj": proj, "mu": mu, "gamma": gamma}


def hedgehog_init(heads: int, head_dim: int, features: int, scale: float) -> dict[str, Tensor]:
    """W = s^½·[I | 0] per head (softmax(x·W) starts as a tempered softmax over x's
    coordinates), b = 0."""
    w = torch.zeros(heads, head_dim, features)
    eye = torch.eye(head_dim, features) * math.sqrt(scale) * math.sqrt(head_dim)
    w += eye
    b = torch.zeros(heads, features)
    return {"w_q": w.clone(), "b_q": b.clone(), "w_k": w.clone(), "b_k": b.clone()}


def fit_hedgehog(samples: list[tuple[Tensor, Tensor, Tensor, Tensor | None]], causal: bool,
                 scale: float, features: int, steps: int, lr: float = 1e-2, seed: int = 0
                 ) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Fit one layer's q and k Hedgehog maps (see `fit_feature_map`)."""
    torch.manual_seed(seed)
    heads, head_dim = samples[0][0].shape[1], samples[0][0].shape[-1]
    return fit_feature_map("hedgehog", hedgehog_init(heads, head_dim, features, scale), samples,
                           causal, scale, steps, lr)


def fit_ecoformer(samples: list[tuple[Tensor, Tensor, Tensor, Tensor | None]], causal: bool,
                  scale: float, bits: int, steps: int, lr: float = 1e-2, seed: int = 0
                  ) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Fit one layer's hash projection A and offsets μ (anchors and γ stay as drawn)."""
    torch.manual_seed(seed)
    init = ecoformer_init([k for _, k, _, _ in samples], bits, seed)
    return fit_feature_map("ecoformer", init, samples, causal, scale, steps, lr,
                           trainable=("proj", "mu"))


def fit_feature_map(method: str, init: dict[str, Tensor],
                    samples: list[tuple[Tensor, Tensor, Tensor, Tensor | None]], causal: bool,
                    scale: float, steps: int, lr: float = 1e-2, trainable: tuple = ()
                    ) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Fit one layer's feature-map parameters (all, or those named in `trainable`) so that
    linear attention reproduces the layer's softmax attention output on `samples`
    [(q, k, v, valid)], by MSE (other weights frozen).

    Returns the parameters and the fit: relative MSE of the attention output before and after
    (initial map vs fitted map), on the samples."""
    params = {k: p.clone().requires_grad_(not trainable or k in trainable)
              for k, p in init.items()}
    with torch.no_grad():
        targets = [softmax_reference(q, k, v, m, causal, scale) for q, k, v, m in samples]
        energy = sum(float((t * t).mean()) for t in targets) / len(targets)

    def loss_fn() -> Tensor:
        total = 0.0
        for (q, k, v, m), t in zip(samples, targets):
            out = attend(method, q, k, v, m, causal, scale, params)
            total = total + F.mse_loss(out, t)
        return total / len(samples)

    with torch.enable_grad():
        opt = torch.optim.Adam([p for p in params.values() if p.requires_grad], lr=lr)
        with torch.no_grad():
            before = float(loss_fn()) / energy
        for _ in range(steps):
            opt.zero_grad()
            loss = loss_fn()
            loss.backward()
            opt.step()
    with torch.no_grad():
        after = float(loss_fn()) / energy
    return ({k: p.detach() for k, p in params.items()},
            {"relative_mse_initial": before, "relative_mse_fitted": after, "steps": steps})
