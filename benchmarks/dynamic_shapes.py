"""Sentence embeddings with all-MiniLM-L6-v2 on real sentences: what dynamic shapes buy.

Every row turns the same texts into normalized mean-pooled embeddings end to end (tokenizing
included), timed interleaved in one run (median of `--repeats` passes over all texts):
  - eager fp32, batches of 8 padded to 128 tokens (a static-shape deployment);
  - sentence-transformers `encode()` at its defaults (batch 32; it sorts by length and pads
    each batch to its longest): what a user picks today;
  - ONNX Runtime with dynamic axes: its transformers optimizer + `quantize_dynamic`, fed by
    `optim.encode`;
  - optim fp32 (`cpu_fp32`) and optim default (int8) with dynamic shapes, via `optim.encode`
    (length-sorted batches filled to a token budget);
  - optim default traced at one shape (static, batches of 8 padded to 128), as before;
  - optim default with padding removed (`cpu_padding_free`), fed by `optim.encode` and fed
    batches of 8 padded to 128 (what padding removal buys a caller that pads).
Fidelity: embedding cosine (mean, min) and nearest-neighbour agreement against eager fp32.

    python benchmarks/dynamic_shapes.py --sentences 256
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from rich.console import Console
from rich.table import Table

import optim
from optim import zoo
from optim.measure import machine
from optim.numerics import embedding_fidelity, mean_pool
from optim.zoo.data import sentences

MAX_LENGTH = 256  # sentence-transformers' max_seq_length for this model


def padded_rows(fn, tok, texts: list[str], batch: int = 8, pad_to: int = 128) -> torch.Tensor:
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch):
            enc = tok(texts[i:i + batch], padding="max_length", truncation=True,
                      max_length=pad_to, return_tensors="pt")
            res = fn(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
            out.append(mean_pool(res[0] if isinstance(res, tuple) else res.last_hidden_state,
                                 enc["attention_mask"]))
    return torch.cat(out)


class OrtPeer:
    """ONNX Runtime as its users deploy it: dynamic axes, the transformers optimizer,
    `quantize_dynamic` (QInt8 weights), a session on every core."""

    def __init__(self, model, example: dict, tmp: Path):
        from onnxruntime.quantization import QuantType, quantize_dynamic
        from onnxruntime.transformers.optimizer import optimize_model

        batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=512)
        dims = {k: {0: batch, 1: seq} for k in example}
        torch.onnx.export(model, (), kwargs=example, dynamo=True, opset_version=18,
                          dynamic_shapes=dims).save(str(tmp / "plain.onnx"))
        opt = optimize_model(str(tmp / "plain.onnx"), model_type="bert", num_heads=12,
                             hidden_size=384)
        opt.save_model_to_file(str(tmp / "opt.onnx"))
        quantize_dynamic(str(tmp / "opt.onnx"), str(tmp / "int8.onnx"),
                         weight_type=QuantType.QInt8)
        so = ort.SessionOptions()
        # a spinning ORT pool would steal the 2 cores from the next row of the interleaved run
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(tmp / "int8.onnx"), so,
                                            providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.session.get_inputs()]

    def __call__(self, input_ids, attention_mask):
        feeds = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()}
        out = self.session.run(None, {n: feeds[n] for n in self.names})
        return torch.from_numpy(np.asarray(out[0]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sentences", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/dynamic_shapes.json")
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    console = Console()
    z = zoo.load("minilm", batch=8, seq=128)
    tok, model = z.tokenizer, z.model.eval()
    texts = sentences(a.sentences)
    lengths = [len(x) for x in tok(texts, truncation=True, max_length=MAX_LENGTH)["input_ids"]]
    console.print(f"{len(texts)} sentences, {sum(lengths)} real tokens (mean "
                  f"{statistics.mean(lengths):.1f}, max {max(lengths)}); padded to 128: "
                  f"{128 * len(texts)}")
    with console.status("optimizing"):
        kw = dict(z.example_kwargs)
        fp32 = optim.optimize(model, "cpu", example_kwargs=kw, pipeline="cpu_fp32",
                              measure_latency=False)
        dyn = optim.optimize(model, "cpu", example_kwargs=kw, measure_latency=False)
        static = optim.optimize(model, "cpu", example_kwargs=kw, measure_latency=False,
                                dynamic=False)
        packed = optim.optimize(model, "cpu", example_kwargs=kw, pipeline="cpu_padding_free",
                                measure_latency=False)
    with console.status("ONNX Runtime peer"), tempfile.TemporaryDirectory() as tmp:
        peer = OrtPeer(model, kw, Path(tmp))
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(zoo.minilm_path(), device="cpu")

    def encode_with(fn):
        return lambda: optim.encode(fn, tok, texts, max_length=MAX_LENGTH)

    rows = {
        "eager fp32, batch 8 padded to 128": lambda: padded_rows(model, tok, texts),
        "sentence-transformers encode() (defaults)": lambda: st.encode(
            texts, convert_to_tensor=True, normalize_embeddings=True),
        "ORT dynamic axes + quantize_dynamic, optim.encode": encode_with(peer),
        "optim fp32 (cpu_fp32), dynamic, optim.encode": encode_with(fp32),
        "optim default (int8), dynamic, optim.encode": encode_with(dyn),
        "optim default (int8), static batch 8 x 128": lambda: padded_rows(static, tok, texts),
        "optim default + remove_padding, optim.encode": encode_with(packed),
        "optim default + remove_padding, batch 8 padded to 128": lambda: padded_rows(
            packed, tok, texts),
    }
    ref = padded_rows(model, tok, texts)
    times: dict[str, list[float]] = {k: [] for k in rows}
    for _ in range(a.repeats):  # interleaved
        for name, run in rows.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    st_median = statistics.median(times["sentence-transformers encode() (defaults)"])
    base = statistics.median(times["eager fp32, batch 8 padded to 128"])
    m = machine()
    table = Table(title=f"MiniLM embeddings of {len(texts)} real sentences ({m['cpu']}, "
                        f"{m['threads']} threads), one interleaved run")
    for c in ("row", "median s", "sentences/s", "vs eager padded", "vs sentence-transformers",
              "cos mean", "cos min", "NN agree"):
        table.add_column(c)
    result = {"machine": m, "sentences": len(texts), "real_tokens": sum(lengths),
              "repeats": a.repeats, "rows": {}}
    for name, run in rows.items():
        med = statistics.median(times[name])
        fid = embedding_fidelity(ref, run().float().cpu())
        result["rows"][name] = {"median_s": med, "vs_eager_padded": base / med,
                                "vs_sentence_transformers": st_median / med, **fid}
        table.add_row(name, f"{med:.3f}", f"{len(texts) / med:.0f}", f"{base / med:.2f}x",
                      f"{st_median / med:.2f}x", f"{fid['cosine_mean']:.4f}",
                      f"{fid['cosine_min']:.4f}", f"{fid['neighbour_agreement']:.1%}")
    console.print(table)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    console.print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
