"""linearize_attention: optim::attention (softmax, O(L²)) ⇒ linear attention aten ops (O(L)).

Each fused attention becomes φ(q)·(φ(k)ᵀ·v) / φ(q)·(φ(k)ᵀ·1) (or Flowformer's flow attention),
spliced in as plain aten ops so every backend runs it
(`passes.linearize_attention.linear_attention` holds the math). Methods: `hedgehog` (learned
feature maps fitted per layer to the layer's softmax attention output on calibration data:
attention transfer, LoLCATs stage 1), `ecoformer` (binary hash codes of q and k, EcoFormer-style,
their projection fitted the same way), and the training-free `elu`, `performer` (FAVOR+) and
`flow` (Flowformer), which published work and this pass's report show to be poor without
training.

Causal attention (a causal flag or a causal mask) gets the chunked causal form; a decoder then
needs a fixed [H, d′, d+1] state per sequence instead of a KV cache (`recurrent_step`). Padding
masks become zeroed key features. Masks that are neither (additive biases such as ALiBi) are
refused with the reason. `finetune_steps` adds LoLCATs' stage 2: low-rank corrections of every
linear, fitted so the model's outputs match the original's on calibration data, folded into the
weights. With `gate` (default), an attention is rewritten only where the
target's cost model estimates the linear form faster than fused softmax attention at its
sequence length; the others are skipped with both estimates. Requires: fuse_attention.
Numerics: lossy; per-layer attention-output error on the calibration data is reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
import torch.fx
import torch.nn.functional as F

import optim.host_memory as host_memory
import optim.ops  # noqa: F401  (registers torch.ops.optim)
import passes.linearize_attention.feature_map_fit as feature_fit
import passes.linearize_attention.linear_attention as la
import passes.linearize_attention.lora_distill as lora_distill
from hardware.estimate import estimate
from hardware.opcost import KERNEL_RULES, graph_kernels
from hardware.target import Target
from optim.ir import evaluate_nodes, module_path, refresh_meta, shape, splice, trace_function
from optim.pass_base import Lossy, PassContext, register_pass
from passes.common.graph_runner import run as run_graph
from passes.common.linears import constant_linears

ATTENTION = torch.ops.optim.attention.default


MAX_FEATURES = 4096  # far above any published feature map (Performer: 256) or rank


@dataclass(frozen=True)
class LinearizeAttentionConfig:
    """Options for linearize_attention."""

    method: Literal["hedgehog", "elu", "performer", "flow", "ecoformer"] = "hedgehog"
    # feature size per head (hedgehog: ×2 for ±; ecoformer: hash bits); 0: head_dim
    # (performer: 4×, ecoformer: 16 bits)
    features: int = 0
    gate: bool = True  # rewrite only where the target's cost model says linear is faster
    fit_steps: int = 300  # hedgehog, ecoformer: Adam steps of attention transfer per layer
    fit_lr: float = 1e-2
    fit_batches: int = 4  # hedgehog: calibration batches the maps are fitted on
    chunk: int = la.CHUNK  # causal form: positions per chunk (0: 64)
    seed: int = 0  # performer: random projection seed
    # LoLCATs stage 2: rank-r corrections of every linear, fitted so the whole model's outputs
    # match the original's on the calibration batches, then folded into the weights (0: off)
    finetune_steps: int = 0
    finetune_rank: int = 8
    finetune_lr: float = 1e-3

    def validate(self) -> None:
        if self.features < 0 or self.fit_steps < 0 or self.fit_batches < 1 or self.chunk < 0:
            raise ValueError("features, fit_steps and chunk must be >= 0 (chunk 0: the default, "
                             "64 positions); fit_batches >= 1")
        if self.features > MAX_FEATURES or self.finetune_rank > MAX_FEATURES:
            raise ValueError(f"features and finetune_rank must be <= {MAX_FEATURES:,} (sizes of "
                             f"the feature map and of the low-rank correction)")
        if self.finetune_steps < 0 or self.finetune_rank < 1 or not 0 < self.finetune_lr < 1:
            raise ValueError("finetune_steps must be >= 0, finetune_rank >= 1, "
                             "finetune_lr in (0, 1)")


@register_pass("linearize_attention", config=LinearizeAttentionConfig,
               numerics=Lossy("cosine_min", 0.8), requires=("fuse_attention",),
               expects=("attention_linearized",))
def linearize_attention(gm: torch.fx.GraphModule, cfg: LinearizeAttentionConfig,
                        ctx: PassContext) -> None:
    """Replace softmax attention by linear attention (learned, elu+1, Performer or Flowformer)."""
    attns = [n for n in gm.graph.nodes if n.target is ATTENTION]
    if not attns:
        ctx.skip("graph", "no fused attention (run fuse_attention first)")
        return
    batches = (ctx.calibration or [ctx.example_inputs])[:cfg.fit_batches]
    wanted = [a for n in attns for a in n.args[:4] if isinstance(a, torch.fx.Node)]
    samples = [evaluate_nodes(gm, wanted, *b) for b in batches]
    if cfg.finetune_steps:
        with torch.no_grad():
            teacher = [run_graph(gm, b) for b in batches]
    target = ctx.target.name
    layers = []
    for n in attns:
        where = module_path(n)
        q, k, v, mask, scale, causal = n.args
        kind = _mask_kind(samples[0][mask] if mask is not None else None, causal,
                          shape(q)[-2], shape(k)[-2])
        if kind.startswith("refuse:"):
            ctx.skip(where, kind[len("refuse:"):])
            continue
        causal = kind.startswith("causal")
        padded = kind.endswith("padding")
        params = _initial_params(cfg, shape(q), scale)
        fn = partial(_linear_fn, cfg.method, causal, float(scale), cfg.chunk, list(params))
        inputs = [q, k, v, *([mask] if padded else []), *params.values()]
        layer = {"where": where, "batch": shape(q)[0], "heads": shape(q)[1],
                 "head_dim": shape(q)[-1], "q_len": shape(q)[-2], "k_len": shape(k)[-2],
                 "mask": kind}
        layers.append(layer)
        sub = trace_function(fn, inputs)
        soft_ms, lin_ms = _estimates(n, sub, ctx.target)
        layer.update(estimated_ms={"softmax": round(soft_ms, 4), "linear": round(lin_ms, 4)})
        if cfg.gate and lin_ms >= soft_ms:
            layer["rewritten"] = False
            ctx.skip(where, f"below break-even on {target}: linear estimated {lin_ms:.3g} ms vs "
                            f"softmax {soft_ms:.3g} ms at {shape(k)[-2]} keys (gate: false "
                            f"forces it)")
            continue
        data = [_layer_sample(s, q, k, v, mask if padded else None) for s in samples]
        if cfg.method in ("hedgehog", "ecoformer"):
            fit_fn = (feature_fit.fit_hedgehog if cfg.method == "hedgehog"
                      else feature_fit.fit_ecoformer)
            fitted, fit = fit_fn(data, causal, float(scale), _features(cfg, shape(q)),
                                 cfg.fit_steps, cfg.fit_lr, ctx.seed + len(layers))
            params.update(fitted)
            layer["fit"] = {k: round(v, 5) if isinstance(v, float) else v for k, v in fit.items()}
            inputs = [q, k, v, *([mask] if padded else []), *params.values()]
        layer.update(_attention_error(cfg.method, data, causal, float(scale), params, cfg.chunk))
        if causal:
            d_state = _features(cfg, shape(q)) * (2 if cfg.method == "hedgehog" else 1)
            layer["state_values_per_sequence"] = shape(q)[1] * d_state * (shape(v)[-1] + 1)
            layer["kv_cache_values_per_sequence"] = 2 * shape(k)[1] * shape(k)[-2] * shape(k)[-1]
        out = splice(gm, sub, inputs, n, name=f"linear_attention_{cfg.method}")
        n.replace_all_uses_with(out)
        gm.graph.erase_node(n)
        layer["rewritten"] = True
        ctx.record("attention_linearized")
        ctx.record(f"{cfg.method}_{'causal' if causal else 'bidirectional'}")
    ctx.details.update(method=cfg.method, target=target, layers=layers)
    hint = host_memory_hint(layers)
    if hint:
        ctx.details["host_memory"] = hint
    if ctx._counts and cfg.finetune_steps:
        ctx.details["finetune"] = lora_distill.distill(
            gm, constant_linears(gm), batches, teacher, cfg.finetune_rank, cfg.finetune_steps,
            cfg.finetune_lr, ctx.seed)
    if ctx._counts:
        gm.recompile()
        refresh_meta(gm, *ctx.example_inputs, fake=True)


def host_memory_hint(layers: list[dict], bytes_per_value: int = 4) -> str | None:
    """Advice when a rewritten layer's [B, H, L, D] tensors pass glibc's 32 MB mmap threshold:
    each is then faulted in page by page on every call (`optim.host_memory`)."""
    sizes = [lay["batch"] * lay["heads"] * max(lay["q_len"], lay["k_len"]) * lay["head_dim"]
             * bytes_per_value for lay in layers if lay.get("rewritten")]
    if not sizes or max(sizes) <= host_memory.MMAP_THRESHOLD_MAX:
        return None
    return (f"the linear attention's [B, H, L, D] tensors reach {max(sizes) / 2**20:.0f} MB, over "
            "glibc's 32 MB mmap threshold: each is faulted in afresh on every call, which made "
            "bidirectional flow 2x slower at 16384 tokens on the CPU it was measured on; run "
            "with `optim run --keep-freed-memory` or call "
            "optim.host_memory.keep_freed_memory() first")


def _linear_fn(method, causal, scale, chunk, names, q, k, v, *rest):
    padded = len(rest) > len(names)
    valid = valid_keys(rest[0], q.dtype) if padded else None
    params = dict(zip(names, rest[1:] if padded else rest))
    return la.attend(method, q, k, v, valid, causal, scale, params, chunk)


def valid_keys(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, Lk, 1], 1 for keys the last query may attend (a padding mask's real keys)."""
    row = mask[..., -1:, :][:, :1]
    keep = row if row.dtype == torch.bool else row > -1.0
    return keep.to(dtype).transpose(-2, -1)


def _mask_kind(mask: torch.Tensor | None, causal: bool, lq: int, lk: int) -> str:
    """none | padding | causal | causal+padding, or 'refuse:<reason>'."""
    if causal and lq != lk:
        return "refuse:causal cross-attention (queries and keys differ in length)"
    if mask is None:
        return "causal" if causal else "none"
    if mask.dtype != torch.bool:
        if not bool(((mask == 0) | (mask <= -1e4)).all()):
            return ("refuse:the mask is an additive bias (ALiBi or relative positions), not "
                    "0/-inf: linear attention has no scores to add it to")
        mask = mask == 0
    attend = mask.expand(mask.shape[0], mask.shape[1], lq, lk)
    if not bool((attend == attend[:, :1]).all()):
        return "refuse:the mask differs between heads"
    keys = attend[:, :1, -1:, :]  # what the last query sees
    tril = torch.ones(lq, lk, dtype=torch.bool).tril()
    padding = "" if bool(keys.all()) else "+padding"
    if torch.equal(attend[:, :1], keys.expand_as(attend[:, :1])) and not causal:
        return "padding" if padding else "none"
    if lq == lk and torch.equal(attend[:, :1], keys & tril):
        return "causal" + padding
    return ("refuse:the mask is neither a padding mask nor a causal one (e.g. sliding window or "
            "left padding): linear attention cannot express it")


def _features(cfg: LinearizeAttentionConfig, q_shape) -> int:
    d = q_shape[-1]
    return cfg.features or {"performer": 4 * d, "ecoformer": 16}.get(cfg.method, d)


def _initial_params(cfg: LinearizeAttentionConfig, q_shape, scale: float) -> dict:
    if cfg.method == "performer":
        return {"w": la.performer_projection(q_shape[-1], _features(cfg, q_shape), cfg.seed)}
    if cfg.method == "hedgehog":
        return feature_fit.hedgehog_init(q_shape[1], q_shape[-1], _features(cfg, q_shape), scale)
    if cfg.method == "ecoformer":  # shapes only: drawn from the layer's keys before fitting
        h, d, m = q_shape[1], q_shape[-1], la.ECO_ANCHORS
        return {"anchors": torch.zeros(h, m, d), "proj": torch.zeros(h, m, _features(cfg, q_shape)),
                "mu": torch.zeros(h, m), "gamma": torch.ones(h)}
    return {}


def _layer_sample(values: dict, q, k, v, mask) -> tuple:
    valid = valid_keys(values[mask], values[q].dtype) if mask is not None else None
    return values[q], values[k], values[v], valid


def _attention_error(method, data, causal, scale, params, chunk) -> dict:
    """The linear attention's output against the layer's softmax output, on calibration data
    (each layer fed the original model's q, k, v)."""
    err = energy = 0.0
    cos = []
    for q, k, v, valid in data:
        ref = la.softmax_reference(q, k, v, valid, causal, scale)
        out = la.attend(method, q, k, v, valid, causal, scale, params, chunk)
        err += float(((out - ref) ** 2).sum())
        energy += float((ref ** 2).sum())
        cos.append(F.cosine_similarity(out.flatten(2), ref.flatten(2), dim=-1).flatten())
    cos = torch.cat(cos)
    return {"attention_relative_mse": round(err / max(energy, 1e-30), 5),
            "attention_cosine_mean": round(float(cos.mean()), 5),
            "attention_cosine_min": round(float(cos.min()), 5)}


def _estimates(n: torch.fx.Node, sub: torch.fx.GraphModule, target: Target) -> tuple[float, float]:
    """Estimated ms of the fused softmax attention `n` and of its linear replacement `sub`."""

    soft = estimate([KERNEL_RULES["optim.attention"](n)], target.spec, target.calibration).seconds
    lin = estimate(graph_kernels(sub), target.spec, target.calibration).seconds
    return soft * 1e3, lin * 1e3
