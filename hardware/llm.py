"""LLM inference phases on a target: prefill (time to first token) and decode (per-token latency,
tokens/s) with a KV cache of a given length and batch, on one device or tp x pp devices.

No weights are needed: the caller passes `capture(shape, batch, seq)`, the kernels of a 2-layer
copy of the decoder (`optim.llm` captures it on the meta device). The second layer's kernels
stand for every later one (decoder layers are identical), so a 70B config costs seconds. Decode
is the seq=1 graph with each attention reading the whole cache: the K/V of `context_len` tokens
(the shape's KV heads x head_dim per layer) move as the `kv_cache` byte class. Users call
`optim.llm.estimate_llm("llama2-7b", "a100")`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

from hardware import fpga
from hardware.costmodel import Calibration, estimate_kernels
from hardware.llm_shape import LLMShape, llm_shape
from hardware.opcost import BYTES, Kernel
from hardware.parallel import allreduce_s, check_parallel, p2p_s, shard_tp
from hardware.spec import HardwareSpec
from optim.errors import ConfigError

WEIGHT_FORMATS = {"fp16": ("fp16", 2.0), "bf16": ("bf16", 2.0), "fp8": ("fp8", 1.0),
                  "int8": ("int8", 1.0), "int4": ("int4", 0.5)}


def _layer(k: Kernel) -> int | None:
    """The decoder layer a kernel belongs to: the first numeric part of its module path
    (`model.layers.1.mlp`, `transformer.h.1.attn`, `model.decoder.layers.1.fc1`), else None."""
    return next((int(p) for p in k.module.split(".") if p.isdigit()), None)


def _as_layer(k: Kernel, i: int) -> Kernel:
    """Kernel `k` of the template layer, renamed as layer `i`'s."""
    parts = k.module.split(".")
    at = next(j for j, p in enumerate(parts) if p.isdigit())
    return replace(k, module=".".join(parts[:at] + [str(i)] + parts[at + 1:]))


Capture = Callable[[LLMShape, int, int], Sequence[Kernel]]  # (shape, batch, seq) -> 2 layers


def decoder_kernels(shape: LLMShape, capture: Capture, *, batch: int, seq: int,
                    context_len: int | None = None, weights: str = "fp16",
                    kv: str = "fp16") -> list[Kernel]:
    """All kernels of one forward of `shape` over `seq` new tokens per sequence; with
    `context_len`, attention reads a KV cache of that many tokens (decode)."""
    if weights not in WEIGHT_FORMATS:
        raise ConfigError(f"weights={weights!r}; valid: {', '.join(WEIGHT_FORMATS)}")
    if kv not in BYTES:
        raise ConfigError(f"kv={kv!r}; valid: fp16, bf16, fp8, int8, int4")
    base = list(capture(shape, batch, seq))
    template = [k for k in base if _layer(k) == 1]
    if not template:
        raise ConfigError("could not find decoder layer 1 in the captured graph")
    if context_len is not None and not any(k.kind == "attention" for k in template):
        raise ConfigError(f"{shape.name}: no fused attention in the captured decoder layer, so "
                          f"decode's KV-cache reads have nowhere to go; its attention is not "
                          f"one fuse_attention recognizes (softcapping?): use an LLMShape")
    kernels = [k for k in base if _layer(k) != 1]
    for i in range(1, shape.layers):
        kernels += [_as_layer(k, i) for k in template]
    return [_retype(_with_cache(k, shape, context_len, kv), weights) for k in kernels]


def _retype(k: Kernel, weights: str) -> Kernel:
    """fp16 capture -> the deployed weight format: bytes shrink; int8 weights with int8
    activations run int8 math (W8A8), int4 weights dequantize to fp16 math (W4A16)."""
    dtype, nbytes = WEIGHT_FORMATS[weights]
    if k.kind != "gemm" or not k.bytes.get("weights") or weights in ("fp16",):
        return k
    b = dict(k.bytes)
    b["weights"] = b["weights"] / 2.0 * nbytes
    math_dtype = {"int4": "fp16", "bf16": "bf16"}.get(weights, dtype)
    return replace(k, bytes=b, dtype=math_dtype, weight_format=weights)


def _with_cache(k: Kernel, shape: LLMShape, context_len: int | None, kv: str) -> Kernel:
    """Attention over a KV cache of `context_len` tokens: it reads the shape's K and V
    (kv_heads x head_dim each, per token) besides the new tokens' Q, K, V and output."""
    if k.kind != "attention" or context_len is None:
        return k
    b, h, lq, _, d = k.shape
    q_out = 2 * b * h * lq * d * 2.0
    new_kv = 2 * b * lq * shape.kv_heads * shape.head_dim * 2.0  # written to the cache (fp16)
    cache = b * context_len * shape.kv_bytes_per_token(BYTES[kv]) / shape.layers
    flops = 4.0 * b * h * lq * context_len * d + 5.0 * b * h * lq * context_len
    return replace(k, flops=flops, shape=(b, h, lq, context_len, d),
                   bytes={"weights": 0.0, "activations": q_out + new_kv, "kv_cache": cache})


def _phase(kernels: list[Kernel], spec, cal, shape: LLMShape, tokens: int, tp: int, pp: int,
           act_bytes: float) -> dict:
    est = estimate_kernels(shard_tp(kernels, tp), spec, cal, "fp16")
    # two all-reduces per layer of the layer's activations (tokens x hidden, fp16)
    comm = 2 * shape.layers * allreduce_s(spec, tokens * shape.hidden * act_bytes, tp)
    pp_hops = (pp - 1) * p2p_s(spec, tokens * shape.hidden * act_bytes) if pp > 1 else 0.0
    latency = est.seconds + comm + pp_hops
    stage = (est.seconds + comm) / pp  # steady state with pp micro-batches in flight
    return {"seconds": latency, "compute_s": est.seconds, "tp_comm_s": comm,
            "pp_transfer_s": pp_hops, "bound": est.bound, "roofline_s": est.roofline_s,
            "pipelined_stage_s": stage, "bytes_by_class": est.bytes_by_class(),
            "notes": est.notes()}


def _fpga(shape: LLMShape, spec, batch: int, prompt_len: int, ctx: int, weights: str,
          kv: str) -> dict:
    """FPGA targets use the instruction-level model (hardware/fpga.py), same result layout."""
    bits = {"weight_bits": WEIGHT_FORMATS[weights][1] * 8, "kv_bits": BYTES[kv] * 8,
            "act_bits": 8}
    pre = fpga.estimate_llm(spec, shape, phase="prefill", batch=batch, prompt_len=prompt_len,
                            **bits)
    dec = fpga.estimate_llm(spec, shape, phase="decode", batch=batch, prompt_len=prompt_len,
                            context_len=ctx, **bits)
    weight_bytes = shape.parameters() * WEIGHT_FORMATS[weights][1]
    kv_bytes = batch * ctx * shape.kv_bytes_per_token(BYTES[kv])
    phase = lambda e: {"seconds": e.seconds, "bound": e.bound, "notes": [],  # noqa: E731
                       "bytes_by_class": e.hbm_bytes, "instructions": e.instructions,
                       "tp_comm_s": 0.0, "pp_transfer_s": 0.0, "compute_s": e.seconds}
    return {
        "model": shape.name, "parameters": shape.parameters(), "shape": shape_summary(shape),
        "target": spec.name,
        "status": "estimated", "devices": {"tp": 1, "pp": 1},
        "by": "optim FPGA instruction-level model (hardware/fpga.py, FlightLLM-style), "
              "unvalidated on this hardware",
        "settings": {"batch": batch, "prompt_len": prompt_len, "context_len": ctx,
                     "weights": weights, "kv": kv, "activations": "int8"},
        "prefill": {"ttft_s": pre.seconds, **phase(pre)},
        "decode": {**phase(dec), "tokens_per_s": dec.tokens_per_s},
        "memory": {"weights_bytes": weight_bytes, "kv_cache_bytes": kv_bytes,
                   "per_device_bytes": weight_bytes + kv_bytes,
                   "capacity_bytes": spec.mem_capacity.value, "fits": dec.fits_memory},
    }


def shape_summary(shape: LLMShape) -> dict:
    """The shape an estimate used, as the result's `shape` block."""
    return {"layers": shape.layers, "hidden": shape.hidden, "heads": shape.heads,
            "kv_heads": shape.kv_heads, "head_dim": shape.head_dim, "ffn": shape.ffn,
            "gated_mlp": shape.gated_mlp, "vocab": shape.vocab, "tied_lm_head": shape.tied,
            "kv_bytes_per_token_fp16": shape.kv_bytes_per_token(2.0)}


def estimate_llm(model: str | LLMShape, spec: HardwareSpec, cal: Calibration, capture: Capture,
                 *, batch: int = 1, prompt_len: int = 512, context_len: int | None = None,
                 weights: str = "fp16", kv: str = "fp16", tp: int = 1, pp: int = 1) -> dict:
    """Prefill and decode estimates for a decoder LLM (a Llama-2 name like `llama2-7b`, an
    `LLMShape`, or a transformers config read by its attributes) on `spec` with calibration
    `cal`, over `tp` x `pp` devices. `optim.llm.estimate_llm` takes the shape from the model
    itself (any causal-LM family) and is the one to use for configs."""
    shape = model if isinstance(model, LLMShape) else (
        llm_shape(model) if isinstance(model, str) else LLMShape.from_config(model))
    check_parallel(spec, tp, pp)
    if batch < 1 or prompt_len < 1:
        raise ConfigError(f"batch and prompt_len must be >= 1, got {batch}, {prompt_len}")
    if weights not in WEIGHT_FORMATS:
        raise ConfigError(f"weights={weights!r}; valid: {', '.join(WEIGHT_FORMATS)}")
    ctx = context_len or prompt_len
    if spec.kind == "fpga":
        return _fpga(shape, spec, batch, prompt_len, ctx, weights, kv)
    devices = tp * pp
    prefill = _phase(decoder_kernels(shape, capture, batch=batch, seq=prompt_len, weights=weights,
                                     kv=kv), spec, cal, shape, batch * prompt_len, tp, pp, 2.0)
    decode = _phase(decoder_kernels(shape, capture, batch=batch, seq=1, context_len=ctx,
                                    weights=weights, kv=kv), spec, cal, shape, batch, tp, pp, 2.0)
    decode["tokens_per_s"] = batch / decode["seconds"]
    decode["tokens_per_s_pipelined"] = batch / decode["pipelined_stage_s"]
    weight_bytes = shape.parameters() * WEIGHT_FORMATS[weights][1]
    kv_bytes = batch * ctx * shape.kv_bytes_per_token(BYTES[kv])
    per_device = (weight_bytes + kv_bytes) / devices
    return {
        "model": shape.name, "parameters": shape.parameters(), "shape": shape_summary(shape),
        "target": spec.name,
        "status": "estimated", "devices": {"tp": tp, "pp": pp},
        "by": f"optim cost model, meta-device capture, calibration: {cal.source}",
        "settings": {"batch": batch, "prompt_len": prompt_len, "context_len": ctx,
                     "weights": weights, "kv": kv},
        "prefill": {"ttft_s": prefill["seconds"], **prefill},
        "decode": decode,
        "memory": {"weights_bytes": weight_bytes, "kv_cache_bytes": kv_bytes,
                   "per_device_bytes": per_device,
                   "capacity_bytes": spec.mem_capacity.value,
                   "fits": per_device <= spec.mem_capacity.value},
    }
