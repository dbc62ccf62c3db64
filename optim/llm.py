"""LLM prefill and decode estimates from a config, without weights: the decoder is captured on the
meta device (fake tensors carry only shapes and dtypes) and the cost model in `hardware.llm`
scales its second layer to every layer.

    from optim.llm import estimate_llm
    r = estimate_llm("llama2-7b", "a100", batch=1, prompt_len=512, context_len=1024)
    r["decode"]["tokens_per_s"]
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import passes  # noqa: F401  (registers cleanup and fuse_attention)
from hardware import llm
from hardware.llm_shape import LLMShape
from hardware.opcost import Kernel, graph_kernels
from optim.ir import capture
from optim.pass_base import PassContext
from optim.pipeline import Pipeline
from optim.targets import Target, resolve_target

__all__ = ["estimate_llm", "decoder_kernels", "captured_decoder"]


@lru_cache(maxsize=16)
def captured_decoder(shape: LLMShape, batch: int, seq: int) -> tuple[Kernel, ...]:
    """Kernels of a 2-layer meta-device copy of the decoder, after cleanup + fuse_attention."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = LlamaConfig(hidden_size=shape.hidden, intermediate_size=shape.ffn,
                      num_hidden_layers=2, num_attention_heads=shape.heads,
                      num_key_value_heads=shape.kv_heads, vocab_size=shape.vocab,
                      max_position_embeddings=max(4096, seq), use_cache=False,
                      attn_implementation="sdpa")
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg).to(torch.float16).eval()
    ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    # only the last position's logits are needed to pick the next token
    cap = capture(model, (ids,), {"logits_to_keep": 1})
    Pipeline.build(["cleanup", "fuse_attention"]).run(cap.gm, PassContext(
        target=resolve_target("a100"), example_inputs=((ids,), {"logits_to_keep": 1}),
        calibration=[]))
    return tuple(graph_kernels(cap.gm))


def decoder_kernels(shape: LLMShape, **options) -> list[Kernel]:
    """All kernels of one forward of `shape` (see `hardware.llm.decoder_kernels`)."""
    return llm.decoder_kernels(shape, captured_decoder, **options)


def estimate_llm(model, target: str | Target, *, backend: str = "torch", **options) -> dict:
    """Prefill and decode on `target` (see `hardware.llm.estimate_llm` for the options)."""
    tgt = resolve_target(target, backend)
    return llm.estimate_llm(model, tgt.spec, tgt.calibration, captured_decoder, **options)
