"""Peer text-generation runners that our own optimized decoder is compared against.

Each factory takes a Hugging Face causal LM, a left-padded batch `ids`/`mask` ([batch, prompt]
int64) and `new_tokens`, does its one-off work (compile, build, load) up front and returns a
zero-argument `run()` that generates exactly `new_tokens` tokens greedily and returns them as an
int64 tensor [batch, new_tokens]. EOS is suppressed at every step (`min_new_tokens` /
`min_length`), so no peer stops early and their tokens can be compared one for one.

- `hf_eager`: `model.generate` as shipped: eager PyTorch, default dynamic KV cache (SDPA).
- `hf_static_compiled`: the setup transformers documents for fast generation: a static KV cache
  (`cache_implementation="static"`) and `model.forward` under `torch.compile(mode=
  "reduce-overhead", fullgraph=True)`, plus dynamic=False so every runner gets graphs specialized
  to its own shapes (otherwise the second shape seen in a process gets dynamic-shape graphs).
  transformers only auto-compiles inside `generate` on GPU-like devices, so on CPU the forward is
  compiled explicitly, on a shallow copy of the model: the weights are shared and the caller's
  model stays eager. Prefill ([batch, prompt]) and decode ([batch, 1]) get one graph each
  (inductor C++ built with the system g++); the factory calls `run()` twice so the callable it
  returns is warm. For the 100M Llama below (2 cores) that takes about 30 s with an empty
  inductor cache and about 6 s when the cache (TORCHINDUCTOR_CACHE_DIR, by default
  /tmp/torchinductor_$USER) already holds the graphs. Every model's forward enters through the
  same transformers wrapper, so all runners' graphs count against one dynamo recompile limit
  (8 by default, a few runners; with fullgraph=True the next one fails): the warm-up raises it
  to `RECOMPILE_LIMIT`. On CPU "reduce-overhead" (CUDA graphs) adds nothing; mode="default"
  compiles and runs the same within noise.
- `ortgenai`: onnxruntime-genai on CPU. The model is saved with `save_pretrained` next to a
  placeholder WordLevel tokenizer (the builder loads one with `AutoTokenizer` and fails without
  it; it is never used here, token ids go in and come out), built with the model builder
  (`python -m onnxruntime_genai.models.builder -e cpu -p fp32|int4`, in a subprocess; its log is
  kept as `build.log`), loaded with `onnxruntime_genai.Model` and run with `Generator` (greedy,
  `min_length = max_length`). int4 uses the builder's CPU defaults: every MatMul, LM head
  included, becomes MatMulNBits with 4 bits, block_size 32, symmetric (no zero points),
  accuracy_level 4 (int8 activations), RTN; the embedding stays fp32. The build (7-11 s for
  either precision here, save_pretrained included) is cached in `workdir/<hash of config and
  weights>-<precision>/`, so later calls only hash the weights and load it (under 1 s).
  onnxruntime-genai pads batches on the right and finds padding by value (trailing
  `pad_token_id`; the builder sets pad = eos when the config has none), so the left-padded batch
  is re-packed to right padding with a pad id that ends no real row (with the builder's pad, a
  row whose last real token is eos would lose it); the per-row logits, positions and attention
  lengths then follow each row's real length. At most 32 rows (onnxruntime-genai's limit).
  Intra-op threads are set to `torch.get_num_threads()` (the builder's genai_config.json leaves
  it to ORT's default).

`peer_versions()` lists the versions used. `python benchmarks/generate_peers.py` checks and times
the peers on a 100M-parameter Llama from config with random weights (batch 1, prompt 128, 16 new
tokens, median of 3 interleaved runs after a warm-up, 2-core Xeon, 2 threads): the fp32 peers
agree on all 16 greedy tokens; int4 on 5 of 16 (this model's top logits lie about 0.02 apart,
well within int4 error). Times for the 16 tokens, prefill included, over several runs: hf_eager
310-370 ms (43-52 tok/s), hf_static_compiled 285-300 ms (53-56 tok/s), ortgenai fp32 245-275 ms
(58-65 tok/s), ortgenai int4 120-150 ms (105-135 tok/s).

Usage: python benchmarks/generate_peers.py [--workdir DIR] [--prompt 128] [--new-tokens 16]
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

Runner = Callable[[], torch.Tensor]
RECOMPILE_LIMIT = 64  # graphs dynamo keeps for transformers' forward wrapper (default 8)


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
    compiled.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True,
                                     dynamic=False)
    run = _hf_runner(compiled, ids, mask, new_tokens, cache_implementation="static")
    try:
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            for _ in range(2):
                run()
    except Exception as e:
        raise RuntimeError(f"torch.compile of the generate forward failed: {e}") from e
    return run


def _weights_hash(model) -> str:
    """Hash of class, config and weights (minus the config keys `save_pretrained` fills in)."""
    config = {k: v for k, v in model.config.to_dict().items()
              if k not in ("architectures", "dtype", "transformers_version")}
    h = hashlib.sha256(json.dumps([type(model).__name__, config], sort_keys=True,
                                  default=str).encode())
    for name, t in model.state_dict().items():
        h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.detach().contiguous().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:16]


def _save_tokenizer(vocab_size: int, path: Path) -> None:
    """A WordLevel tokenizer over `vocab_size` placeholder tokens: all the builder needs."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="t0").save_pretrained(path)


def _build_genai(model, precision: str, workdir: Path) -> Path:
    """The onnxruntime-genai CPU model for these weights and precision, built on first use."""
    out = workdir / f"{_weights_hash(model)}-{precision}"
    if (out / "genai_config.json").exists():
        return out
    workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        src, built = Path(tmp) / "hf", Path(tmp) / "built"
        model.save_pretrained(src)
        _save_tokenizer(model.config.vocab_size, src)
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(src),
               "-o", str(built), "-p", precision, "-e", "cpu", "-c", str(Path(tmp) / "cache"),
               "--extra_options", "hf_token=false"]
        proc = subprocess.run(cmd, capture_output=True, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if proc.returncode:
            raise RuntimeError(f"onnxruntime-genai model builder failed:\n{proc.stderr[-3000:]}")
        (built / "build.log").write_text(proc.stdout + proc.stderr)
        os.replace(built, out)
    return out


def _right_padded(ids, mask, pad: int) -> torch.Tensor:
    """Left-padded rows -> int32 rows right-padded with `pad` to the longest real row."""
    rows = [row[m.bool()] for row, m in zip(ids, mask)]
    packed = torch.full((len(rows), max(len(r) for r in rows)), pad, dtype=torch.int32)
    for i, row in enumerate(rows):
        packed[i, :len(row)] = row
    return packed


def ortgenai(model, ids, mask, new_tokens: int, precision: str, workdir) -> Runner:
    """onnxruntime-genai on CPU, precision "fp32" or "int4"; built once per weights/precision."""
    import onnxruntime_genai as og

    path = _build_genai(model, precision, Path(workdir))
    last_tokens = {int(row[m.bool()][-1]) for row, m in zip(ids, mask)}
    pad = next(t for t in range(model.config.vocab_size) if t not in last_tokens)
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
        generator = og.Generator(og_model, params)
        generator.append_tokens(prompt)
        steps = []
        for _ in range(new_tokens):
            generator.generate_next_token()
            steps.append(torch.from_numpy(generator.get_next_tokens().copy()))
        return torch.stack(steps, 1).long()
    return run


def peer_versions() -> dict[str, str]:
    """Versions behind the peers: Python, the packages, and the C++ compiler inductor uses."""
    found = {"python": platform.python_version()}
    for name in ("torch", "transformers", "onnxruntime", "onnxruntime-genai"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    cxx = os.environ.get("CXX", "g++")
    try:
        found[cxx] = subprocess.run([cxx, "-dumpfullversion"], capture_output=True,
                                    text=True).stdout.strip()
    except FileNotFoundError:
        found[cxx] = "not installed"
    return found


def _llama_100m():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=768, num_hidden_layers=8, num_attention_heads=12,
                         num_key_value_heads=4, intermediate_size=2048, vocab_size=32000,
                         max_position_embeddings=2048)
    return LlamaForCausalLM(config).eval()


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
    print(json.dumps(peer_versions()), f"torch threads: {torch.get_num_threads()}")
    runs, setup, tokens = {}, {}, {}
    for name, factory in factories.items():
        start = time.perf_counter()
        runs[name] = factory()
        setup[name] = time.perf_counter() - start
        tokens[name] = runs[name]()  # warm-up
    times = {name: [] for name in runs}
    for _ in range(3):  # interleaved, so a slow spell on the machine hits every peer alike
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    reference = tokens["hf_eager"]
    for name, out in tokens.items():
        median = statistics.median(times[name])
        print(f"{name:20s} setup {setup[name]:5.1f} s  median {median * 1e3:6.1f} ms  "
              f"{out.numel() / median:6.1f} tok/s  "
              f"tokens equal to hf_eager: {int((out == reference).sum())}/{out.numel()}")


if __name__ == "__main__":
    main()
