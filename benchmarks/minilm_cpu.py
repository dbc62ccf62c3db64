"""MiniLM (batch 8, seq 128) on this CPU: every runtime measured in ONE interleaved run.

Rows: PyTorch eager fp32, torch.compile, plain ONNX Runtime (the captured graph exported as is),
ONNX Runtime's own transformers optimizer + quantize_dynamic (the peer baseline), optim's
cpu_fp32 pipeline and optim's default cpu pipeline. Latency ratios are against eager in the same
run; fidelity is mean-pooled sentence-embedding cosine and nearest-neighbour agreement on real
sentences. Usage: python benchmarks/minilm_cpu.py [--sentences 256]
[--out benchmarks/results/minilm_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import warnings
from pathlib import Path

import onnx
import onnxruntime as ort
import torch
from rich.console import Console
from rich.table import Table

import optim
import optim.targets
from backends.onnxruntime import OrtArtifact
from optim import zoo
from optim.measure import machine, measure
from optim.zoo.data import sentences
from optim.zoo.tasks import sentence_batches, sentence_embedding_fidelity


def ort_peer(model, kw, plain: OrtArtifact, tmp: Path) -> OrtArtifact:
    """ORT's transformers optimizer (model_type=bert) then quantize_dynamic (its defaults).

    Starts from an opset-18 export (SDPA decomposed): quantize_dynamic turns opset-23 `Attention`
    nodes into QAttention nodes ORT then rejects ("Unrecognized attribute: is_causal", ORT 1.31).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    torch.onnx.export(model, (), kwargs=kw, dynamo=True,
                      opset_version=18).save(str(tmp / "plain.onnx"))
    opt = optimize_model(str(tmp / "plain.onnx"), model_type="bert", num_heads=12, hidden_size=384)
    opt.save_model_to_file(str(tmp / "opt.onnx"))
    quantize_dynamic(str(tmp / "opt.onnx"), str(tmp / "int8.onnx"), weight_type=QuantType.QInt8)
    return OrtArtifact(onnx.load(tmp / "int8.onnx"), plain.out_spec, plain.in_spec)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sentences", type=int, default=256)
    ap.add_argument("--out", default="benchmarks/results/minilm_cpu.json")
    ap.add_argument("--budget-s", type=float, default=60.0)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    console = Console()
    z = zoo.load("minilm", batch=8, seq=128)
    batches = sentence_batches(z.tokenizer, sentences(args.sentences), 8, 128)
    fidelity = sentence_embedding_fidelity(batches)
    kw = z.example_kwargs
    eager = lambda **k: z.model(**k)  # noqa: E731
    cands = {"PyTorch eager fp32": eager}
    with console.status("torch.compile"):
        compiled = torch.compile(z.model)
        with torch.inference_mode():
            compiled(**kw)
        cands["torch.compile (inductor)"] = lambda **k: compiled(**k)
    with console.status("plain ONNX Runtime"):
        plain = optim.optimize(z.model, "cpu", kw, pipeline=[], backend="onnxruntime",
                               measure_latency=False).artifact
        cands["ONNX Runtime fp32 (plain export)"] = plain
    with console.status("ORT transformers optimizer + quantize_dynamic"), \
            tempfile.TemporaryDirectory() as tmp:
        cands["ORT optimizer + quantize_dynamic int8"] = ort_peer(z.model, kw, plain, Path(tmp))
    chosen = optim.targets.resolve_target("cpu")
    console.print(f"cpu target's default backend: {chosen.default_backend} "
                  f"({chosen.backend_reason})")
    for pipe, backend in (("cpu_fp32", "onnxruntime"), ("cpu_default", "onnxruntime"),
                          ("cpu_default", "torch")):
        with console.status(f"optim {pipe} on {backend}"):
            om = optim.optimize(z.model, "cpu", kw, pipeline=pipe, eval_data=batches[:4],
                                backend=backend, measure_latency=False)
            mark = " (default)" if pipe == "cpu_default" and backend == chosen.default_backend \
                else ""
            cands[f"optim {pipe} on {backend}{mark}"] = om.artifact
    with console.status("optim cpu_default, static int8"):
        om = optim.optimize(z.model, "cpu", kw, pipeline="cpu_default", eval_data=batches[:4],
                            calibration=batches[-8:], backend=chosen.default_backend,
                            quantize={"activations": "static"}, measure_latency=False)
        cands[f"optim cpu_default, static int8 (percentile) on {chosen.default_backend}"] = \
            om.artifact
    fid = {}
    with console.status("fidelity on real sentences"), torch.inference_mode():
        for name, fn in cands.items():
            fid[name] = fidelity(eager, fn)
    with console.status("timing, interleaved"):
        lat = measure({n: (lambda fn=fn: fn(**kw)) for n, fn in cands.items()},
                      min_runs=10, budget_s=args.budget_s)
    base = lat["PyTorch eager fp32"]["median_ms"]
    t = Table(title=f"all-MiniLM-L6-v2, batch 8 x seq 128, {torch.get_num_threads()} threads, "
                    f"{args.sentences} real sentences")
    for c in ("runtime", "median ms", "p10-p90 ms", "x eager", "cos mean", "cos min", "NN agree"):
        t.add_column(c)
    rows = []
    for name in cands:
        timing, f = lat[name], fid[name]
        rows.append({"runtime": name, **timing, "x_eager": timing["median_ms"] / base, **f})
        t.add_row(name, f"{timing['median_ms']:.1f}",
                  f"{timing['p10_ms']:.0f}-{timing['p90_ms']:.0f}",
                  f"{timing['median_ms'] / base:.2f}", f"{f['cosine_mean']:.4f}",
                  f"{f['cosine_min']:.4f}", f"{100 * f['neighbour_agreement']:.1f}%")
    console.print(t)
    console.print(f"machine: {machine()}; onnxruntime {ort.__version__}")
    Path(args.out).write_text(json.dumps({"machine": machine(), "rows": rows,
                                          "default_backend": chosen.default_backend,
                                          "backend_reason": chosen.backend_reason}, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
