"""merge_tokens (ToMe): residual ⇒ optim::merge_tokens(residual, keys) between attention and MLP.

In every transformer block, after the attention residual add, the r most redundant tokens are
averaged into their most similar partners (bipartite soft matching on the block's attention
keys, averaged over heads), so the MLP and every later block run on fewer tokens. Merged tokens
remember how many originals they stand for: averages are size-weighted, and later attentions add
log(size) to their scores (proportional attention). Leading tokens (CLS, registers) are
protected. Every shape constant downstream is rewritten along the token axis
(`passes.common.token_axis`).

Models whose later ops need the full token grid (a DiT un-patchifies tokens into an image) get
merge-then-unmerge instead (tomesd): tokens are merged before each attention and copied back to
every original position after it, so only attention runs on fewer tokens.

Refuses, with the reason, attention that is causal or masked (decoders, padded text): merging
would mix positions the mask keeps apart. With `gate` (default), the merge is kept only if the
target's cost model estimates the merged graph faster (small r on small models is not: the
matching costs more than it saves). Requires: fuse_attention. Numerics: lossy.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx

import optim.ops  # noqa: F401  (registers torch.ops.optim)
from hardware.estimate import estimate
from optim.ir import (
    depends_on_inputs,
    downstream,
    evaluate_nodes,
    module_path,
    refresh_meta,
    shape,
    trial_copy,
    upstream,
)
from optim.ops import merged_count
from optim.pass_base import Lossy, PassContext, register_pass
from passes.common.token_axis import TokenAxisError, retarget

aten = torch.ops.aten
ATTENTION = torch.ops.optim.attention.default
MERGE = torch.ops.optim.merge_tokens.default
UNMERGE = torch.ops.optim.unmerge_tokens.default


@dataclass(frozen=True)
class MergeTokensConfig:
    """Options for merge_tokens."""

    r: int = 8  # tokens merged away in every block (ToMe's r)
    schedule: tuple[int, ...] = ()  # r per block instead (missing blocks: 0)
    protect: int = -1  # leading tokens never merged; -1: those concatenated before block 1
    mode: Literal["auto", "merge", "unmerge"] = "auto"  # auto: merge, unmerge if it must
    proportional_attention: bool = True  # add log(size) to later attention scores (merge mode)
    gate: bool = True  # merge only if the target's cost model estimates the merged graph faster

    def validate(self) -> None:
        if self.r < 0 or any(r < 0 for r in self.schedule):
            raise ValueError("r and schedule entries must be >= 0")
        if self.protect < -1:
            raise ValueError("protect must be >= 0, or -1 for automatic")

    def r_at(self, block: int) -> int:
        if self.schedule:
            return self.schedule[block] if block < len(self.schedule) else 0
        return self.r


@register_pass("merge_tokens", config=MergeTokensConfig, numerics=Lossy("cosine_min", 0.9),
               requires=("fuse_attention",), expects=("blocks_merged",))
def merge_tokens(gm: torch.fx.GraphModule, cfg: MergeTokensConfig, ctx: PassContext) -> None:
    """Merge redundant tokens block by block (ToMe), or around attention only (unmerge mode)."""
    attns = [n for n in gm.graph.nodes if n.target is ATTENTION]
    masks = evaluate_nodes(gm, [n.args[3] for n in attns if n.args[3] is not None],
                           *ctx.example_inputs)
    refusals = [(module_path(n), _unmergeable_attention(n, masks)) for n in attns]
    refusals = [(where, why) for where, why in refusals if why]
    for where, why in refusals:
        ctx.skip(where, why)
    if not attns:
        ctx.skip("graph", "no fused attention (run fuse_attention first)")
    if not attns or refusals:
        return
    args, kwargs = ctx.example_inputs
    modes = ["merge", "unmerge"] if cfg.mode == "auto" else [cfg.mode]
    failures = []
    for mode in modes:
        trial = trial_copy(gm)
        try:
            blocks = _apply(trial, cfg, mode, args, kwargs)
        except TokenAxisError as e:
            failures.append(f"{mode}: {e}")
            continue
        if cfg.gate:
            before, after = _estimated_ms(gm, ctx), _estimated_ms(trial, ctx)
            ctx.details["estimated_ms"] = {"unmerged": round(before, 3), "merged": round(after, 3)}
            if after >= before:
                ctx.skip("graph", f"not worth it on {ctx.target.name}: merged estimated "
                                  f"{after:.3g} ms vs {before:.3g} ms unmerged (matching and "
                                  f"gathers cost more than the smaller blocks save; a larger r, "
                                  f"or gate: false, forces it)")
                return
        gm.graph = trial.graph
        if failures:
            ctx.details["fallback"] = f"merge mode refused ({failures[0]}); unmerge used"
        ctx.details.update(mode=mode, blocks=blocks)
        ctx.record("blocks_merged", sum(b["r"] > 0 for b in blocks))
        ctx.record("tokens_merged", sum(b["r"] for b in blocks))
        return
    for f in failures:
        ctx.skip("graph", f"cannot follow the token axis: {f}")


def _estimated_ms(gm: torch.fx.GraphModule, ctx: PassContext) -> float:
    return estimate(gm, ctx.target.spec, ctx.target.calibration).seconds * 1e3


def _unmergeable_attention(n: torch.fx.Node, masks: dict) -> str | None:
    q, k, v, mask, scale, causal = n.args
    if causal:
        return "causal attention (a decoder): merging would mix future tokens into past ones"
    if shape(q)[-2] != shape(k)[-2]:
        return f"cross-attention ({shape(q)[-2]} queries, {shape(k)[-2]} keys)"
    if mask is None:  # fuse_attention already dropped masks that let everything through
        return None
    attend = masks[mask]
    attend = attend if attend.dtype == torch.bool else attend == 0
    if torch.equal(attend.tril(), attend) and not attend.all():
        return "causal mask (a decoder): merging would mix future tokens into past ones"
    return "masked attention (padding mask): merged tokens would cross the mask"


def _apply(gm, cfg: MergeTokensConfig, mode: str, args, kwargs) -> list[dict]:
    """Insert the merges block by block; returns one record per block."""
    refresh_meta(gm, args, kwargs, fake=True)
    protect = cfg.protect if cfg.protect >= 0 else _leading_constant_tokens(gm)
    blocks, size, sizes = [], None, {}
    attns = [n for n in gm.graph.nodes if n.target is ATTENTION]
    for i, attn in enumerate(attns):
        n_tok = shape(attn.args[0])[-2]
        r = n_tok - merged_count(n_tok, cfg.r_at(i), protect)
        record = {"block": i, "where": module_path(attn), "tokens_in": n_tok, "r": r}
        blocks.append(record)
        if r == 0:
            continue
        if mode == "merge":
            size = _merge_after_residual(gm, attn, r, protect, size)
            sizes.update({later: size for later in attns[i + 1:]})
        else:
            _merge_around_attention(gm, attn, r, protect)
        gm.graph.lint()
        gm.recompile()
        refresh_meta(gm, args, kwargs, fake=True)
        record["tokens_out"] = n_tok - r
    if cfg.proportional_attention and sizes:
        # added last: while later merges re-shape the graph, masks would hold stale counts
        _bias_attentions(gm, sizes)
        gm.graph.lint()
        gm.recompile()
        refresh_meta(gm, args, kwargs, fake=True)
    return blocks


def _leading_constant_tokens(gm) -> int:
    """Tokens concatenated in front of the sequence from weights only (CLS, registers)."""
    for n in gm.graph.nodes:
        if n.target is aten.cat.default and (n.args[1] if len(n.args) > 1 else 0) in (1, -2):
            first = n.args[0][0]
            if not depends_on_inputs(first):
                return shape(first)[1]
            return 0
        if n.target is ATTENTION:
            return 0
    return 0


def _residual_add(attn: torch.fx.Node) -> torch.fx.Node:
    """The add that puts the attention branch back onto the residual stream."""
    below = downstream(attn)
    for n in attn.graph.nodes:
        if n in below and n.target is aten.add.Tensor and len(n.args) == 2 and \
                all(isinstance(a, torch.fx.Node) for a in n.args):
            a, b = n.args
            if (a in below or a is attn) != (b in below or b is attn) and shape(a) == shape(n):
                return n
    raise TokenAxisError(f"no residual add after the attention at {module_path(attn)}")


def _merge_after_residual(gm, attn, r: int, protect: int, size):
    add = _residual_add(attn)
    n_tok = shape(add)[1]
    with gm.graph.inserting_after(add):
        m = gm.graph.call_function(MERGE, (add, attn.args[1], size, r, protect))
    with gm.graph.inserting_after(m):
        x = gm.graph.call_function(operator.getitem, (m, 0))
    x.meta = dict(add.meta)  # the old shape: retarget reads shapes as they were
    with gm.graph.inserting_after(x):
        new_size = gm.graph.call_function(operator.getitem, (m, 1))
    add.replace_all_uses_with(x, delete_user_cb=lambda u: u is not m)
    retarget(gm, x, n_tok, n_tok - r)
    return new_size


def _bias_attentions(gm, sizes: dict) -> None:
    """Proportional attention: scores + log(size of each key token)."""
    for attn, size in sizes.items():
        q, k, v, mask, scale, causal = attn.args
        with gm.graph.inserting_before(attn):
            log = gm.graph.call_function(aten.log.default, (size,))
            bias = gm.graph.call_function(aten.unsqueeze.default, (
                gm.graph.call_function(aten.transpose.int, (log, 1, 2)), 1))
        attn.args = (q, k, v, bias, scale, causal)


def _merge_around_attention(gm, attn, r: int, protect: int) -> None:
    """tomesd: merge the attention input, unmerge the branch output before the residual add."""
    q, k, v = attn.args[:3]
    src = _common_source(q, k, v)
    add = _residual_add(attn)
    below_attn = downstream(attn)
    branch = next(a for a in add.args if a in below_attn or a is attn)
    n_tok = shape(src)[1]
    with gm.graph.inserting_after(src):
        m = gm.graph.call_function(MERGE, (src, src, None, r, protect))
    with gm.graph.inserting_after(m):
        x = gm.graph.call_function(operator.getitem, (m, 0))
    with gm.graph.inserting_after(x):
        dest = gm.graph.call_function(operator.getitem, (m, 2))
    with gm.graph.inserting_before(add):
        back = gm.graph.call_function(UNMERGE, (branch, dest))
    x.meta, back.meta = dict(src.meta), dict(branch.meta)
    users = [u for u in src.users if u is not m and (u in upstream(attn) or u is attn)]
    for u in users:
        u.replace_input_with(src, x)
    add.replace_input_with(branch, back)
    retarget(gm, x, n_tok, n_tok - r, stop=frozenset({back}))


def _common_source(q, k, v) -> torch.fx.Node:
    """The [B, N, C] tensor the q, k and v projections all read (the normalized block input)."""
    common = upstream(q) & upstream(k) & upstream(v)
    best = None
    for n in common:
        s = shape(n)
        if s is not None and len(s) == 3 and s[1] == shape(q)[-2] and n.op == "call_function":
            if best is None or best in upstream(n):
                best = n  # the latest common [B, N, C] tensor
    if best is None:
        raise TokenAxisError(f"q, k and v of {module_path(q)} share no [B, N, C] input")
    return best

