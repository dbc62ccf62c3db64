"""Low-rank output distillation: fit rank-r corrections of a graph's linear weights so that its
outputs match a teacher's on calibration data, then fold them into the weights (no run-time
cost). LoLCATs' stage 2 after attention transfer, done on the FX graph itself.

Each chosen linear's weight W is read during training as W + B·A (A [r, in], B [out, r],
B = 0 at the start, so training starts from the graph as it is). The loss is the outputs' mean
squared error against the teacher's, relative to the teacher's energy. Afterwards W + B·A
becomes the weight constant and nothing else remains of the adapters.
"""

from __future__ import annotations

import torch
import torch.fx

from optim.ir import get_constant, replace_constant
from passes.common.graph_runner import output_error, output_loss, run, swap_constant
from passes.common.linears import weight_and_bias, weight_axis


def distill(gm: torch.fx.GraphModule, linears: list, batches: list, teacher: list,
            rank: int, steps: int, lr: float, seed: int = 0) -> dict:
    """Fit and fold rank-`rank` corrections of `linears`' weights (in place, new constants);
    returns the relative output error on `batches` before and after."""
    g = torch.Generator().manual_seed(seed)
    adapters = []
    for n in linears:
        w_node = weight_and_bias(n)[0]
        w = get_constant(gm, w_node)
        rows_out = weight_axis(n, "in") == 1  # W [out, in] (linear) or [in, out] (addmm)
        out_f, in_f = (w.shape[0], w.shape[1]) if rows_out else (w.shape[1], w.shape[0])
        a = (torch.randn(rank, in_f, generator=g) / in_f ** 0.5).requires_grad_(True)
        b = torch.zeros(out_f, rank, requires_grad=True)
        adapters.append((w_node, w.detach().float(), a, b, rows_out))

    def weights(with_grad: bool) -> None:
        for w_node, w0, a, b, rows_out in adapters:
            delta = b @ a if rows_out else (b @ a).T
            swap_constant(gm, w_node.target, (w0 + delta) if with_grad else (w0 + delta).detach())

    def error() -> float:
        weights(False)
        return output_error(gm, batches, teacher)

    before = error()
    params = [p for _, _, a, b, _ in adapters for p in (a, b)]
    with torch.inference_mode(False), torch.enable_grad():
        opt = torch.optim.Adam(params, lr=lr)
        for step in range(steps):
            batch, ref = batches[step % len(batches)], teacher[step % len(batches)]
            weights(True)
            loss = output_loss(run(gm, batch), ref)
            opt.zero_grad()
            loss.backward()
            opt.step()
    after = error()
    for w_node, w0, a, b, rows_out in adapters:  # fold: only W + B·A remains
        delta = (b @ a if rows_out else (b @ a).T).detach()
        value = w0 + delta if after < before else w0
        swap_constant(gm, w_node.target, w0)
        replace_constant(gm, w_node, value)
    return {"relative_error_before": before, "relative_error_after": min(before, after),
            "kept": after < before, "rank": rank, "steps": steps, "linears": len(adapters)}
