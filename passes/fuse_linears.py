"""fuse_linears: linears that read the same input ⇒ one linear over their stacked weights.

A transformer layer reads one normalized hidden state with several projections: q, k and v
(Llama, Qwen2, Mistral, OPT, BERT), gate and up (SwiGLU MLPs). Each `linear(x, W_i, b_i)` over
the same `x` becomes one `linear(x, cat(W_i), cat(b_i))` whose output is split back by
columns. Fewer, larger GEMMs: one launch and, after `quantize`, one activation quantization
instead of three. The biggest win is at decode, where every linear is a matrix-vector product
and the per-call cost is a large part of each.

Numerics: exact (every output is the same dot product). Run it after passes that reason about
single projections (sparsify, dynamic_width, low_rank) and before `quantize`.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx

from optim.ir import add_constant, get_constant, module_path, prune_unused_constants
from optim.pass_base import Exact, PassContext, register_pass

aten = torch.ops.aten


@dataclass(frozen=True)
class FuseLinearsConfig:
    min_group: int = 2  # linears sharing an input needed to fuse them
    max_outputs: int = 65536  # a fused weight never gets more output rows than this


def _parts(gm, n: torch.fx.Node):
    """(x, weight tensor, bias tensor or None) of a float linear with constant weights."""
    if n.op != "call_function" or n.target is not aten.linear.default:
        return None
    x, w = n.args[0], n.args[1]
    b = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
    weight = get_constant(gm, w)
    bias = get_constant(gm, b) if b is not None else None
    if weight is None or weight.dim() != 2 or not weight.is_floating_point():
        return None
    if b is not None and bias is None:  # a computed bias
        return None
    return x, weight, bias


@register_pass("fuse_linears", config=FuseLinearsConfig, numerics=Exact(atol=1e-5),
               requires=("cleanup",))
def fuse_linears(gm: torch.fx.GraphModule, cfg: FuseLinearsConfig, ctx: PassContext) -> None:
    """Stack the weights of linears that share an input into one linear, split its output."""
    groups: dict = {}
    for n in gm.graph.nodes:
        parts = _parts(gm, n)
        if parts is not None:
            groups.setdefault(parts[0], []).append((n, parts[1], parts[2]))
    if not any(len(m) >= cfg.min_group for m in groups.values()):
        ctx.skip("graph", f"no {cfg.min_group} float linears read the same input (q, k and v "
                          f"may already be one projection, as GPT-2's c_attn is)")
    for x, members in groups.items():
        if len(members) < cfg.min_group:
            continue
        kinds = {(w.dtype, w.shape[1]) for _, w, _ in members}
        where = ", ".join(module_path(n) for n, _, _ in members)
        if len(kinds) != 1:
            ctx.skip(where, f"they read one input but differ in dtype or width {sorted(kinds)}")
            continue
        rows = sum(w.shape[0] for _, w, _ in members)
        if rows > cfg.max_outputs:
            ctx.skip(where, f"{rows} stacked output rows > max_outputs {cfg.max_outputs}")
            continue
        _fuse(gm, x, members)
        ctx.record("linears_fused", len(members))
        ctx.record("groups")
    gm.graph.eliminate_dead_code()
    prune_unused_constants(gm)
    gm.recompile()


def _fuse(gm: torch.fx.GraphModule, x: torch.fx.Node, members: list) -> None:
    first = members[0][0]
    weight = torch.cat([w.detach() for _, w, _ in members])
    with_bias = any(b is not None for _, _, b in members)
    bias = torch.cat([b.detach() if b is not None else w.new_zeros(w.shape[0])
                      for _, w, b in members]) if with_bias else None
    base = module_path(first).rpartition(".")[0] or "fused"
    w_node = add_constant(gm, f"{base}.fused_weight", weight, first)
    b_node = add_constant(gm, f"{base}.fused_bias", bias, first) if with_bias else None
    with gm.graph.inserting_before(first):
        fused = gm.graph.call_function(aten.linear.default, (x, w_node, b_node))
        sizes = [w.shape[0] for _, w, _ in members]
        split = gm.graph.call_function(aten.split_with_sizes.default, (fused, sizes, -1))
        fused.meta = {**first.meta}
        lead = tuple(x.meta["val"].shape[:-1])
        fused.meta["val"] = x.meta["val"].new_empty((*lead, sum(sizes)))
        split.meta = {**first.meta, "val": [x.meta["val"].new_empty((*lead, s)) for s in sizes]}
        for i, (n, _, _) in enumerate(members):
            piece = gm.graph.call_function(operator.getitem, (split, i))
            piece.meta = {**n.meta}
            n.replace_all_uses_with(piece)
    for n, _, _ in members:
        gm.graph.erase_node(n)
