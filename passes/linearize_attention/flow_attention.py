"""Flowformer's flow attention (Wu et al. 2022): linear attention on sigmoid features with
flow conservation, competition among sources and gated allocation to sinks.

Bidirectional: every flow is a GEMV of φ with a [D′] summary; where whole features would pass
32 MB, `flow_bidirectional_segmented` makes them a segment at a time. Causal: every sum over keys
or queries becomes a running sum (`prefix_sum`) divided by its number of terms, and the values
are aggregated by `causal_product`; long sequences run `FLOW_SEGMENT` positions at a time.
"""

from __future__ import annotations

import torch
from torch import Tensor

from passes.linearize_attention.causal_scan import CHUNK, causal_product, prefix_sum

EPS = 1e-6  # Flowformer's ε in (φ + ε)·(Σφ + ε)
FLOW_SEGMENT = 1024  # a segment: causal flow's dozen [n, D′] temporaries then stay in cache


def flow_attention(fq: Tensor, fk: Tensor, v: Tensor, valid: Tensor | None, causal: bool,
                   chunk: int = CHUNK) -> Tensor:
    """Flow attention on sigmoid features (flow conservation, competition, allocation).

    Sinks are queries, sources keys. Incoming flow I_i = φq_i·Σ_j φk_j, outgoing
    O_j = φk_j·Σ_i φq_i; conserved flows Î_i = φq_i·Σ_j φk_j/O_j and Ô_j = φk_j·Σ_i φq_i/I_i;
    sources compete (softmax of Ô over keys, times their count), sinks are gated by
    sigmoid(Î·n/m). Causal: see `flow_causal`.
    `valid` [B, 1, Lk, 1] (1 = real key) keeps padded keys out of every sum and the softmax.
    """
    if causal:
        return flow_causal(fq, fk, v, valid, chunk)[0]
    n, m = fq.shape[-2], fk.shape[-2]
    if valid is not None:
        fk = fk * valid
    # every flow is a product with a [D′] summary: a GEMV over φ, no [n, D′] temporary
    incoming = 1.0 / eps_dot(fq, fk.sum(-2, keepdim=True))  # [B, H, n, 1]
    outgoing = 1.0 / eps_dot(fk, fq.sum(-2, keepdim=True))  # [B, H, m, 1]
    k_flow = outgoing.transpose(-2, -1) @ fk  # Σ_j φk_j / O_j, [B, H, 1, D′]
    q_flow = incoming.transpose(-2, -1) @ fq
    sink = eps_dot(fq, k_flow)  # Î
    source = eps_dot(fk, q_flow).clamp(-1.0, 1.0)  # Ô
    if valid is not None:
        source = source.masked_fill(valid == 0, -1e9)
        m_eff = valid.sum(-2, keepdim=True)
    else:
        m_eff = float(m)
    competition = torch.softmax(source, -2) * m_eff
    allocation = torch.sigmoid(sink * (n / m_eff))
    weight = competition if valid is None else competition * valid
    agg = fq @ weighted_summary(fk, v, weight)
    return agg.mul_(incoming * allocation)  # in place: one fresh [n, Dv] tensor fewer


def flow_bidirectional_segmented(q: Tensor, k: Tensor, v: Tensor, valid: Tensor | None
                                 ) -> Tensor:
    """Bidirectional flow attention (`flow_attention`'s formula) FLOW_SEGMENT positions at a
    time, from q and k before the sigmoid: no [n, D′] tensor is ever made whole.

    Such a tensor over glibc's 32 MB mmap threshold costs fresh pages on every call (a sigmoid
    into 50 MB at 16384 tokens took 16–18 ms here, 3 ms into kept memory; `optim.host_memory`),
    so each segment's features are made twice instead of kept: 1.17× at 16384 tokens (A/B on
    this CPU, 2026-12-01). Passes: the keys' feature sum; the queries' sum, incoming flows and
    q_flow; the keys' outgoing flows, k_flow and competition-weighted values; the outputs.
    Competition is a softmax over all keys taken in one pass: its logits are clamped to
    [−1, 1], so exp needs no running max, and the weighted values are divided by the exp sum
    at the end."""
    n, m = q.shape[-2], k.shape[-2]
    q_parts, k_parts = _segments(n), _segments(m)

    def fq(i: int, j: int) -> Tensor:
        return torch.sigmoid(q[..., i:j, :])

    def fk(i: int, j: int) -> Tensor:  # padded keys have no features
        f = torch.sigmoid(k[..., i:j, :])
        return f if valid is None else f * valid[..., i:j, :]

    sum_k = sum(fk(i, j).sum(-2, keepdim=True) for i, j in k_parts)
    incoming, sum_q, q_flow = [], 0.0, 0.0  # 1 / I_i per query segment ([.., L, 1]: small)
    for i, j in q_parts:
        f = fq(i, j)
        sum_q = sum_q + f.sum(-2, keepdim=True)
        incoming.append(1.0 / eps_dot(f, sum_k))
        q_flow = q_flow + incoming[-1].transpose(-2, -1) @ f  # Σ φq_i / I_i
    k_flow = exp_sum = weighted = 0.0
    for i, j in k_parts:
        f = fk(i, j)
        k_flow = k_flow + (1.0 / eps_dot(f, sum_q)).transpose(-2, -1) @ f  # Σ φk_j / O_j
        e = torch.exp(eps_dot(f, q_flow).clamp(-1.0, 1.0))  # the sources' competition
        if valid is not None:
            e = e * valid[..., i:j, :]
        exp_sum = exp_sum + e.sum(-2, keepdim=True)
        weighted = weighted + f.transpose(-2, -1) @ (v[..., i:j, :] * e)
    m_eff = float(m) if valid is None else valid.sum(-2, keepdim=True)
    summary = weighted * (m_eff / exp_sum)  # competition = softmax(source) · m
    out = v.new_empty(*q.shape[:-1], v.shape[-1])
    for (i, j), inc in zip(q_parts, incoming):
        f = fq(i, j)
        allocation = torch.sigmoid(eps_dot(f, k_flow) * (n / m_eff))
        out[..., i:j, :] = (f @ summary).mul_(inc * allocation)
    return out


def _segments(n: int) -> list[tuple[int, int]]:
    """(start, stop) of each FLOW_SEGMENT positions of n."""
    return [(i, min(i + FLOW_SEGMENT, n)) for i in range(0, n, FLOW_SEGMENT)]


def weighted_summary(fk: Tensor, v: Tensor, weight: Tensor) -> Tensor:
    """Σ_j φk_jᵀ·(weight_j·v_j), a [D′, Dv] summary of the keys, FLOW_SEGMENT keys at a time:
    the weighted values never exist as one [m, Dv] tensor. Fresh tensors of that size cost
    page faults on every call (glibc hands their memory back; `optim.host_memory`). With this
    and the output scaled in place, flow ran 1.26–1.47× faster at 4096–16384 tokens on this
    CPU with glibc's default allocator, and the same with freed memory kept."""
    total = None
    for i, j in _segments(fk.shape[-2]):
        part = fk[..., i:j, :].transpose(-2, -1) @ (v[..., i:j, :] * weight[..., i:j, :])
        total = part if total is None else total.add_(part)
    return total


def eps_dot(phi: Tensor, total: Tensor) -> Tensor:
    """(φ + ε)·(total + ε) over D′ for each row of φ [..., n, D′], total [..., 1, D′]:
    φ·w + ε·Σw with w = total + ε, so φ is read once by a GEMV and never shifted."""
    w = total + EPS
    return phi @ w.transpose(-2, -1) + EPS * w.sum(-1, keepdim=True)


def flow_causal(fq: Tensor, fk: Tensor, v: Tensor, valid: Tensor | None, chunk: int,
                start: int = 0, carry: dict[str, Tensor] | None = None
                ) -> tuple[Tensor, dict[str, Tensor]]:
    """Causal flow attention for positions start … start + n − 1 of a sequence: every sum over
    keys or queries becomes a running sum divided by its number of terms.

    `carry` holds the running sums (and the [D′, Dv] product state) of the positions before
    `start`; the returned dict holds them after the last position, so a long sequence runs
    a segment at a time with the same result.

    The ε terms of Flowformer's dot products, (φ + ε)·(S/n + ε), are expanded into row sums
    (φ·S/n + ε·ΣS/n + ε·Σφ + D′ε²), so that no [n, D′] tensor is shifted or divided: those
    passes over memory, not the GEMMs, bound this form on a CPU."""
    n, d = fq.shape[-2], fq.shape[-1]
    if valid is not None:
        fk = fk * valid
    count = torch.arange(start + 1, start + n + 1, dtype=fq.dtype, device=fq.device)[:, None]
    after: dict[str, Tensor] = {}

    def running(name: str, x: Tensor) -> Tensor:
        total = prefix_sum(x, initial=None if carry is None else carry[name])
        after[name] = total[..., -1:, :]
        return total

    def dot(phi: Tensor, row: Tensor, total: Tensor, row_total: Tensor) -> Tensor:
        """(φ + ε)·(total/count + ε) summed over D′, for each position."""
        return ((phi * total).sum(-1, keepdim=True) + EPS * row_total) / count \
            + EPS * row + d * EPS * EPS

    rq, rk = fq.sum(-1, keepdim=True), fk.sum(-1, keepdim=True)
    incoming = 1.0 / dot(fq, rq, running("k", fk), running("rk", rk))
    outgoing = 1.0 / dot(fk, rk, running("q", fq), running("rq", rq))
    sink = dot(fq, rq, running("k_flow", fk * outgoing), running("rk_flow", rk * outgoing))
    source = dot(fk, rk, running("q_flow", fq * incoming),
                 running("rq_flow", rq * incoming)).clamp(-1.0, 1.0)
    e = torch.exp(source)
    competition = e / running("e", e) * count
    if valid is not None:
        competition = competition * valid
    agg, after["state"] = causal_product(fq, fk, v * competition, chunk,
                                         None if carry is None else carry["state"],
                                         with_state=True)
    return agg * (incoming * torch.sigmoid(sink) / count), after


def flow_segmented(q: Tensor, k: Tensor, v: Tensor, valid: Tensor | None, chunk: int
                    ) -> Tensor:
    """Causal flow attention FLOW_SEGMENT positions at a time, carrying its running sums."""
    out, carry = v.new_empty(*q.shape[:-1], v.shape[-1]), None
    for i, j in _segments(q.shape[-2]):
        out[..., i:j, :], carry = flow_causal(
            torch.sigmoid(q[..., i:j, :]), torch.sigmoid(k[..., i:j, :]), v[..., i:j, :],
            None if valid is None else valid[..., i:j, :], chunk, i, carry)
    return out
