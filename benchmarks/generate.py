"""Decoder generation, measured here: optim's optimized decoders against the runtimes LLM users
pick, on this CPU, in one interleaved run per shape.

Sections (each prints a table; everything lands in the JSON):
1. speed: a ~100M-parameter Llama-shaped decoder (from config, random weights: speed does not
   depend on the values), prompts of 128 and 1,024 tokens, 64 new tokens, batch 1 and 8. Rows:
   transformers `generate` eager; transformers with a static cache under torch.compile;
   onnxruntime-genai fp32 and int4 (its model builder); optim fp32, int8 and int4. Every row is
   timed the same way: time to first token = a generate of 1 token, per-token = (generate of n
   - generate of 1) / (n - 1), medians of interleaved runs.
2. fidelity: the decoder with real weights (the zoo's byte-level GPT-2 trained here on the
   Python manual): perplexity on held-out text through the KV cache and greedy tokens against
   transformers, per weight format.
3. KV-cache reduction on the same decoder: perplexity of the 64 bytes after a 64-byte prompt and
   greedy agreement with the full cache, at 50% and 25% budgets (window + sinks, Keyformer);
   decode speed at long context (the Llama-shaped decoder, prompts of 2,048 and 4,096 tokens).
4. cost model: `OptimizedDecoder.estimate_generation("cpu")` against each optim row measured.

Usage: pip install -e ".[bench]"  (onnxruntime-genai), then
       python benchmarks/generate.py [--quick] [--out benchmarks/results/generate.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import generate_peers as peers  # beside this script
import torch
from rich.console import Console
from rich.table import Table

import optim
from optim.measure import machine, measure
from optim.zoo import char_lm

console = Console()
NEW = 64
OURS = {  # row -> (backend, pipeline, pass options)
    "optim fp32 (onnxruntime)": ("onnxruntime", "cleanup,fuse_linears", {}),
    "optim int8 (onnxruntime)": ("onnxruntime", "cleanup,fuse_linears,quantize",
                                 {"quantize": {"skip": []}}),
    "optim int8 (torch)": ("torch", "cleanup,fuse_linears,quantize", {"quantize": {"skip": []}}),
    "optim int4 g128 RTN (onnxruntime)": ("onnxruntime", "cleanup,fuse_linears,quantize_int4",
                                          {"quantize_int4": {"method": "rtn", "skip": []}}),
}


def llama_100m(positions: int = 2048) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=768, num_hidden_layers=8, num_attention_heads=12,
                      num_key_value_heads=4, intermediate_size=2048, vocab_size=32000,
                      max_position_embeddings=positions)
    return LlamaForCausalLM(cfg).eval()


def prompts(batch: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g)


def build_ours(model, example: torch.Tensor, rows: dict, **kw) -> dict:
    built = {}
    for name, (backend, pipeline, options) in rows.items():
        t0 = time.perf_counter()
        built[name] = optim.optimize(model, "cpu", example, pipeline=pipeline, backend=backend,
                                     measure_latency=False, **kw, **options)
        console.print(f"  built {name} in {time.perf_counter() - t0:.0f} s")
    return built


def ours_runner(fast, ids, n, **kw):
    return lambda: fast.generate(ids, n, stop_tokens=[], **kw)


def speed(quick: bool, save, shapes: list[str], earlier: list[dict]) -> list[dict]:
    """Every shape in its own process (a shape's runners hold gigabytes: compiled graphs, ORT
    arenas sized by its prefill), its rows kept as soon as it finishes. Rows of shapes not
    run this time are kept from `earlier` (each row says when it was measured)."""
    shapes = shapes[:1] if quick else shapes
    rows = [r for r in earlier if f"{r.get('batch')}x{r.get('prompt')}" not in shapes
            and r.get("shape") not in shapes]
    for shape in shapes:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "rows.json"
            done = subprocess.run([sys.executable, __file__, "--speed-shape", shape,
                                   "--out", str(out)], check=False)
            if done.returncode:
                console.print(f"[red]speed {shape}: failed (exit {done.returncode})[/]")
                rows.append({"shape": shape, "failed": f"exit {done.returncode}"})
            else:
                rows += json.loads(out.read_text())
        save(rows)
    return rows


def speed_shape(shape: str, workdir: Path) -> list[dict]:
    batch, length = (int(x) for x in shape.split("x"))
    model = llama_100m()
    ours = build_ours(model, prompts(2, 64, 32000), OURS)
    ids = prompts(batch, length, 32000, seed=1)
    mask = torch.ones_like(ids)
    console.print(f"speed: batch {batch}, prompt {length}: building peers")
    cands = {}
    for n in (1, NEW):
        cands[("transformers eager", n)] = peers.hf_eager(model, ids, mask, n)
        cands[("transformers static cache + torch.compile", n)] = \
            peers.hf_static_compiled(model, ids, mask, n)
        for precision in ("fp32", "int4"):
            cands[(f"onnxruntime-genai {precision}", n)] = peers.ortgenai(
                model, ids, mask, n, precision, workdir)
        for name, fast in ours.items():
            cands[(name, n)] = ours_runner(fast, ids, n)
    console.print(f"speed: batch {batch}, prompt {length}: measuring {len(cands)} runners")
    m = measure({f"{k[0]}|{k[1]}": fn for k, fn in cands.items()}, warmup=1, min_runs=3,
                max_runs=3)
    rows = []
    for name in dict.fromkeys(k[0] for k in cands):
        first = m[f"{name}|1"]["median_ms"]
        total = m[f"{name}|{NEW}"]["median_ms"]
        per = (total - first) / (NEW - 1)
        rows.append({"row": name, "batch": batch, "prompt": length, "new_tokens": NEW,
                     "measured": time.strftime("%Y-%m-%d %H:%M"),
                     "ttft_ms": first, "per_token_ms": per,
                     "tokens_per_s": batch * 1e3 / per, "generate_ms": total})
    _cost_model(ours, rows, batch, length)
    return rows


def _cost_model(ours: dict, rows: list[dict], batch: int, length: int) -> None:
    for r in rows:
        if r["row"] in ours and r["batch"] == batch and r["prompt"] == length:
            e = ours[r["row"]].estimate_generation("cpu", batch, length, NEW)
            r["estimate"] = {"ttft_ms": e["ttft_ms"], "per_token_ms": e["per_token_ms"],
                             "ttft_error": e["ttft_ms"] / r["ttft_ms"] - 1,
                             "per_token_error": e["per_token_ms"] / r["per_token_ms"] - 1}


def fidelity(quick: bool) -> list[dict]:
    model = char_lm.load()
    text = char_lm.batches("test", 8, 2 if quick else 8, seed=1)
    calibration = char_lm.batches("train", 8, 4, seed=2)
    variants = {
        "fp32": ("cleanup,fuse_linears", {}),
        "int8 per-channel, per-token activations": ("cleanup,fuse_linears,quantize",
                                                    {"quantize": {"skip": []}}),
        "int4 g128 RTN": ("cleanup,fuse_linears,quantize_int4",
                          {"quantize_int4": {"method": "rtn", "skip": []}}),
        "int4 g128 GPTQ": ("cleanup,fuse_linears,quantize_int4",
                           {"quantize_int4": {"method": "gptq", "skip": []}}),
    }
    out = []
    for name, (pipeline, options) in variants.items():
        fast = optim.optimize(model, "cpu", text[0][:2, :64], pipeline=pipeline,
                              backend="onnxruntime", eval_data=text, calibration=calibration,
                              measure_latency=False, **options)
        f = fast.report["fidelity"]
        out.append({"weights": name, "perplexity": f["perplexity"]["optimized"],
                    "perplexity_fp32_original": f["perplexity"]["original"],
                    "relative_change": f["perplexity"]["relative_change"],
                    "greedy_agreement": f["greedy"]["agreement"],
                    "greedy_first_difference": f["greedy"]["first_difference"],
                    "tokens": f["perplexity"]["tokens"]})
    return out


def cache_reduction(quick: bool) -> list[dict]:
    model = char_lm.load()
    text = char_lm.batches("test", 8, 2 if quick else 8, seed=3)
    fast = optim.optimize(model, "cpu", text[0][:2, :64], pipeline="cleanup,fuse_linears",
                          backend="onnxruntime", measure_latency=False)
    prompt = 64
    full = fast.perplexity(text, prompt=prompt)
    ref = [fast.generate(t[:, :prompt], 32, stop_tokens=[])[:, prompt:] for t in text]
    out = [{"cache": "full", "budget": 1.0, "perplexity": full, "relative_change": 0.0,
            "greedy_agreement": 1.0}]
    for method in ("window", "keyformer"):
        for budget in (0.5, 0.25):
            policy = {"method": method, "budget": budget}
            ppl = fast.perplexity(text, prompt=prompt, cache=policy)
            got = [fast.generate(t[:, :prompt], 32, stop_tokens=[], cache=policy)[:, prompt:]
                   for t in text]
            agree = statistics.mean(float((a == b).float().mean()) for a, b in zip(got, ref))
            out.append({"cache": method, "budget": budget, "perplexity": ppl,
                        "relative_change": ppl / full - 1, "greedy_agreement": agree})
    return out


def long_context(quick: bool) -> list[dict]:
    model = llama_100m(positions=8192)
    fast = optim.optimize(model, "cpu", prompts(2, 64, 32000), pipeline=OURS[
        "optim int8 (onnxruntime)"][1], backend="onnxruntime", measure_latency=False,
        quantize={"skip": []})
    rows = []
    for length in ([2048] if quick else [2048, 4096]):
        ids = prompts(1, length, 32000, seed=4)
        for budget in (None, 0.5, 0.25):
            policy = {"method": "keyformer", "budget": budget} if budget else None
            steps = []
            for _ in range(2):
                fast.generate(ids, 32, stop_tokens=[], cache=policy)
                steps += fast.timing.steps_s
            per = statistics.median(steps) * 1e3
            rows.append({"prompt": length, "cache": "full" if budget is None else
                         f"keyformer {budget:.0%}", "per_token_ms": per,
                         "ttft_ms": fast.timing.prefill_s * 1e3})
        full = next(r for r in rows if r["prompt"] == length and r["cache"] == "full")
        for r in rows:
            if r["prompt"] == length:
                r["decode_speedup_vs_full"] = full["per_token_ms"] / r["per_token_ms"]
    return rows


def show(title: str, rows: list[dict], columns: list[str]) -> None:
    t = Table(*columns, title=title)
    for r in rows:
        t.add_row(*[_cell(r.get(c)) for c in columns])
    console.print(t)


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="one shape, fewer batches")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/generate.json"))
    ap.add_argument("--sections", default="speed,fidelity,cache_reduction,long_context",
                    help="comma-separated sections to run; the others keep their last results")
    ap.add_argument("--shapes", default="1x128,1x1024,8x128,8x1024", help="batch x prompt")
    ap.add_argument("--speed-shape", help=argparse.SUPPRESS)  # BxT: one shape (a child process)
    args = ap.parse_args()
    if args.speed_shape:
        with tempfile.TemporaryDirectory() as work:
            rows = speed_shape(args.speed_shape, Path(work))
        args.out.write_text(json.dumps(rows, indent=2))
        return
    wanted = set(args.sections.split(","))
    result = json.loads(args.out.read_text()) if args.out.exists() and wanted != {
        "speed", "fidelity", "cache_reduction", "long_context"} else {}
    result.update({"machine": machine(), "peers": peers.peer_versions()})
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save(rows: list[dict] | None = None) -> None:
        if rows is not None:
            result["speed"] = rows
        args.out.write_text(json.dumps(result, indent=2))

    earlier = result.get("speed", [])
    sections = {"speed": (lambda: speed(args.quick, save, args.shapes.split(","), earlier),
                          "speed (measured here)",
                          ["row", "batch", "prompt", "ttft_ms", "per_token_ms", "tokens_per_s"]),
                "fidelity": (lambda: fidelity(args.quick), "fidelity, char_lm (real weights)",
                             ["weights", "perplexity", "relative_change", "greedy_agreement"]),
                "cache_reduction": (lambda: cache_reduction(args.quick),
                                    "KV-cache reduction, char_lm",
                                    ["cache", "budget", "perplexity", "relative_change",
                                     "greedy_agreement"]),
                "long_context": (lambda: long_context(args.quick),
                                 "decode at long context (Llama-100M int8, onnxruntime)",
                                 ["prompt", "cache", "ttft_ms", "per_token_ms",
                                  "decode_speedup_vs_full"])}
    for name, (run, title, columns) in sections.items():
        if name in wanted:
            result[name] = run()
            save()
        if name in result:
            show(title, result[name], columns)
    save()
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
