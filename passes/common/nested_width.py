"""Nested widths of a permuted graph: the graph that runs only the first k heads / neurons.

`dynamic_width` orders every attention's heads and every MLP's hidden neurons by importance
(most important first) and records, per layer, which projections carry them: the plan. Because
the order is nested, any width is a prefix: `at_width(gm, plan, 0.5)` returns a graph whose
projection weights are views of the first half of the rows (or columns) of the full weights (no
copy), with every reshape constant that carries a head or neuron count rewritten along that axis
(`passes.common.token_axis.retarget_axes`): `view(B, L, 12, 64)` becomes `view(B, L, 6, 64)`.

A width is one number for every layer, or one per layer (Mix'n'Match), each in (0, 1].
"""

from __future__ import annotations

import copy
import math

import torch
import torch.fx

from optim.errors import ConfigError
from optim.ir import add_constant, get_constant, refresh_meta
from passes.common.linears import weight_and_bias, weight_axis
from passes.common.token_axis import Axis, TokenAxisError, retarget_axes

aten = torch.ops.aten


def kept(count: int, width: float, group: int = 1) -> int:
    """Units kept at `width` (at least one group; whole groups of `group`)."""
    return max(group, math.ceil(width * count / group) * group)


def layer_widths(plan: dict, width) -> list[float]:
    n = len(plan["layers"])
    widths = [width] * n if isinstance(width, (int, float)) else list(width)
    if len(widths) != n or any(not (0 < float(w) <= 1) for w in widths):
        raise ConfigError(f"width must be a number in (0, 1] or a list of {n} of them (one per "
                          f"layer, Mix'n'Match), got {width!r}")
    return [float(w) for w in widths]


def counts_at(plan: dict, width) -> list[dict]:
    """Heads and neurons each layer keeps at `width` (whole key/value groups of heads)."""
    out = []
    for layer, w in zip(plan["layers"], layer_widths(plan, width)):
        row = {}
        if "heads" in layer:
            h = layer["heads"]
            row["heads"] = kept(h["kv_heads"], w) * (h["heads"] // h["kv_heads"])
        if "mlp" in layer:
            row["neurons"] = kept(layer["mlp"]["neurons"], w)
        out.append(row)
    return out


def at_width(gm: torch.fx.GraphModule, plan: dict, width, args: tuple, kwargs: dict
             ) -> torch.fx.GraphModule:
    """A copy of `gm` running `width` of every layer's heads and MLP neurons (nested prefix);
    its weights are views of `gm`'s."""
    out = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
    out.graph._codegen = copy.deepcopy(gm.graph._codegen)
    try:
        narrow(out, plan, counts_at(plan, width), args, kwargs)
    except ConfigError as e:
        raise ConfigError(f"cannot run this graph at width {width}: {e}") from e
    return out


def narrow(gm: torch.fx.GraphModule, plan: dict, counts: list[dict], args: tuple, kwargs: dict,
           materialize: bool = False) -> None:
    """Keep the first `counts[i]["heads"]` heads and `["neurons"]` neurons of layer i, in place:
    projection weights become their leading rows/columns (views, or copies with `materialize`)
    and every shape constant on the way is rewritten."""
    nodes = {n.name: n for n in gm.graph.nodes}
    starts, stop = {}, set()
    for layer, row in zip(plan["layers"], counts):
        if "heads" in layer and "heads" in row:
            h = layer["heads"]
            groups = row["heads"] * h["kv_heads"] // h["heads"]
            for role in ("q", "k", "v"):
                node = nodes[h[role]]
                units = row["heads"] if role == "q" else groups
                old = h["heads"] if role == "q" else h["kv_heads"]
                _narrow(gm, node, "out", units * h["head_dim"], materialize)
                starts[node] = Axis(len(node.meta["val"].shape) - 1, old, units, h["head_dim"])
            attn = nodes[h["attention"]]
            starts[attn] = Axis(1, h["heads"], row["heads"])
            o = nodes[h["o"]]
            _narrow(gm, o, "in", row["heads"] * h["head_dim"], materialize)
            stop |= {o, attn}
        if "mlp" in layer and "neurons" in row:
            m = layer["mlp"]
            for name in m["up"]:
                node = nodes[name]
                _narrow(gm, node, "out", row["neurons"], materialize)
                starts[node] = Axis(len(node.meta["val"].shape) - 1, m["neurons"], row["neurons"])
            down = nodes[m["down"]]
            _narrow(gm, down, "in", row["neurons"], materialize)
            stop.add(down)
    try:
        retarget_axes(gm, starts, frozenset(stop) - set(starts))
        gm.graph.lint()
        gm.recompile()
        refresh_meta(gm, args, kwargs, fake=True)
    except (TokenAxisError, RuntimeError) as e:
        raise ConfigError(str(e)) from e
    gm.meta["width_counts"] = counts


def _narrow(gm: torch.fx.GraphModule, proj: torch.fx.Node, side: str, keep: int,
            materialize: bool) -> None:
    """Point `proj` at the first `keep` outputs (or inputs) of its weight (and bias)."""
    w_node, b_node = weight_and_bias(proj)
    axis = weight_axis(proj, side)

    def part(t: torch.Tensor, dim: int) -> torch.Tensor:
        t = t.detach().narrow(dim, 0, keep)
        return t.contiguous().clone() if materialize else t

    narrowed = gm.meta.setdefault("narrowed_constants", {})  # new target -> (full, dim, keep)
    new_w = add_constant(gm, f"{w_node.target}_w{keep}", part(get_constant(gm, w_node), axis),
                         proj)
    narrowed[new_w.target] = (w_node.target, axis, keep)
    proj.replace_input_with(w_node, new_w)
    if side == "out" and b_node is not None:
        new_b = add_constant(gm, f"{b_node.target}_w{keep}", part(get_constant(gm, b_node), 0),
                             proj)
        narrowed[new_b.target] = (b_node.target, 0, keep)
        proj.replace_input_with(b_node, new_b)
