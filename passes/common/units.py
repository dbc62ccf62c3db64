"""Prunable units of a traced transformer: attention heads and MLP hidden neurons.

Shared by `dynamic_width` (order them, so that every width is a prefix) and `sparsify` (drop the
least important). For every fused attention: its q/k/v projections, its output projection and
its heads (grouped-query heads as groups of their key/value head); for every MLP: its up (and
gate) projections, its down projection and its hidden neurons; a block pairs an attention with
the MLP after it. Each unit is scored on calibration data: a head by the mean norm of what it
adds to the residual stream (its output through its slice of the output projection), a neuron
by mean |activation| times the norm of its down-projection column. Reordering weight rows and
columns by a permutation leaves the function unchanged.
"""

from __future__ import annotations

import operator

import torch
import torch.fx

import optim.ops  # noqa: F401  (registers torch.ops.optim)
from optim.ir import (
    add_constant,
    downstream,
    evaluate_nodes,
    get_constant,
    module_path,
    replace_constant,
    shape,
    upstream,
)
from passes.common.linears import is_constant_linear, linear_input, weight_and_bias, weight_axis

aten = torch.ops.aten
ATTENTION = torch.ops.optim.attention.default
_ELEMENTWISE = {aten.gelu.default, aten.relu.default, aten.silu.default, aten.tanh.default,
                aten.sigmoid.default, aten.mul.Tensor, aten.add.Tensor, aten.pow.Tensor_Scalar,
                aten.div.Tensor, aten.sub.Tensor, aten.erf.default, aten.neg.default,
                aten.view.default, aten.reshape.default, aten._unsafe_view.default,
                aten.clone.default, aten.contiguous.default}


_SHAPE_ONLY = {aten.view.default, aten.reshape.default, aten._unsafe_view.default,
               aten.clone.default, aten.contiguous.default}


def leaves(out) -> list[torch.Tensor]:
    from torch.utils import _pytree as pytree

    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _out_features(gm, n: torch.fx.Node) -> int:
    w, _ = weight_and_bias(n)
    return get_constant(gm, w).shape[weight_axis(n, "out")]


def _in_features(gm, n: torch.fx.Node) -> int:
    w, _ = weight_and_bias(n)
    return get_constant(gm, w).shape[weight_axis(n, "in")]


# ---- finding the units ----

def attention_heads(gm, attn: torch.fx.Node, skip) -> dict | None:
    """The projections and head counts of one fused attention; None (and `skip(where, why)`)
    when its heads cannot be separated."""
    q, k, v = attn.args[:3]
    n_heads, kv_heads, d = shape(q)[1], shape(k)[1], shape(q)[-1]
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    projs = {}
    for role, x in (("q", q), ("k", k), ("v", v)):
        # k/v projections may have fewer heads than the attention sees (repeat_kv for GQA)
        sizes = {n_heads * d} if role == "q" else {h * d for h in range(1, kv_heads + 1)
                                                    if kv_heads % h == 0 and n_heads % h == 0}
        above = upstream(x) | {x}
        cands = [n for n in above if is_constant_linear(n) and _out_features(gm, n) in sizes
                 and not any(is_constant_linear(b) or b.target is ATTENTION  # nothing in between
                             for b in above & downstream(n))]
        if not cands:
            skip(module_path(attn), f"no separate {role} projection (a fused q/k/v "
                                        f"projection such as GPT-2's c_attn, or a quantized "
                                        f"one): heads stay as they are")
            return None
        projs[role] = max(cands, key=order.get)
    if len({projs["q"], projs["k"], projs["v"]}) < 3:
        skip(module_path(attn), "q, k and v come from one fused projection; heads stay")
        return None
    outs = [n for n in downstream(attn)
            if is_constant_linear(n) and _in_features(gm, n) == n_heads * d]
    if not outs:
        skip(module_path(attn), "no output projection reads the heads")
        return None
    kv_heads = _out_features(gm, projs["k"]) // d
    if _out_features(gm, projs["v"]) != kv_heads * d:
        skip(module_path(attn), "k and v projections differ in size; heads stay")
        return None
    o = min(outs, key=order.get)
    if any(is_constant_linear(n) for n in downstream(attn) & upstream(o)):
        skip(module_path(attn), "another projection sits between the heads and the output")
        return None
    return {"attention": attn, **projs, "o": o, "heads": n_heads,
            "kv_heads": kv_heads, "head_dim": d}


def mlp_unit(gm, down: torch.fx.Node) -> dict | None:
    """`down(f(up_1(x), …))` with f elementwise over the hidden neurons, else None."""
    if not is_constant_linear(down):
        return None
    hidden = linear_input(down)
    size = _in_features(gm, down)
    ups, todo, seen = [], [hidden], set()
    while todo:
        n = todo.pop()
        if n in seen or not isinstance(n, torch.fx.Node):
            continue
        seen.add(n)
        if is_constant_linear(n):
            if _out_features(gm, n) != size:
                return None
            ups.append(n)
            continue
        if n.op != "call_function" or n.target not in _ELEMENTWISE or \
                (shape(n) or (0,))[-1] != size:
            return None
        todo += [a for a in n.all_input_nodes if a.op != "get_attr" and
                 (shape(a) or (1,))[-1] != 1]
    if not ups or any(u.target is ATTENTION for u in seen):
        return None
    if all(n.target in _SHAPE_ONLY for n in seen - set(ups)):
        return None  # linears with only views between: a projection read by a projection
        #              (PixArt's caption embedding by cross-attention's to_k), not an MLP
    return {"up": sorted(ups, key=lambda u: u.name), "down": down, "hidden": hidden,
            "neurons": size}


def blocks(gm, mlps: list[dict], skip) -> list[tuple[torch.fx.Node, dict]]:
    """Each attention with the first MLP after it (a transformer block); MLPs outside blocks
    (timestep embedders, heads) are skipped: they condition every block and stay whole."""
    attns = [n for n in gm.graph.nodes if n.target is ATTENTION]
    owned: dict = {}
    for m in mlps:
        before = [a for a in attns if a in upstream(m["down"])]
        owner = before[-1] if before else None
        if owner is None or owner in owned:
            skip(module_path(m["down"]), "MLP outside a transformer block (no attention "
                                             "right before it); it stays whole")
            continue
        owned[owner] = m
    return [(a, owned.get(a)) for a in attns]


def plan_layers(pairs: list, heads: list[dict]) -> list[dict]:
    """One entry per transformer block: its nested heads and/or MLP."""
    by_attn = {h["attention"]: h for h in heads}
    layers = []
    for attn, m in pairs:
        layer = {**({"heads": _names(by_attn[attn])} if attn in by_attn else {}),
                 **({"mlp": _names(m)} if m else {})}
        if layer:
            layers.append(layer)
    return layers


def order_units(gm, heads: bool, mlp: bool, batches: list, skip) -> dict | None:
    """Find every block's heads (when `heads`) and MLP neurons (when `mlp`), score them on
    `batches` and permute them most important first (the function is unchanged). Returns the
    plan `{"layers": [...]}` that `passes.common.nested_width` slices, or None if nothing was
    found."""
    if mlp:
        split_chunked_linears(gm)
    attns = [n for n in gm.graph.nodes if n.target is ATTENTION] if heads else []
    found = [h for h in (attention_heads(gm, n, skip) for n in attns) if h]
    pairs = blocks(gm, [m for m in (mlp_unit(gm, n) for n in gm.graph.nodes) if m], skip)
    if not mlp:
        pairs = [(a, None) for a, _ in pairs]
    if not found and not any(m for _, m in pairs):
        return None
    for h in found:
        permute_heads(gm, h, head_scores(gm, h, batches))
    for _, m in pairs:
        if m:
            permute_neurons(gm, m, neuron_scores(gm, m, batches))
    gm.recompile()
    return {"layers": plan_layers(pairs, found)}


def split_chunked_linears(gm) -> int:
    """`chunk(linear(x, W, b), n, -1)` ⇒ n linears on W's row blocks (exact). A GEGLU
    feed-forward (`a, g = proj(x).chunk(2); a * gelu(g)`, diffusers' UNets and SD) becomes a
    gated MLP with two up projections, whose neurons are ordered and nested in pairs like
    SwiGLU's."""
    done = 0
    for chunk in [n for n in gm.graph.nodes if n.target is aten.chunk.default]:
        lin, parts = chunk.args[0], chunk.args[1]
        dim = chunk.args[2] if len(chunk.args) > 2 else chunk.kwargs.get("dim", 0)
        if not (isinstance(lin, torch.fx.Node) and is_constant_linear(lin)
                and lin.target is aten.linear.default and len(lin.users) == 1
                and dim in (-1, len(shape(lin) or ()) - 1)):
            continue
        w_node, b_node = weight_and_bias(lin)
        w, b = get_constant(gm, w_node), get_constant(gm, b_node) if b_node is not None else None
        if w.shape[0] % parts or not all(u.target is operator.getitem for u in chunk.users):
            continue
        size = w.shape[0] // parts
        pieces = []
        for i in range(parts):
            wi = add_constant(gm, f"{w_node.target}_part{i}", w[i * size:(i + 1) * size].clone(),
                              lin)
            bi = None if b is None else add_constant(
                gm, f"{b_node.target}_part{i}", b[i * size:(i + 1) * size].clone(), lin)
            with gm.graph.inserting_before(chunk):
                piece = gm.graph.call_function(aten.linear.default, (lin.args[0], wi, bi))
            piece.meta = {**lin.meta, "val": chunk.meta["val"][i]}
            pieces.append(piece)
        for user in list(chunk.users):
            user.replace_all_uses_with(pieces[user.args[1]])
            gm.graph.erase_node(user)
        gm.graph.erase_node(chunk)
        gm.graph.erase_node(lin)
        done += 1
    if done:
        gm.graph.lint()
        gm.recompile()
    return done


def _names(unit: dict) -> dict:
    return {k: (v.name if isinstance(v, torch.fx.Node) else
                [x.name for x in v] if isinstance(v, list) else v)
            for k, v in unit.items() if k != "hidden"}


# ---- scoring on calibration data ----

def head_scores(gm, h: dict, batches) -> torch.Tensor:
    """Per key/value group: the mean norm of its heads' contribution through the output proj."""
    w_o, _ = weight_and_bias(h["o"])
    w = get_constant(gm, w_o)
    w = w if weight_axis(h["o"], "in") == 1 else w.T  # [C, H·D]
    d, n = h["head_dim"], h["heads"]
    w = w.reshape(w.shape[0], n, d)
    score = torch.zeros(n)
    for b in batches:
        o = evaluate_nodes(gm, [h["attention"]], *b)[h["attention"]]  # [B, H, L, D]
        contrib = torch.einsum("bhld,chd->bhlc", o, w)
        score += contrib.norm(dim=-1).mean(dim=(0, 2))
    return score.reshape(h["kv_heads"], -1).sum(-1)


def neuron_scores(gm, m: dict, batches) -> torch.Tensor:
    w_d, _ = weight_and_bias(m["down"])
    w = get_constant(gm, w_d)
    col_norm = w.norm(dim=1 - weight_axis(m["down"], "in"))  # per hidden neuron
    act = torch.zeros(m["neurons"])
    for b in batches:
        x = evaluate_nodes(gm, [m["hidden"]], *b)[m["hidden"]]
        act += x.abs().reshape(-1, m["neurons"]).mean(0)
    return act * col_norm


# ---- permuting (function-preserving) ----

def permute_heads(gm, h: dict, group_scores: torch.Tensor) -> None:
    groups = torch.argsort(group_scores, descending=True)
    rep, d = h["heads"] // h["kv_heads"], h["head_dim"]
    q_heads = (groups[:, None] * rep + torch.arange(rep)).flatten()
    for role, heads in (("q", q_heads), ("k", groups), ("v", groups)):
        reorder(gm, h[role], "out", (heads[:, None] * d + torch.arange(d)).flatten())
    reorder(gm, h["o"], "in", (q_heads[:, None] * d + torch.arange(d)).flatten())


def permute_neurons(gm, m: dict, scores: torch.Tensor) -> None:
    order = torch.argsort(scores, descending=True)
    for u in m["up"]:
        reorder(gm, u, "out", order)
    reorder(gm, m["down"], "in", order)


def reorder(gm, proj: torch.fx.Node, side: str, index: torch.Tensor) -> None:
    w_node, b_node = weight_and_bias(proj)
    axis = weight_axis(proj, side)
    replace_constant(gm, w_node, get_constant(gm, w_node).index_select(axis, index))
    if side == "out" and isinstance(b_node, torch.fx.Node):
        replace_constant(gm, b_node, get_constant(gm, b_node).index_select(0, index))
