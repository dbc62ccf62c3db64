"""1-bit weights and activations: packing, the float model of what the kernel computes, and the
short distillation that fits a binary linear to the float layer it replaces.

A binary linear keeps, per output channel n and group g of `group` inputs, a scale α[n, g]
and the signs of its weights. With binary activations, each input row m is centred by a
per-channel threshold τ and binarized with one scale β[m, g] per group:

    x − τ ≈ β · sign(x − τ),   W ≈ α · sign(W)
    y = Σ_g β[m, g] α[n, g] (K_g − 2·popcount(bits(x − τ) XOR bits(W)))_g + (b + α·sign(W)·τ)

(XNOR-Net's scales; τ folded into the bias exactly). `sign(0) = +1` everywhere, so the packed
bits (1 = non-negative) and the float model agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from optim.bits import WORD, expand_groups, group_mean_abs, pack_bits, signs, unpack_bits  # noqa: F401


@dataclass
class BinaryLinear:
    """What the kernel needs: packed signs, scales, the (τ-folded) bias and the threshold."""

    weight_bits: torch.Tensor  # int64 [words, N] (K-major, as the kernel reads it)
    weight_scale: torch.Tensor  # [N, groups]
    bias: torch.Tensor | None  # [N], includes α·sign(W)·τ
    threshold: torch.Tensor | None  # [K] (binary activations only)
    in_features: int


def simulate(x: torch.Tensor, sign_w: torch.Tensor, alpha: torch.Tensor,
             bias: torch.Tensor | None, tau: torch.Tensor | None) -> torch.Tensor:
    """The float model of the binary linear (signs and scales as tensors; differentiable
    through straight-through estimators when `sign_w`/x come from `ste_sign`)."""
    k = sign_w.shape[1]
    w = sign_w * expand_groups(alpha, k)
    if tau is None:
        y = x @ w.T
    else:
        xc = x - tau
        beta = group_mean_abs(xc, alpha.shape[1])
        y = (ste_sign(xc) * expand_groups(beta, k)) @ w.T + (tau @ w.T)
    return y if bias is None else y + bias


class _SignSTE(torch.autograd.Function):
    """sign forward; gradient passed straight through where |x| <= clip (BNN's clipped STE)."""

    @staticmethod
    def forward(ctx, x, clip):
        ctx.save_for_backward(x)
        ctx.clip = clip
        return signs(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (x.abs() <= ctx.clip).to(g.dtype), None


def ste_sign(x: torch.Tensor) -> torch.Tensor:
    """sign(x), with gradients passed straight through when x requires them."""
    if not x.requires_grad:
        return signs(x)
    return _SignSTE.apply(x, float(x.detach().abs().max()))


def groups_for(k: int, group: int) -> int:
    return 1 if group == 0 else k // group


def fit(w: torch.Tensor, b: torch.Tensor | None, x: torch.Tensor, target: torch.Tensor,
        group: int, binary_act: bool, steps: int, lr: float = 1e-3,
        seed: int = 0) -> tuple[BinaryLinear, dict]:
    """Binarize one linear (w [N, K]) and, for `steps` Adam steps, fit its latent weights,
    scales and threshold so its output on `x` (the inputs the binarized model feeds it) matches
    `target` (the float model's output on the same data). Returns the layer and its error
    before and after fitting (relative MSE and SQNR on the rows not used for fitting)."""
    torch.manual_seed(seed)
    k = w.shape[1]
    groups = groups_for(k, group)
    held = max(1, len(x) // 8)  # rows kept out of fitting: error is measured on them
    xf, yf, xh, yh = x[held:], target[held:], x[:held], target[:held]
    latent = w.detach().float().clone()
    alpha = group_mean_abs(latent, groups)
    tau = x.mean(0) if binary_act else None

    def err(xs, ys, lat, al, ta) -> float:
        with torch.no_grad():
            got = simulate(xs, signs(lat), al, b, ta)
            return float((got - ys).pow(2).mean() / ys.pow(2).mean().clamp_min(1e-30))

    before = err(xh, yh, latent, alpha, tau)
    if steps > 0 and len(xf):
        with torch.inference_mode(False), torch.enable_grad():
            latent, alpha, tau = _distill(latent.clone(), alpha.clone(),
                                          None if tau is None else tau.clone(), b,
                                          xf.clone(), yf.clone(), steps, lr, float(w.abs().mean()))
        after = err(xh, yh, latent, alpha, tau)
        if after > before:  # fitting must not make the held-out error worse
            latent, alpha = w.detach().float(), group_mean_abs(w.detach().float(), groups)
            tau = x.mean(0) if binary_act else None
            after = before
    else:
        after = before
    sign_w = signs(latent)
    alpha, b, after = _refit(sign_w, alpha, tau, b, (xf, yf), (xh, yh), after)
    folded = b.detach().float().clone() if b is not None else None
    if tau is not None:
        shift = tau @ (sign_w * expand_groups(alpha, k)).T
        folded = shift if folded is None else folded + shift
    layer = BinaryLinear(pack_bits(sign_w).T.contiguous(), alpha.float().contiguous(), folded,
                         None if tau is None else tau.float().contiguous(), k)
    return layer, {"rel_mse_before": before, "rel_mse_after": after,
                   "sqnr_db_before": _db(before), "sqnr_db": _db(after)}


def _db(rel_mse: float) -> float:
    return -10 * math.log10(max(rel_mse, 1e-30))


def _distill(latent, alpha, tau, b, x, y, steps: int, lr: float, scale: float):
    """Adam on latent weights (sign via STE), α and τ, matching y on random row batches."""
    latent.requires_grad_(True)
    alpha.requires_grad_(True)
    rest = [alpha] + ([tau.requires_grad_(True)] if tau is not None else [])
    opt = torch.optim.Adam([{"params": [latent], "lr": lr * scale * 10},
                            {"params": rest, "lr": lr * scale}])
    batch = min(len(x), 1024)
    norm = y.pow(2).mean().clamp_min(1e-30)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,))
        sw = ste_sign(latent)
        loss = (simulate(x[idx], sw, alpha, b, tau) - y[idx]).pow(2).mean() / norm
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            alpha.clamp_(min=1e-8)
    return latent.detach(), alpha.detach(), None if tau is None else tau.detach()


def _refit(sign_w, alpha, tau, b, fit_rows, held_rows, err_now: float):
    """Least-squares scales and bias for fixed signs: per output, α (one per group) and a bias
    correction minimising the output error on the fitting rows (closed form). Kept only if the
    held-out error drops; returns (α, bias, held-out relative MSE)."""
    n, k = sign_w.shape
    groups = alpha.shape[1]

    def columns(x):  # [N, rows, groups + 1]: each group's contribution at α = 1, and a 1
        z = x if tau is None else _binarized(x, tau, groups)
        per = k // groups
        cols = []
        for g in range(groups):
            sl = slice(g * per, (g + 1) * per if g < groups - 1 else k)
            u = z[:, sl] @ sign_w[:, sl].T
            if tau is not None:
                u = u + tau[sl] @ sign_w[:, sl].T
            cols.append(u.T)
        cols.append(torch.ones(n, len(x)))
        return torch.stack(cols, -1)

    xf, yf = fit_rows
    xh, yh = held_rows
    if len(xf) <= groups + 1:
        return alpha, b, err_now
    base = b if b is not None else torch.zeros(n)
    sol = torch.linalg.lstsq(columns(xf).double(), (yf - base).T.unsqueeze(-1).double()).solution
    new_alpha, shift = sol[..., :groups, 0].float(), sol[:, groups, 0].float()
    if (new_alpha <= 0).any():  # a sign flip of a whole group: keep the STE's scales there
        new_alpha = torch.where(new_alpha > 0, new_alpha, alpha)
    pred = (columns(xh)[..., :groups] * new_alpha.unsqueeze(1)).sum(-1).T + base + shift
    err = float((pred - yh).pow(2).mean() / yh.pow(2).mean().clamp_min(1e-30))
    if err >= err_now:
        return alpha, b, err_now
    return new_alpha, base + shift, err


def _binarized(x, tau, groups):
    xc = x - tau
    return signs(xc) * expand_groups(group_mean_abs(xc, groups), x.shape[1])
