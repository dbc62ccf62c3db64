"""Peer text-generation runners that our own optimized decoder is compared against.

Every factory takes a Hugging Face causal LM, a left-padded batch `ids`/`mask` ([batch, prompt]
int64) and `new_tokens`, does its one-off work (compile, export, load) up front and returns a
zero-argument `run()` that generates exactly `new_tokens` tokens greedily and returns them as an
int64 tensor [batch, new_tokens]. EOS is suppressed (never stops early), so every peer does the
same amount of work and their tokens can be compared one for one.

- `hf_eager`: `model.generate` as shipped: eager PyTorch, default dynamic KV cache, SDPA.
- `hf_static_compiled`: the setup transformers documents for fast generation: a static KV cache
  (`cache_implementation="static"`) and `model.forward` under `torch.compile(mode=
  "reduce-overhead", fullgraph=True)`. On CPU, transformers' own automatic compilation inside
  `generate` is off (it only auto-compiles on GPU-like devices), so the forward is compiled
  explicitly, on a shallow copy of the model: the caller's model stays eager and the weights are
  shared. The prefill ([batch, prompt]) and decode ([batch, 1]) shapes each get their own graph;
  the factory runs `run()` twice, so the callable it returns is warm. Compilation (inductor,
  C++ codegen with the system g++) takes about 60 s for the 8-layer, 100M Llama of the
  verification below on 2 cores (warm-up call 1: compile + run, call 2: no recompilation).
  "reduce-overhead" only means CUDA graphs, which inductor skips on CPU, so on CPU it does what
  mode="default" does.
- `ortgenai`: onnxruntime-genai. The model is saved with `save_pretrained` next to a minimal
  WordLevel tokenizer (the builder insists on loading one with `AutoTokenizer`, although it is
  never used here: token ids go in and come out), built with onnxruntime-genai's model builder
  (`python -m onnxruntime_genai.models.builder -e cpu -p fp32|int4`, run as a subprocess, its log
  kept as `build.log` in the output), loaded with `onnxruntime_genai.Model` and run with
  `onnxruntime_genai.Generator` (greedy, `min_length = max_length` so EOS never wins). For int4
  the builder's CPU defaults are used: every MatMul including the LM head becomes MatMulNBits,
  4 bits, block_size 32, symmetric (no zero points), accuracy_level 4 (int8 activations), RTN;
  the embedding stays fp32. The built model is cached in `workdir/<weights hash>-<precision>/`,
  so later calls with the same weights only load it (the fp32 build of the 100M Llama takes
  about 10 s, int4 about 10 s). onnxruntime-genai pads batches on the right and finds padding by
  value (trailing `pad_token_id`), so a left-padded batch is re-packed to right padding, with a
  pad id that does not end any real row; its positions and GroupQueryAttention's sequence
  lengths then follow each row's real length. Intra-op threads are set to
  `torch.get_num_threads()` (the genai config the builder writes leaves it to ORT's default).

`peer_versions()` lists the versions used. Verification (100M Llama below, batch 1, prompt 128
random ids, 16 new tokens, 2-core Xeon): see the notes at the end of `__main__`'s output; the
three fp32 peers produce the same 16 greedy tokens.

Usage: python benchmarks/generate_peers.py [--workdir /tmp/generate_peers]
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import torch

Runner = Callable[[], torch.Tensor]


def _pad_token_id(model) -> int:
    gen = model.generation_config
    pad = gen.pad_token_id if gen.pad_token_id is not None else gen.eos_token_id
    return (pad[0] if isinstance(pad, list) else pad) if pad is not None else 0


def _hf_runner(model, ids, mask, new_tokens: int, **generate_kw) -> Runner:
    kw = {"attention_mask": mask, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens,
          "do_sample": False, "pad_token_id": _pad_token_id(model), **generate_kw}

    def run() -> torch.Tensor:
        with torch.inference_mode():
            return model.generate(ids, **kw)[:, ids.shape[1]:]
    return run


def hf_eager(model, ids, mask, new_tokens: int) -> Runner:
    """transformers `generate`, eager PyTorch, default dynamic KV cache."""
    return _hf_runner(model, ids, mask, new_tokens)


def hf_static_compiled(model, ids, mask, new_tokens: int) -> Runner:
    """transformers `generate` with a static KV cache and `forward` under torch.compile (warm)."""
    compiled = copy.copy(model)  # shares the weights; the caller's model keeps its eager forward
    compiled.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    run = _hf_runner(compiled, ids, mask, new_tokens, cache_implementation="static")
    try:
        for _ in range(2):
            run()
    except Exception as e:
        raise RuntimeError(f"torch.compile of the generate forward failed: {e}") from e
    return run


def _weights_hash(model) -> str:
    """Hash of the class, config and weights (config keys `save_pretrained` fills in excluded)."""
    config = {k: v for k, v in model.config.to_dict().items()
              if k not in ("architectures", "dtype", "transformers_version")}
    h = hashlib.sha256(json.dumps([type(model).__name__, config], sort_keys=True,
                                  default=str).encode())
    for name, t in model.state_dict().items():
        h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.detach().contiguous().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:16]


def _save_tokenizer(vocab_size: int, path: Path, bos: int, eos: int) -> None:
    """A WordLevel tokenizer over `vocab_size` placeholder tokens: enough for the builder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = {0: "<unk>", bos: "<s>", eos: "</s>"}
    vocab = {special.get(i, f"t{i}"): i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(path)


def _build_genai(model, precision: str, workdir: Path) -> Path:
    """Build (or reuse) the onnxruntime-genai CPU model for these weights and precision."""
    out = workdir / f"{_weights_hash(model)}-{precision}"
    if (out / "genai_config.json").exists():
        return out
    workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        src, built = Path(tmp) / "hf", Path(tmp) / "built"
        model.save_pretrained(src)
        gen = model.generation_config
        _save_tokenizer(model.config.vocab_size, src, gen.bos_token_id or 1,
                        _pad_token_id(model))
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(src),
               "-o", str(built), "-p", precision, "-e", "cpu", "-c", str(Path(tmp) / "cache"),
               "--extra_options", "hf_token=false"]
        proc = subprocess.run(cmd, capture_output=True, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if proc.returncode:
            raise RuntimeError(f"onnxruntime-genai builder failed:\n{proc.stderr[-3000:]}")
        (built / "build.log").write_text(proc.stdout + proc.stderr)
        os.replace(built, out)
    return out


def _right_padded(ids, mask, pad: int):
    """Left-padded [batch, prompt] -> right-padded int32 rows cut to the longest real row."""
    rows = [r[m.bool()] for r, m in zip(ids, mask)]
    width = max(len(r) for r in rows)
    packed = torch.full((len(rows), width), pad, dtype=torch.int32)
    for i, r in enumerate(rows):
        packed[i, :len(r)] = r
    return packed


def ortgenai(model, ids, mask, new_tokens: int, precision: str, workdir) -> Runner:
    """onnxruntime-genai on CPU (fp32 or int4), model built once per weights and precision."""
    import onnxruntime_genai as og

    path = _build_genai(model, precision, Path(workdir))
    last = {int(r[m.bool()][-1]) for r, m in zip(ids, mask)}
    pad = next(t for t in range(model.config.vocab_size) if t not in last)
    config = og.Config(str(path))
    config.overlay(json.dumps({"model": {"pad_token_id": pad, "decoder": {"session_options": {
        "intra_op_num_threads": torch.get_num_threads()}}}}))
    og_model = og.Model(config)
    prompt = _right_padded(ids, mask, pad).numpy()
    length = prompt.shape[1] + new_tokens

    def run() -> torch.Tensor:
        params = og.GeneratorParams(og_model)
        params.set_search_options(do_sample=False, batch_size=prompt.shape[0],
                                  max_length=length, min_length=length)
        gen = og.Generator(og_model, params)
        gen.append_tokens(prompt)
        out = []
        for _ in range(new_tokens):
            gen.generate_next_token()
            out.append(torch.from_numpy(gen.get_next_tokens().copy()))
        return torch.stack(out, 1).long()
    return run


def peer_versions() -> dict[str, str]:
    """Versions of the packages behind the peers (onnxruntime-genai only if installed)."""
    names = ["torch", "transformers", "onnxruntime", "onnxruntime-genai"]
    found = {}
    for name in names:
        try:
            found[name] = version(name)
        except Exception:
            found[name] = "not installed"
    return found


def _llama_100m():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=768, num_hidden_layers=8, num_attention_heads=12,
                      num_key_value_heads=4, intermediate_size=2048, vocab_size=32000,
                      max_position_embeddings=2048)
    return LlamaForCausalLM(cfg).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "generate_peers"))
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args()
    model, n = _llama_100m(), args.new_tokens
    ids = torch.randint(0, model.config.vocab_size, (1, args.prompt),
                        generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    factories = {"hf_eager": lambda: hf_eager(model, ids, mask, n),
                 "hf_static_compiled": lambda: hf_static_compiled(model, ids, mask, n)}
    for precision in ("fp32", "int4"):
        factories[f"ortgenai_{precision}"] = lambda p=precision: ortgenai(
            model, ids, mask, n, p, args.workdir)
    print(json.dumps(peer_versions()), f"threads={torch.get_num_threads()}")
    reference = None
    for name, factory in factories.items():
        start = time.perf_counter()
        run = factory()
        setup = time.perf_counter() - start
        tokens = run()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        reference = tokens if reference is None else reference
        median = statistics.median(times)
        print(f"{name:20s} setup {setup:6.1f} s  median {median * 1e3:7.1f} ms  "
              f"{ids.shape[0] * n / median:6.1f} tok/s  "
              f"same tokens as hf_eager: {int((tokens == reference).sum())}/{tokens.numel()}")


if __name__ == "__main__":
    main()
