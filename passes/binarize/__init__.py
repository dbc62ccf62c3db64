"""binarize: linear(x, W, b) ⇒ optim::linear_binary(x, packed sign(W), α, b', τ) (1-bit weights,
1-bit activations by default) on the packed XNOR/popcount kernel.

Every linear with a constant weight inside a numbered transformer block (`…layer.3…`,
`…h.0…`, `…blocks.2…`) is binarized: sign weights with one scale per output channel (or per
`group_size` inputs), and with `activations: binary` its input is centred by a calibrated
per-channel threshold τ and binarized per token (XNOR-Net scales; τ folded into the bias
exactly). Embeddings, norms, softmax and linears outside the blocks (patch embeddings, timestep
embedders, heads) stay float. Training-free binarization of a pretrained transformer loses a
lot; `distill_steps` fits each binary layer (latent weights, scales, τ; straight-through
estimator) to the float layer's output on calibration data, in graph order and fed by the
already-binarized layers before it, so each layer also absorbs the error upstream. Then
`qat_steps` trains all binary layers at once against the original model's outputs, as
`optimize` recorded them before the first pass (`passes.binarize.qat`; kept only if the held-out
output error falls). Numerics: lossy; each
layer's held-out SQNR before and after distillation, and the end-to-end output error before and
after training, are reported.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx

import optim.ops  # noqa: F401  (registers torch.ops.optim)
from optim.ir import add_constant, get_constant, module_path
from optim.pass_base import Lossy, PassContext, register_pass
from passes.binarize import binary
from passes.binarize import qat as binary_qat
from passes.common.graph_runner import run, split_held_out
from passes.common.linears import (
    constant_linears,
    input_rows,
    linear_input,
    weight_and_bias,
    weight_axis,
)

BLOCK = re.compile(r"(^|\.)\d+(\.|$)")  # a numbered container: a transformer block


@dataclass(frozen=True)
class BinarizeConfig:
    """Options for binarize."""

    activations: Literal["binary", "float"] = "binary"  # float: weights-only (no speedup on CPU)
    group_size: int = 0  # 0: one scale per output channel; else inputs per scale, multiple of 64
    distill_steps: int = 100  # Adam steps per layer of output matching (0: training-free)
    lr: float = 1e-3
    rows: int = 4096  # calibration rows per layer used for thresholds and distillation
    qat_steps: int = 0  # then Adam steps training all binary layers at once against the model
    qat_lr: float = 1e-3
    skip: tuple[str, ...] = ("classifier", "lm_head", "pooler", "head", "proj_out")

    def validate(self) -> None:
        if self.group_size < 0 or self.group_size % binary.WORD:
            raise ValueError("group_size must be 0 (per channel) or a positive multiple of 64")
        if self.distill_steps < 0:
            raise ValueError("distill_steps must be >= 0")
        if not 0 < self.lr < 1:
            raise ValueError("lr must be in (0, 1)")
        if self.qat_steps < 0:
            raise ValueError("qat_steps must be >= 0")
        if not 0 < self.qat_lr < 1:
            raise ValueError("qat_lr must be in (0, 1)")
        if self.rows < 16:
            raise ValueError("rows must be >= 16")


@register_pass("binarize", config=BinarizeConfig, numerics=Lossy("cosine_min", 0.0),
               requires=("cleanup",), expects=("linear_binary",), teacher=True)
def binarize(gm: torch.fx.GraphModule, cfg: BinarizeConfig, ctx: PassContext) -> None:
    """Binarize block linears (sign × scale weights; binary activations on packed kernels)."""
    chosen = []
    for n in constant_linears(gm):
        where = module_path(n)
        k = get_constant(gm, weight_and_bias(n)[0]).shape[weight_axis(n, "in")]
        hit = next((s for s in cfg.skip if s in where.split(".")), None)
        if hit:
            ctx.skip(where, f"in the skip list ({hit!r}: output heads stay float)")
        elif not BLOCK.search(where):
            ctx.skip(where, "outside the transformer blocks (first/last layers stay float)")
        elif cfg.group_size and k % cfg.group_size:
            ctx.skip(where, f"{k} inputs are not a multiple of group_size {cfg.group_size}")
        else:
            chosen.append(n)
    batches = ctx.calibration or [ctx.example_inputs]
    reference = input_rows(gm, chosen, batches, limit=cfg.rows)  # the float model's inputs
    teacher = {}  # the original model's outputs (recorded by optimize), else this graph's
    if cfg.qat_steps:
        teacher = ctx.teacher if all(id(b) in ctx.teacher for b in batches) else \
            {id(b): run(gm, b) for b in batches}
    layers, magnitudes = [], {}
    for n in chosen:  # graph order: each layer sees the binarized layers before it
        w_node, b_node = weight_and_bias(n)
        w = get_constant(gm, w_node).float()
        w = w if weight_axis(n, "in") == 1 else w.T
        b = get_constant(gm, b_node).float() if b_node is not None else None
        # the target is the float model's own layer output (on its own inputs), not this layer
        # applied to the binarized inputs: measured on MiniLM, chasing the float model gave
        # embedding cosine 0.21 vs 0.10 for the local target, at 100 steps
        target = reference[n] @ w.T + (b if b is not None else 0)
        x_now = input_rows(gm, [n], batches, limit=cfg.rows)[n]
        layer, fit = binary.fit(w, b, x_now, target, cfg.group_size,
                                cfg.activations == "binary", cfg.distill_steps, cfg.lr)
        where = module_path(n)
        consts = [add_constant(gm, f"{w_node.target}_bits", layer.weight_bits, n),
                  add_constant(gm, f"{w_node.target}_alpha", layer.weight_scale, n)]
        consts.append(None if layer.bias is None
                      else add_constant(gm, f"{w_node.target}_bias_folded", layer.bias, n))
        consts.append(None if layer.threshold is None
                      else add_constant(gm, f"{w_node.target}_tau", layer.threshold, n))
        with gm.graph.inserting_before(n):
            new = gm.graph.call_function(torch.ops.optim.linear_binary.default,
                                         (linear_input(n), *consts, layer.in_features))
        new.meta = dict(n.meta)
        magnitudes[new.name] = w.abs()
        n.replace_all_uses_with(new)
        gm.graph.erase_node(n)
        ctx.record("linear_binary")
        layers.append({"where": where, "shape": f"{w.shape[0]}x{w.shape[1]}",
                       "sqnr_db_training_free": round(fit["sqnr_db_before"], 2),
                       "sqnr_db": round(fit["sqnr_db"], 2)})
    ctx.details.update(activations=cfg.activations, group_size=cfg.group_size,
                       distill_steps=cfg.distill_steps, layers=layers)
    if cfg.qat_steps and layers:
        train, held = split_held_out(batches)
        if len(batches) == 1:
            ctx.skip("qat", "only one calibration batch: the end-to-end error is measured on "
                            "the batch it was trained on (give more batches to hold some out)")
        result = binary_qat.distill(gm, magnitudes, train, held, teacher, cfg.qat_steps,
                                    cfg.qat_lr, seed=0)
        if not result["kept"]:
            ctx.skip("qat", "end-to-end training did not lower the held-out output error; the "
                            "per-layer fit is kept (try more steps, another qat_lr, or more "
                            "calibration data)")
        ctx.details.update(qat={**result, "train_batches": len(train),
                                "held_out_batches": len(held)})
