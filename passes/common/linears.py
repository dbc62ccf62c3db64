"""Linear layers in a traced graph: `aten.linear(x, W[out, in], b)` and `aten.addmm(b, x,
W[in, out])` (how GPT-2's Conv1D traces) with a constant weight.

Where their weight, bias and input are, which weight axis holds inputs or outputs, and what
their inputs look like on calibration data. Shared by every pass that rewrites or scores linear
layers (sparsify, low_rank, prune_weights, quantize_int4, dynamic_width).
"""

from __future__ import annotations

import torch
import torch.fx

from optim.ir import evaluate_nodes

aten = torch.ops.aten
LINEAR_OPS = {aten.linear.default, aten.addmm.default}


def weight_axis(node: torch.fx.Node, side: str) -> int:
    """The weight dimension holding a projection's outputs (`side="out"`) or inputs (`"in"`)."""
    out = 0 if node.target is aten.linear.default else 1
    return out if side == "out" else 1 - out


def weight_and_bias(node: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node | None]:
    if node.target is aten.linear.default:
        return node.args[1], node.args[2] if len(node.args) > 2 else None
    return node.args[2], node.args[0]  # addmm(bias, x, W)


def linear_input(node: torch.fx.Node) -> torch.fx.Node:
    return node.args[0] if node.target is aten.linear.default else node.args[1]


def is_constant_linear(node: torch.fx.Node) -> bool:
    if node.op != "call_function" or node.target not in LINEAR_OPS:
        return False
    w, _ = weight_and_bias(node)
    return isinstance(w, torch.fx.Node) and w.op == "get_attr"


def constant_linears(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """Every linear layer of `gm` whose weight is a constant, in graph order."""
    return [n for n in gm.graph.nodes if is_constant_linear(n)]


def input_rows(gm: torch.fx.GraphModule, nodes: list, batches: list,
               limit: int | None = None) -> dict:
    """Each layer's inputs on `batches` as [rows, in_features] fp32 (the first `limit` rows)."""
    xs = {n: linear_input(n) for n in nodes}
    out: dict = {n: [] for n in nodes}
    rows = 0  # every layer sees the same tokens, so one count serves all
    for batch in batches:
        if not xs or (limit is not None and rows >= limit):  # the rest would be cut anyway
            break
        values = evaluate_nodes(gm, list(set(xs.values())), *batch)
        for n, x in xs.items():
            out[n].append(values[x].reshape(-1, values[x].shape[-1]).float())
        rows += len(out[n][-1])
    return {n: torch.cat(v)[:limit] for n, v in out.items()}


def input_channel_energy(gm: torch.fx.GraphModule, nodes: list, batches: list
                         ) -> tuple[dict, dict]:
    """Per layer: Σ x_j² over the calibration rows for every input channel j (float64), and the
    number of rows; without holding the rows."""
    xs = {n: linear_input(n) for n in nodes}
    sq: dict = {}
    rows: dict = {}
    for batch in batches:
        values = evaluate_nodes(gm, list(set(xs.values())), *batch)
        for n, x in xs.items():
            v = values[x].reshape(-1, values[x].shape[-1]).double()
            sq[n] = sq.get(n, 0) + (v * v).sum(0)
            rows[n] = rows.get(n, 0) + len(v)
    return sq, rows
