"""`optimize()` for causal LMs: one step graph, one KV cache, `generate()`.

    fast = optim.optimize(gpt2, target="cpu", example_inputs=prompt_ids)
    fast.generate(prompt_ids, max_new_tokens=32)          # greedy; sampling with do_sample
    fast.save("out/"); optim.load("out/").generate(...)

The model is captured once around its KV cache (`optim.decoder_steps.DecoderStep`): T new
tokens against the cache. A prompt runs it over an empty cache (the prefill), each new token
as a step of one (decode), so both phases share one graph, one set of weights and one pipeline
run, checked against the original model as any graph is, and lowered once. The report adds a
`generation` section: greedy tokens against Hugging Face `generate` on the same prompts,
perplexity through the cache on `eval_data`, time to first token, per-token latency and
tokens/s measured here against `generate` eager, and memory (weights and cache).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hardware.capability import pass_advice
from hardware.estimate import DEFAULT_PRECISION, report_section
from optim import generation, saving, shapes, timing, verify
from optim.capture import Inputs, weight_bytes
from optim.decoder_checks import greedy_agreement, measure_generation, perplexities
from optim.decoder_steps import CacheLayout, DecoderStep, probe_layout
from optim.errors import BackendError, ConfigError
from optim.ir import op_histogram
from optim.kv_cache import CachePolicy
from optim.lower import lower, resolve_backend
from optim.model import OptimizedModel
from optim.pipeline import Pipeline
from optim.registry import BACKENDS
from optim.report import ModelFacts, Report, ReportData
from optim.shapes import InputShape, ShapeSpec
from optim.targets import resolve_target
from optim.timing import kernels_at
from optim.tokenizers import load_tokenizer
from optim.transform import capture_and_run

PREFUSED = ("fuse_attention",)  # attention is captured fused; these passes have nothing to do


def is_causal_lm(model: Any, example_kwargs: dict | None = None) -> bool:
    """A `transformers` model that generates text on its own (not encoder-decoder), unless the
    caller traces it without a cache (`use_cache=False`: one forward at a fixed shape)."""
    if (example_kwargs or {}).get("use_cache") is False:
        return False
    can = getattr(model, "can_generate", None)
    cfg = getattr(model, "config", None)
    return bool(callable(can) and can() and cfg is not None
                and not getattr(cfg, "is_encoder_decoder", False))


def optimize_decoder(model: torch.nn.Module, tgt, pipe: Pipeline, example_inputs: Any,
                     example_kwargs: dict | None, backend: str | None, backend_options: Any,
                     *, eval_data: list | None = None, calibration: list | None = None,
                     max_length: int | None = None,
                     measure_latency: bool | None = None, new_tokens: int = 16,
                     estimate_targets: list[str] | None = None, name: str | None = None,
                     say=lambda msg: None) -> OptimizedDecoder:
    """See `optim.optimize`; called by it for causal LMs (which leaves the model untouched)."""
    model.eval()
    chosen, options = resolve_backend(backend, tgt, _latency_options(chosen_name(backend, tgt),
                                                                     backend_options))
    if not chosen.dynamic:
        raise ConfigError(f"generation needs a backend that runs a growing sequence; "
                          f"{chosen.name} compiles for one shape: use 'torch' or 'onnxruntime'")
    pipe, dropped = _decoder_pipeline(pipe)
    ids, mask = _prompt(example_inputs, example_kwargs)  # the user's prompts
    layout = probe_layout(model)
    limit = _max_length(model, max_length)
    tokens = _special_tokens(model)
    say(f"decoder: {layout.layers} layers, {layout.kv_heads} kv heads x {layout.head_dim}; "
        f"cache up to {limit} tokens")
    inputs = _step_inputs(model, layout, *_traceable(ids, mask), limit)
    if calibration:  # passes that calibrate see these texts as prompts
        inputs.calibration = [_prompt_step(layout, t) for t in _token_batches(calibration)]
    original, passes = capture_and_run(DecoderStep(model, layout.layers), inputs, pipe, tgt, say)
    tokens["logits"] = int(original.refs[0][0].shape[-1])  # the LM head's width
    try:
        artifact, lower_s = lower(passes.gm, inputs.example, tgt, chosen, options,
                                  original.shapes, say)
    except BackendError as e:
        raise BackendError(f"generation on the {chosen.name} backend: {e}. Decoders run on "
                           f"backends that lower attention over the KV cache "
                           f"(optim::attention_decode): torch and onnxruntime") from e
    fast = OptimizedDecoder(OptimizedModel(artifact, None, passes.gm, inputs.example,
                                           passes.stages, options, original.shapes),
                            layout, limit, tokens, None)
    say("checking greedy tokens against transformers' generate")
    fidelity = {**verify.fidelity(original, artifact, inputs),  # one step, the cache half full
                "greedy": greedy_agreement(model, fast, ids, mask, new_tokens)}
    if eval_data:
        say("measuring perplexity on eval_data (original and optimized)")
        fidelity["perplexity"] = perplexities(model, fast, _token_batches(eval_data))
    gen: dict[str, Any] = {
        "cache": {**layout.to_dict(), "max_length": limit,
                  "bytes_per_token": layout.bytes_per_token()},
        "special_tokens": tokens,
        "steps": "one graph: a prompt is a step over an empty cache, a new token a step of one",
        **({"dropped_passes": dropped} if dropped else {})}
    latency, speedup = [], {}
    if tgt.runs_here if measure_latency is None else measure_latency:
        latency, speedup, gen["measured"] = measure_generation(model, fast, ids, mask, new_tokens,
                                                               chosen.name, say)
    others = [resolve_target(t) for t in estimate_targets or []]
    estimates = timing.estimate_on(passes.stages, [tgt, *others], weight_bytes(passes.gm), say)
    latency += timing.estimate_rows(estimates[0])
    report = Report(ReportData(
        model=ModelFacts(name or type(model).__name__, type(model).__qualname__,
                         sum(p.numel() for p in model.parameters()), original.flops,
                         original.weight_bytes, weight_bytes(passes.gm),
                         [{"name": "input_ids", "shape": list(ids.shape), "dtype": "int64"}],
                         original.captured.seconds, original.shapes.to_dict()),
        target={"name": tgt.name, "kind": tgt.kind, "description": tgt.description,
                "runs_here": tgt.runs_here, "provenance": tgt.provenance},
        backend={"name": chosen.name, "lower_seconds": round(lower_s, 3), **artifact.info()},
        pipeline=pipe.to_list(), passes=passes.records,
        graph={"before": passes.histogram_before, "after": op_histogram(passes.gm)},
        fidelity=fidelity, latency=latency, speedup=speedup, estimates=estimates,
        advice=pass_advice(tgt.spec, pipe.names, DEFAULT_PRECISION[tgt.kind]),
        warnings=passes.notes(), generation=gen)).validate()
    fast.report = fast.step.report = report
    return fast


class OptimizedDecoder:
    """What `optimize()` returns for a causal LM: `generate()`, `stream()` and `perplexity()`
    over the optimized step graph and a KV cache, `.report`, `save()`; `optim.load` reads it
    back."""

    def __init__(self, step: OptimizedModel, layout: CacheLayout, max_length: int,
                 special_tokens: dict, report: Report | None):
        self.step = step
        self.layout, self.max_length = layout, max_length
        self.special_tokens = special_tokens  # {"eos": [...], "pad": int, "logits": int, ...}
        self.report = report
        self.timing = generation.Timing()  # of the last generate() call
        self.tokenizer: str | None = None  # "bytes" or a local tokenizer directory (the CLI)

    @property
    def backend(self) -> str:
        return self.step.artifact.backend

    def _run(self, ids, mask, pos, cache_mask, keys, values):
        with torch.inference_mode():
            return self.step.artifact(input_ids=ids, attention_mask=mask, position_ids=pos,
                                      cache_mask=cache_mask, past_keys=tuple(keys),
                                      past_values=tuple(values))

    def stream(self, input_ids: Tensor | list, max_new_tokens: int = 32, *,
               attention_mask: Tensor | None = None, cache: Any = None,
               **sampling: Any) -> Iterator[Tensor]:
        """Yield each step's new token per sequence ([batch] int64) as soon as it is chosen.
        `cache`: a `CachePolicy` or dict bounding the KV cache, e.g. {"method": "keyformer",
        "budget": 0.5} (`optim.kv_cache`); default: every token kept."""
        policy = CachePolicy.parse(cache)
        cfg = self._sampling(max_new_tokens, sampling)
        ids, mask = generation.left_pad(input_ids, attention_mask, cfg.pad_token_id)
        self._check_ids(ids)
        # a backend that binds buffers reads the cache where it lies, outputs land in place
        decode = self._bound(ids.shape[0]) if self.step.artifact.binds_buffers else None
        yield from generation.stream(self._run, self.layout, ids, mask, cfg, self.max_length,
                                     self.timing, decode, policy)

    def generate(self, input_ids: Tensor | list, max_new_tokens: int = 32, *,
                 attention_mask: Tensor | None = None, streamer=None, cache: Any = None,
                 **sampling: Any) -> Tensor:
        """The prompts followed by their new tokens, [batch, prompt + new] (left-padded as the
        prompts were; sequences that stopped early continue with the pad token), like
        Hugging Face `generate`. Options: `do_sample`, `temperature`, `top_k`, `top_p`,
        `seed`, `stop_tokens` (default: the model's end-of-sequence tokens), `pad_token_id`;
        `streamer(tokens)` is called with each step's [batch] tokens; `cache` bounds the KV
        cache (see `stream`)."""
        cfg = self._sampling(max_new_tokens, sampling)
        ids, _ = generation.left_pad(input_ids, attention_mask, cfg.pad_token_id)
        out = []
        for token in self.stream(input_ids, max_new_tokens, attention_mask=attention_mask,
                                 cache=cache, **sampling):
            out.append(token)
            if streamer is not None:
                streamer(token)
        return torch.cat([ids, torch.stack(out, 1)], 1)

    def perplexity(self, batches: list[Tensor], prompt: int = 1, cache: Any = None) -> float:
        """Perplexity of unpadded token batches [B, T] on their tokens after the first
        `prompt`, each predicted through the KV cache (bounded by `cache`, see `stream`), one
        step per token, as generation predicts it."""
        policy = CachePolicy.parse(cache)
        total = count = 0.0
        for ids in batches:
            self._check_ids(ids)
            logits = generation.teacher_forced(self._run, self.layout, ids, prompt, policy)
            n = logits.shape[0] * logits.shape[1]
            total += math.log(generation.perplexity(logits, ids)) * n
            count += n
        return math.exp(total / count)

    def _bound(self, batch: int):
        lay = self.layout
        logits = torch.empty(batch, self.special_tokens["logits"])
        new_k = [torch.empty(batch, lay.kv_heads, 1, lay.head_dim) for _ in range(lay.layers)]
        new_v = [torch.empty(batch, lay.kv_heads, 1, lay.value_dim) for _ in range(lay.layers)]
        mass = torch.empty(batch, 0)
        run = self.step.artifact.run_bound

        def decode(ids, mask, pos, cache_mask, keys, values):
            nonlocal mass
            if mass.shape[1] != cache_mask.shape[1] + 1:  # once per generation
                mass = torch.empty(batch, cache_mask.shape[1] + 1)
            run([ids.contiguous(), mask, pos.contiguous(), cache_mask, *keys, *values],
                [logits, *new_k, *new_v, mass])
            return logits, new_k, new_v, mass

        return decode

    def _sampling(self, max_new_tokens: int, options: dict) -> generation.Sampling:
        options = dict(options)
        known = {f for f in generation.Sampling.__dataclass_fields__} - {"max_new_tokens"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(f"generate() got unknown options {unknown}; it takes "
                              f"{sorted(known)}")
        stops = options.pop("stop_tokens", None)
        stops = tuple(self.special_tokens["eos"] if stops is None else
                      ([stops] if isinstance(stops, int) else stops))
        options.setdefault("pad_token_id", self.special_tokens["pad"])
        return generation.Sampling(max_new_tokens, stop_tokens=stops, **options).check()

    def _check_ids(self, ids: Tensor) -> None:
        vocab = self.special_tokens.get("vocab_size")
        if ids.numel() and (int(ids.min()) < 0 or (vocab and int(ids.max()) >= vocab)):
            raise ConfigError(f"token ids must be in 0..{(vocab or 0) - 1}, got "
                              f"{int(ids.min())}..{int(ids.max())}")

    def save(self, directory: str | Path) -> Path:
        """The step graph (as its backend saves it), the cache layout and the report."""
        tokenizer = self.tokenizer
        copy = tokenizer is not None and tokenizer != "bytes"
        meta = {"kind": "decoder", "cache": self.layout.to_dict(), "max_length": self.max_length,
                "special_tokens": self.special_tokens,
                "tokenizer": {"dir": TOKENIZER_DIR} if copy else tokenizer}

        def save_tokenizer(tmp: Path) -> None:  # a copy inside the save, checksummed with it
            if copy:
                load_tokenizer(tokenizer).save(tmp / TOKENIZER_DIR)

        return saving.save_parts({"step": self.step}, meta, self.report, Path(directory),
                                 extra=save_tokenizer)

    @classmethod
    def load(cls, directory: Path, manifest: dict, trust_compiled_code: bool = False
             ) -> OptimizedDecoder:
        parts, report = saving.load_parts(directory, manifest, trust_compiled_code)
        if set(parts) != {"step"}:
            raise ConfigError(f"{directory}: a decoder save holds one part 'step', found "
                              f"{sorted(parts)}")
        s = parts["step"]
        with saving.damaged(directory):
            layout = CacheLayout(**manifest["cache"])
            special = dict(manifest["special_tokens"])
            _check_layout(layout, s.shapes)
        fast = cls(OptimizedModel(s.artifact, report, s.graph, s.example, shapes=s.shapes),
                   layout, manifest["max_length"], special, report)
        fast.tokenizer = _saved_tokenizer(directory, manifest.get("tokenizer"))
        return fast

    def estimate_generation(self, target: str = "cpu", batch: int = 1, prompt: int = 128,
                            new_tokens: int = 64) -> dict:
        """The cost model's view of one generation on `target`, from this model's own step
        graph: the prompt's step over an empty cache (time to first token), and a one-token
        step over a cache of prompt + new_tokens / 2 (the mean decode context) per new token."""
        if self.step.graph is None:
            raise ConfigError("this decoder has no step graph (loaded from disk?); optimize "
                              "the model again to estimate it")
        tgt = resolve_target(target)
        lay = self.layout
        ids = torch.zeros(batch, prompt, dtype=torch.long)
        ones = torch.ones_like(ids)
        first = {"input_ids": ids, "attention_mask": ones,
                 "position_ids": generation.positions(ones)}
        mask, keys, values = generation.empty_cache(lay, batch)
        context = prompt + new_tokens // 2
        k, v = lay.allocate(batch, context)
        one = torch.ones(batch, 1, dtype=torch.long)
        step = {"input_ids": one, "attention_mask": one, "position_ids": one * context,
                "cache_mask": torch.ones(batch, context, dtype=torch.bool),
                "past_keys": tuple(k), "past_values": tuple(v)}
        weights = float(weight_bytes(self.step.graph))
        sections = {}
        for name, kwargs in (("prefill", {**first, "cache_mask": mask, "past_keys": tuple(keys),
                                          "past_values": tuple(values)}), ("decode", step)):
            kernels = kernels_at(self.step.graph, (), kwargs)
            sections[name] = report_section({name: kernels}, tgt, memory_bytes=weights)
        per_token = sections["decode"]["estimated_ms"]
        return {"target": tgt.name, "by": sections["decode"]["by"], "batch": batch,
                "prompt": prompt, "new_tokens": new_tokens,
                "ttft_ms": sections["prefill"]["estimated_ms"], "per_token_ms": per_token,
                "tokens_per_s": batch * 1e3 / per_token,
                "total_ms": sections["prefill"]["estimated_ms"] + per_token * (new_tokens - 1),
                "decode_bound": sections["decode"]["bound"]}

    def rooflines(self) -> dict[str, bytes]:
        """A roofline PNG per estimated target with the step graph's kernels on it."""
        return self.step.rooflines()

    def __repr__(self) -> str:
        name = self.report["model"]["name"] if self.report else "?"
        return (f"OptimizedDecoder({name}, backend={self.backend}, cache={self.layout.layers} "
                f"layers x {self.layout.kv_heads} kv heads, max_length={self.max_length})")


# ---- the step's example and shapes ----

def chosen_name(backend: str | None, tgt) -> str:
    return backend or tgt.default_backend


# what decoders set where the backend offers it (and the user did not set it): a decode step
# is hundreds of small nodes run once per token, so worker threads spin between nodes; a long
# prompt's prefill grows ORT's memory arena by gigabytes (batch 8 x 1,024: 4.9 GB resident
# kept), so the arena hands that back after each prefill while decode steps keep theirs (with
# no arena at all, decode measured 3-8% slower at batch 1 and 8)
DECODER_OPTIONS = {"spin_wait": True, "memory_arena": "shrink"}


def _latency_options(backend: str, options: dict | None) -> dict | None:
    """`DECODER_OPTIONS` the backend takes, under the user's own `options`."""
    names = BACKENDS.get(backend).option_names()
    chosen = {k: v for k, v in DECODER_OPTIONS.items() if k in names}
    return {**chosen, **(options or {})} if chosen else options


def _decoder_pipeline(pipe: Pipeline) -> tuple[Pipeline, list[dict]]:
    keep = [s for s in pipe.steps if s.name not in PREFUSED]
    dropped = [{"pass": s.name, "why": "attention is captured fused around the KV cache "
                "(optim::attention in the prefill, optim::attention_decode in decode steps)"}
               for s in pipe.steps if s.name in PREFUSED]
    return (Pipeline(keep, insert_prerequisites=False) if dropped else pipe), dropped


def _prompt(example_inputs: Any, example_kwargs: dict | None) -> tuple[Tensor, Tensor]:
    kwargs = dict(example_kwargs or {})
    if isinstance(example_inputs, dict):
        kwargs.update(example_inputs)
    elif isinstance(example_inputs, (tuple, list)) and example_inputs:
        kwargs.setdefault("input_ids", example_inputs[0])
    elif isinstance(example_inputs, Tensor):
        kwargs.setdefault("input_ids", example_inputs)
    ids = kwargs.get("input_ids")
    if not isinstance(ids, Tensor):
        raise ConfigError("optimizing a causal LM needs example prompt token ids "
                          "(example_inputs=input_ids, a [batch, tokens] integer tensor)")
    ids, mask = generation.left_pad(ids, kwargs.get("attention_mask"), 0)
    ids, mask = ids.clone(), mask.clone()  # not views: export would guard on their base
    if ids.shape[1] < 1:
        raise ConfigError("the example prompt has no tokens")
    return ids, mask


def _traceable(ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """The prompts to trace with: a batch of 1 would be fixed at 1, so two copies of it; a
    prompt under 4 tokens leaves a cache or a step of 1 slot, fixed too, so its first token is
    repeated in front (as more of its left padding where it is padding)."""
    if ids.shape[1] < 4:
        more = 4 - ids.shape[1]
        ids = torch.cat([ids[:, :1].expand(-1, more), ids], 1)
        mask = torch.cat([mask[:, :1].expand(-1, more), mask], 1)
    return (ids.repeat(2, 1), mask.repeat(2, 1)) if ids.shape[0] < 2 else (ids, mask)


def _max_length(model, asked: int | None) -> int:
    """The longest prompt + new tokens: the position table, and a sliding window where the
    model uses one (inside it, the window masks nothing, so attention over the cache is exact)."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") \
        else model.config
    table = next((getattr(cfg, k) for k in ("max_position_embeddings", "n_positions")
                  if isinstance(getattr(cfg, k, None), int)), None)
    window = getattr(cfg, "sliding_window", None)
    if isinstance(window, int) and getattr(cfg, "use_sliding_window", True) is not False:
        table = window if table is None else min(table, window)
    if asked is not None:
        if table is not None and asked > table:
            raise ConfigError(f"max_length {asked} is beyond the model's {table} positions "
                              f"(position table or sliding window)")
        return asked
    if table is None:
        raise ConfigError(f"{type(model).__name__} names no position limit; pass max_length")
    return min(table, 1 << 15)


def _special_tokens(model) -> dict:
    gc = getattr(model, "generation_config", None)
    eos = getattr(gc, "eos_token_id", None) if gc is not None else None
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    pad = getattr(gc, "pad_token_id", None) if gc is not None else None
    vocab = model.config.get_text_config().vocab_size
    eos = [e for e in eos if 0 <= e < vocab]  # configs built for tests keep GPT-2's 50256
    return {"eos": eos, "pad": pad if isinstance(pad, int) else (eos[0] if eos else 0),
            "vocab_size": vocab}


def _step_inputs(model, layout: CacheLayout, ids: Tensor, mask: Tensor, limit: int) -> Inputs:
    """The step's example: the prompts' first half already in the cache (computed by the
    original model), the rest as new tokens; batch, new tokens and cache length dynamic."""
    b, t = ids.shape
    cut = t // 2 if t >= 4 else 0
    past_mask, new_mask = mask[:, :cut], mask[:, cut:]
    pos = generation.positions(mask)
    cache_mask, keys, values = generation.empty_cache(layout, b)
    if cut:
        with torch.no_grad():
            _, keys, values, _ = DecoderStep(model, layout.layers)(
                ids[:, :cut], past_mask, pos[:, :cut], *generation.empty_cache(layout, b))
        cache_mask = past_mask.bool()
    kwargs = {"input_ids": ids[:, cut:].clone(), "attention_mask": new_mask.clone(),
              "position_ids": pos[:, cut:].clone(), "cache_mask": cache_mask.clone(),
              "past_keys": tuple(k.clone() for k in keys),
              "past_values": tuple(v.clone() for v in values)}
    kv = [InputShape(f"{group}[{i}]", layout.dtype, ("batch", layout.kv_heads, "past",
                                                     layout.head_dim if group == "past_keys"
                                                     else layout.value_dim))
          for group in ("past_keys", "past_values") for i in range(layout.layers)]
    spec = ShapeSpec([InputShape("input_ids", "int64", ("batch", "seq")),
                      InputShape("attention_mask", "int64", ("batch", "seq")),
                      InputShape("position_ids", "int64", ("batch", "seq")),
                      InputShape("cache_mask", "bool", ("batch", "past")), *kv],
                     {"batch": shapes.DEFAULT_RANGES["batch"], "seq": (1, limit),
                      "past": (1, limit)}, {},
                     {"batch": b, "seq": t - cut, "past": max(cut, 1)})
    return Inputs(((), kwargs), [((), kwargs)], [((), kwargs)], spec)


def _prompt_step(layout: CacheLayout, ids: Tensor) -> tuple[tuple, dict]:
    """A step's inputs for unpadded prompts `ids` over an empty cache."""
    mask, keys, values = generation.empty_cache(layout, ids.shape[0])
    ones = torch.ones_like(ids)
    return (), {"input_ids": ids, "attention_mask": ones,
                "position_ids": generation.positions(ones), "cache_mask": mask,
                "past_keys": tuple(keys), "past_values": tuple(values)}


def _token_batches(eval_data: list) -> list[Tensor]:
    out = []
    for i, b in enumerate(eval_data):
        ids = b.get("input_ids") if isinstance(b, dict) else b
        if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.dtype != torch.long:
            raise ConfigError(f"eval_data / calibration [{i}]: for a causal LM, each item is a "
                              f"[batch, tokens] int64 tensor of real text (no padding), got "
                              f"{type(b).__name__}")
        out.append(ids)
    return out


TOKENIZER_DIR = "tokenizer"  # a saved decoder's copy of its Hugging Face tokenizer


def _saved_tokenizer(directory: Path, entry) -> str | None:
    """The tokenizer a decoder save names: `bytes`, or its own checksummed copy (a path outside
    the save, as older saves recorded, is not used: it was never checked)."""
    if entry == "bytes":
        return entry
    if isinstance(entry, dict) and "dir" in entry:
        return str(saving.inside(Path(directory), entry["dir"]))
    return None


def _check_layout(layout: CacheLayout, spec: ShapeSpec | None) -> None:
    """The cache layout a save records is the one its step graph reads."""
    if spec is None:
        raise ValueError("the step records no input shapes")
    want = {f"{g}[{i}]": (layout.dtype, layout.kv_heads, dim)
            for g, dim in (("past_keys", layout.head_dim), ("past_values", layout.value_dim))
            for i in range(layout.layers)}
    got = {i.name: (i.dtype, i.dims[1], i.dims[3]) for i in spec.inputs
           if i.name.startswith(("past_keys", "past_values")) and len(i.dims) == 4}
    if want != got:
        raise ValueError(f"the cache layout {layout.to_dict()} is not the one the step reads")
