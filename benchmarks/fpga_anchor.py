"""The FPGA cost model (hardware/fpga.py) against FlightLLM's published LLaMA2-7B numbers.

U280: measured on board, 55 tokens/s at batch 1 (FlightLLM, FPGA'24, Fig. 1; the repo's
fpga_implementation README says its decode cases reproduce that figure). VHK158: simulated by
FlightLLM's own profiler (no hardware), from FlightLLM/flightllm_test_demo profile/README.md and
profile/.compiler_output/profiler_output/*.csv. Settings are those of FlightLLM's released IR:
INT4 weights, q/k projections 30% sparse (sparse_ratio 0.7), int8 activations and KV cache.

    python benchmarks/fpga_anchor.py
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from hardware.fpga import CLASSES, MODULES, estimate_llm
from hardware.llm_shape import LLAMA2
from hardware.spec import load_spec

MODEL = LLAMA2["llama2-7b"]
SETTINGS = dict(weight_bits=4, act_bits=8, kv_bits=8, sparsity={"q": 0.3, "k": 0.3})
# (target, what, published value, unit, kind of number, where it comes from)
CSV = "profiler_output/llama2_decode_token_{}.csv: {} ms per token"
PUBLISHED = [
    ("alveo-u280", ("decode", 128), 55.0, "tok/s", "measured",
     "paper Fig. 1; demo case decode_token_128"),
    ("alveo-u280", ("decode", 512), 55.0, "tok/s", "measured",
     "paper Fig. 1; demo case decode_token_512"),
    ("versal-vhk158", ("decode", 512), 1e3 / 9.809803, "tok/s", "simulated",
     CSV.format(512, 9.810)),
    ("versal-vhk158", ("decode", 1024), 1e3 / 10.615256, "tok/s", "simulated",
     CSV.format(1024, 10.615)),
    ("versal-vhk158", ("decode", 2048), 1e3 / 12.226162, "tok/s", "simulated",
     CSV.format(2048, 12.226)),
    ("versal-vhk158", ("decode_avg", 128, 512), 103.5, "tok/s", "simulated",
     "profile/README: prefill 128 + decode 512, avg throughput"),
    ("versal-vhk158", ("prefill", 128), 289.9, "ms", "simulated", "profile/README"),
    ("versal-vhk158", ("prefill", 512), 1181.4, "ms", "simulated", "profile/README"),
]


def predict(spec, what) -> tuple[str, float]:
    phase = what[0]
    if phase == "decode":
        est = estimate_llm(spec, MODEL, phase="decode", context_len=what[1], **SETTINGS)
        return f"decode, context {what[1]}", est.tokens_per_s
    if phase == "decode_avg":  # FlightLLM sums per-token times at contexts aligned up to 16
        prompt, n = what[1], what[2]
        seconds = sum(estimate_llm(spec, MODEL, phase="decode", context_len=-(-(prompt + i) // 16)
                                   * 16 - 1, **SETTINGS).seconds for i in range(1, n + 1))
        return f"prefill {prompt} then decode {n}, mean", n / seconds
    est = estimate_llm(spec, MODEL, phase="prefill", prompt_len=what[1], **SETTINGS)
    return f"prefill {what[1]} tokens", est.seconds * 1e3


def main() -> None:
    console = Console()
    specs = {n: load_spec(n) for n in ("alveo-u280", "versal-vhk158")}
    t = Table("target", "case", "FlightLLM", "model", "model / published", "published is", "source",
              title="LLaMA2-7B, batch 1: model vs FlightLLM (FPGA'24)")
    for name, what, pub, unit, kind, src in PUBLISHED:
        case, model = predict(specs[name], what)
        t.add_row(name, case, f"{pub:.1f} {unit}", f"{model:.1f} {unit}", f"{model / pub:.2f}",
                  kind, src)
    console.print(t)
    console.print(f"settings: {SETTINGS} (FlightLLM released IR: INT4 weights, q/k sparse_ratio "
                  "0.7, int8 activations/KV); attention dense; always-on-chip decode; "
                  "weight_format auto")

    est = estimate_llm(specs["alveo-u280"], MODEL, phase="decode", context_len=512, **SETTINGS)
    clock = est.design["clock_hz"]
    t = Table("class", "count (all cores)", "HBM MB", "cycles per core", "busy ms per core",
              title=f"one decode token on alveo-u280, context 512: {est.seconds * 1e3:.2f} ms = "
                    f"{est.tokens_per_s:.1f} tok/s, bound: {est.bound}")
    for c in CLASSES:
        row = est.instructions[c]
        t.add_row(c, f"{row['count']:,.0f}", f"{row['bytes'] / 1e6:,.1f}",
                  f"{row['cycles']:,.0f}", f"{row['cycles'] / clock * 1e3:.3f}")
    console.print(t)
    t = Table("module", "busy ms", "share of total", title="module timelines (they overlap)")
    for m in MODULES:
        t.add_row(m, f"{est.modules[m] * 1e3:.3f}", f"{est.modules[m] / est.seconds:.0%}")
    t.add_row("not overlapped (fill, drain, barriers)", f"{est.non_overlapped * 1e3:.3f}",
              f"{est.non_overlapped / est.seconds:.0%}")
    t.add_row("total", f"{est.seconds * 1e3:.3f}", "100%")
    console.print(t)
    t = Table("op", "unit", "x", "ms", "load ms", "compute ms", "vector ms", "store ms",
              title="per operator, summed over layers")
    for r in est.ops:
        t.add_row(r["op"], r["unit"], str(r["count"]), *(f"{r[k] * 1e3:.3f}" for k in
                  ("seconds", "load_s", "compute_s", "vector_s", "store_s")))
    console.print(t)
    hbm = ", ".join(f"{k} {v / 1e6:,.1f} MB" for k, v in est.hbm_bytes.items())
    console.print(f"HBM traffic per token: {hbm}")


if __name__ == "__main__":
    main()
