"""GPU checks, run on a lent NVIDIA machine in one call: TVM's CUDA build of a MiniLM-shaped BERT
(numerics against PyTorch, latency next to the cost model's estimate), 2:4 semi-structured sparse
GEMMs against dense ones (per shape, and end to end through optim's torch backend), the chip's
measured ceilings, and eager PyTorch latencies of zoo models that the cost model is scored on.

Three steps; the GPU machine has PyTorch but not TVM's 260 MB compiler, so the CUDA library is
built here and only TVM's runtime travels:

    python benchmarks/gpu_check.py prepare   # here: build, references, TVM runtime, wheels
    bash benchmarks/gpu_check.sh [--only STAGE ...]   # there (carry .gpu): installs, runs, JSON
    python benchmarks/gpu_check.py report    # here: tables, and the fitted h200 calibration
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))
WORK = HERE.parent / ".gpu" / "work"
DATA = HERE / "results" / "gpu_check.json"
# all-MiniLM-L6-v2's shape; vocab cut to 1024 so the weights travel (the gather's cost is the same)
MINILM_SHAPE = {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12,
                "intermediate_size": 1536, "vocab_size": 1024}
TVM_BATCH, TVM_SEQ = 8, 128
# (zoo name, config overrides, batch, seq): eager PyTorch on the GPU, scored by the cost model
COST_CONFIGS = [
    ("bert", MINILM_SHAPE, 8, 128),
    ("bert", MINILM_SHAPE, 64, 128),
    ("bert", {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
              "intermediate_size": 3072, "vocab_size": 8000}, 32, 128),
    ("bert", {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
              "intermediate_size": 3072, "vocab_size": 8000}, 8, 512),
    ("gpt2", {"n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 8000,
              "n_positions": 1024}, 8, 256),
    ("gpt2", {"n_embd": 1536, "n_layer": 8, "n_head": 12, "vocab_size": 8000}, 1, 4),
    ("llama", {"hidden_size": 2048, "num_hidden_layers": 8, "num_attention_heads": 16,
               "num_key_value_heads": 4, "intermediate_size": 5632, "vocab_size": 8000}, 4, 512),
    ("llama", {"hidden_size": 2048, "num_hidden_layers": 8, "num_attention_heads": 16,
               "num_key_value_heads": 4, "intermediate_size": 5632, "vocab_size": 8000}, 1, 4),
    ("vit", {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
             "intermediate_size": 3072, "image_size": 224, "patch_size": 16}, 32, 0),
]
# (tokens, in, out): MiniLM FFN, BERT-base FFN, Llama-7B projections, one decode-sized GEMM
SPARSE_SHAPES = [(1024, 384, 1536), (1024, 1536, 384), (4096, 768, 3072), (4096, 3072, 768),
                 (8192, 4096, 4096), (8192, 4096, 11008), (8192, 11008, 4096), (16, 4096, 4096)]
E2E = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
       "intermediate_size": 3072, "vocab_size": 8000}


def _zoo(name, overrides, batch, seq):
    from optim import zoo

    o = dict(overrides)
    if name == "vit":
        return zoo.load("vit", batch=batch, **o)
    return zoo.load(name, batch=batch, seq=seq, **o)


# ---------------------------------------------------------------- here: prepare


def prepare(work: Path) -> None:
    """The MiniLM-shaped BERT with weights rounded to fp16 (they travel as fp16 and are widened
    to the same fp32 values there), its TVM CUDA build for sm_90, inputs, PyTorch's outputs, and
    the cost model's h200 estimates of its graph."""
    import torch
    from safetensors.numpy import save_file

    from backends import tvm_cuda
    from hardware.spec import load_spec
    from optim.ir import capture

    work.mkdir(parents=True, exist_ok=True)
    z = _zoo("bert", MINILM_SHAPE, TVM_BATCH, TVM_SEQ)
    with torch.no_grad():
        for p in z.model.parameters():
            p.copy_(p.half().float())
        ref = z.model(*z.example_args, **z.example_kwargs)
    cap = capture(z.model, z.example_args, z.example_kwargs)
    build = tvm_cuda.build_cuda(cap.gm, z.example_args, z.example_kwargs,
                                load_spec("h200").cuda_arch)
    d = work / "tvm_minilm"
    d.mkdir(exist_ok=True)
    manifest = build.save_to(d)
    # weights travel as fp16 (exact: they were rounded above); `device` widens them back
    save_file({f"p{i}": p.astype("float16") for i, p in enumerate(build.params)},
              str(d / "params_fp16.safetensors"))
    (d / "params.safetensors").unlink()
    from torch.utils._pytree import treespec_dumps

    info = cap.gm._graph._codegen.pytree_info
    manifest.update(in_spec=treespec_dumps(info.in_spec), out_spec=treespec_dumps(info.out_spec),
                    kernels=build.info["kernels"], source_sha256=build.info["source_sha256"])
    (d / "manifest.json").write_text(json.dumps(manifest, indent=1))
    torch.save({"args": z.example_args, "kwargs": z.example_kwargs,
                "ref": ref.last_hidden_state}, d / "io.pt")
    meta = {"model": f"BERT {MINILM_SHAPE} (random weights, fp16-rounded), batch {TVM_BATCH} x "
                     f"seq {TVM_SEQ}",
            "build": {k: v for k, v in build.info.items()}}
    (work / "meta.json").write_text(json.dumps(meta, indent=1))
    _runtime_bundle(work.parent)
    size = sum(f.stat().st_size for f in work.parent.rglob("*") if f.is_file())
    print(f"prepared {work.parent} ({size / 1e6:.1f} MB to carry)")


# what the GPU machine lacks, for its Python 3.12: TVM's runtime and the packages optim imports
WHEELS = ["apache-tvm-ffi==0.1.15.post2", "jsonschema==4.26.0",
          "jsonschema-specifications==2025.9.1", "referencing==0.37.0", "rpds-py==2026.9.1"]


def _runtime_bundle(root: Path) -> None:
    """`root/site/tvm`: this TVM package without its compiler library (260 MB) and sources;
    `root/whl`: cp312 wheels of the rest (`gpu_check.sh` installs them there)."""
    import shutil

    import tvm

    src, dst = Path(tvm.__file__).parent, root / "site" / "tvm"
    if dst.exists():
        shutil.rmtree(dst)
    skip = shutil.ignore_patterns("libtvm_compiler.so", "3rdparty", "src", "include", "web",
                                  "__pycache__")
    shutil.copytree(src, dst, ignore=skip)
    (root / "whl").mkdir(exist_ok=True)
    plat = [a for p in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
                        "manylinux_2_17_x86_64", "manylinux2014_x86_64") for a in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *plat,
                    "-d", str(root / "whl"), *WHEELS], check=True)


# ---------------------------------------------------------------- there: device


def _timer(fn, warmup=3, reps=20):
    """Median milliseconds of `fn` over `reps` calls, timed by CUDA events, after warm-up."""
    from backends.cuda_timing import cuda_times

    ts = cuda_times(fn, reps, warmup)
    return {"median_ms": ts[len(ts) // 2], "p10_ms": ts[len(ts) // 10],
            "p90_ms": ts[(9 * len(ts)) // 10], "runs": reps}


def _masked_problem(tokens: int, k: int, n: int):
    """A random fp16 weight [n, k] with a 2:4 magnitude mask, and an input [tokens, k]."""
    import torch

    w = torch.randn(n, k, device="cuda", dtype=torch.float16)
    g = w.reshape(n, -1, 4)
    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, g.abs().topk(2, -1).indices, True)
    return (g * keep).reshape(n, k), torch.randn(tokens, k, device="cuda", dtype=torch.float16)


def _env() -> dict:
    import torch

    p = torch.cuda.get_device_properties(0)
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.mem,"
                          "clocks.max.sm,power.draw,temperature.gpu", "--format=csv"],
                         capture_output=True, text=True).stdout.strip()
    try:
        import torch.backends.cusparselt as csl
        cusparselt = csl.version() if csl.is_available() else None
    except Exception:
        cusparselt = None
    return {"device": p.name, "sms": p.multi_processor_count,
            "memory_gb": round(p.total_memory / 1e9, 1), "torch": torch.__version__,
            "cuda": torch.version.cuda, "cusparselt": cusparselt, "nvidia_smi": smi,
            "python": sys.version.split()[0]}


def _ceilings() -> dict:
    import torch

    out = {}
    n = 1 << 28  # 1 GiB of fp32 each way
    x, y = torch.randn(n, device="cuda"), torch.empty(n, device="cuda")
    t = _timer(lambda: y.copy_(x))
    out["copy_gbs"] = 2 * n * 4 / (t["median_ms"] / 1e3) / 1e9
    for name, dtype, tf32 in (("fp16", torch.float16, False), ("bf16", torch.bfloat16, False),
                              ("fp32", torch.float32, False), ("tf32", torch.float32, True)):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        a = torch.randn(8192, 8192, device="cuda", dtype=dtype)
        b = torch.randn(8192, 8192, device="cuda", dtype=dtype)
        t = _timer(lambda: a @ b, reps=10)
        out[f"gemm_{name}_tflops"] = 2 * 8192 ** 3 / (t["median_ms"] / 1e3) / 1e12
    torch.backends.cuda.matmul.allow_tf32 = False
    s = torch.zeros(256, device="cuda")
    for _ in range(100):
        s.add_(1)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(2000):
        s.add_(1)
    torch.cuda.synchronize()
    out["eager_op_us"] = (time.perf_counter() - t0) / 2000 * 1e6
    return out


def _sparse_shapes() -> list:
    """Dense fp16 GEMM against PyTorch's two semi-structured kernels, per shape."""
    import torch.nn.functional as F

    from backends.semi_structured import _kernels

    rows = []
    for tokens, k, n in SPARSE_SHAPES:
        w, x = _masked_problem(tokens, k, n)
        dense = F.linear(x, w).float()
        td = _timer(lambda: F.linear(x, w))["median_ms"]
        row = {"tokens": tokens, "in": k, "out": n, "dense_ms": td,
               "dense_tflops": 2 * tokens * k * n / td / 1e9}
        for name, make in _kernels().items():
            try:
                ws = make(w)
                err = float((F.linear(x, ws).float() - dense).norm() / dense.norm())
                ts = _timer(lambda ws=ws: F.linear(x, ws))["median_ms"]
                row[name] = {"ms": ts, "speedup": td / ts, "rel_error": err}
            except Exception as e:
                row[name] = {"error": str(e)[:300]}
        rows.append(row)
    return rows


def _sparse_end_to_end() -> dict:
    """BERT-base shape, batch 32 x 128: optim's torch backend on the GPU in fp16, the 2:4 pruned
    graph with semi-structured weights against the same graph dense (masked zeros kept) and the
    unpruned model, timed interleaved on GPU-resident inputs."""
    import copy

    import torch

    import optim

    z = _zoo("bert", E2E, 32, 128)
    opts = {"backend": "torch", "backend_options": {"device": "cuda", "dtype": "float16"},
            "example_kwargs": z.example_kwargs, "measure_latency": False}
    dense = optim.optimize(copy.deepcopy(z.model), "h200", z.example_args, "cleanup", **opts)
    pruned = optim.optimize(copy.deepcopy(z.model), "h200", z.example_args,
                            "cleanup,prune_weights", prune_weights={"pattern": "2:4"},
                            **{**opts, "backend_options": {**opts["backend_options"],
                                                            "semi_structured": "always"}})
    auto = optim.optimize(copy.deepcopy(z.model), "h200", z.example_args,
                          "cleanup,prune_weights", prune_weights={"pattern": "2:4"}, **opts)
    masked = optim.optimize(copy.deepcopy(z.model), "h200", z.example_args,
                            "cleanup,prune_weights", prune_weights={"pattern": "2:4"},
                            **{**opts, "backend_options": {"device": "cuda", "dtype": "float32"}})
    masked_fp16 = copy.deepcopy(masked.artifact.gm).half()  # the same zeros, dense fp16 GEMMs
    from backends.pytorch import _retarget

    _retarget(masked_fp16, torch.float16, torch.device("cuda"))
    art = pruned.artifact
    args, kwargs = art.to_device((z.example_args, z.example_kwargs))
    times = {}
    with torch.inference_mode():
        for name, gm in (("dense fp16", dense.artifact.gm), ("2:4 masked, dense fp16", masked_fp16),
                         ("2:4 semi-structured fp16 (always)", art.gm),
                         ("2:4 semi-structured fp16 (auto)", auto.artifact.gm)):
            times[name] = _timer(lambda gm=gm: gm(*args, **kwargs))
        same = float((art.gm(*args, **kwargs).last_hidden_state.float()
                      - masked_fp16(*args, **kwargs).last_hidden_state.float()).norm()
                     / masked_fp16(*args, **kwargs).last_hidden_state.float().norm())
    base = times["dense fp16"]["median_ms"]
    return {"model": f"BERT {E2E}, batch 32 x 128", "times": times,
            "speedup_vs_dense": {k: base / v["median_ms"] for k, v in times.items()},
            "semi_structured": art.sparse, "semi_structured_auto": auto.artifact.sparse,
            "fidelity_pruned_vs_original": pruned.report["fidelity"]["outputs"],
            "fidelity_dense_fp16_vs_original": dense.report["fidelity"]["outputs"],
            "sparse_vs_masked_dense_rel_error": same}


def _graphed_shapes() -> list:
    """Dense against cuSPARSELt per shape, both replayed from CUDA graphs (no host setup)."""
    import torch.nn.functional as F

    from backends.semi_structured import _kernels, _median_ms

    rows = []
    for tokens, k, n in SPARSE_SHAPES:
        w, x = _masked_problem(tokens, k, n)
        td = _median_ms(lambda: F.linear(x, w), reps=20, graphed=True)
        row = {"tokens": tokens, "in": k, "out": n, "dense_graph_ms": td}
        for name, make in _kernels().items():
            try:
                ws = make(w)
                ts = _median_ms(lambda ws=ws: F.linear(x, ws), reps=20, graphed=True)
                row[name] = {"graph_ms": ts, "speedup": td / ts}
            except Exception as e:
                row[name] = {"error": str(e)[:300]}
        rows.append(row)
    return rows


def _cuda_graphs() -> dict:
    """optim's torch backend with cuda_graph=True against eager, on a launch-bound model
    (MiniLM shape, batch 8) and on BERT-base batch 32 dense and 2:4 (auto and always)."""
    import copy

    import optim

    out = {}
    for label, cfg, batch, pipes in (
            ("minilm b8", MINILM_SHAPE, 8, {"dense": ("cleanup", {})}),
            ("bert-base b32", E2E, 32, {
                "dense": ("cleanup", {}),
                "2:4 auto": ("cleanup,prune_weights", {"semi_structured": "auto"}),
                "2:4 always": ("cleanup,prune_weights", {"semi_structured": "always"})})):
        z = _zoo("bert", cfg, batch, 128)
        times, info = {}, {}
        for name, (pipe, extra) in pipes.items():
            for graph in (False, True):
                if name != "dense" and not graph:
                    continue
                om = optim.optimize(copy.deepcopy(z.model), "h200", z.example_args, pipe,
                                    example_kwargs=z.example_kwargs, backend="torch",
                                    backend_options={"device": "cuda", "dtype": "float16",
                                                     "cuda_graph": graph, **extra},
                                    measure_latency=False,
                                    **({"prune_weights": {"pattern": "2:4"}}
                                       if "prune" in pipe else {}))
                art = om.artifact
                args, kwargs = art.to_device((z.example_args, z.example_kwargs))
                key = f"{name}, {'CUDA graph' if graph else 'eager'}"
                times[key] = _timer(lambda art=art: art.run_on_device(args, kwargs))
                if art.sparse:
                    info[key] = {"converted": art.sparse["converted"],
                                 "kept_dense": len(art.sparse["kept_dense"]),
                                 "timings": art.sparse["timings"]}
                info.setdefault("fidelity", {})[key] = om.report["fidelity"]["outputs"]
        base = times["dense, eager"]["median_ms"]
        out[label] = {"times": times, "vs_dense_eager": {k: base / v["median_ms"]
                                                         for k, v in times.items()}, **info}
    return out


LLAMA_7B_LAYERS = {"hidden_size": 4096, "num_hidden_layers": 2, "num_attention_heads": 32,
                   "num_key_value_heads": 8, "intermediate_size": 11008, "vocab_size": 8000}


def _sparse_llama() -> dict:
    """Two Llama-7B-sized layers on 4 x 2048 tokens (the shapes where replayed cuSPARSELt beat
    dense): 2:4 magnitude pruning with `semi_structured="auto"` against the dense model, both
    fp16 and replayed from CUDA graphs."""
    import copy

    import optim

    z = _zoo("llama", LLAMA_7B_LAYERS, 4, 2048)
    times, info = {}, {}
    for name, pipe in (("dense", "cleanup"), ("2:4 auto", "cleanup,prune_weights")):
        om = optim.optimize(copy.deepcopy(z.model), "h200", z.example_args, pipe,
                            example_kwargs=z.example_kwargs, backend="torch",
                            backend_options={"device": "cuda", "dtype": "float16",
                                             "cuda_graph": True}, measure_latency=False,
                            **({"prune_weights": {"pattern": "2:4", "score": "magnitude"}}
                               if "prune" in pipe else {}))
        art = om.artifact
        args, kwargs = art.to_device((z.example_args, z.example_kwargs))
        times[name] = _timer(lambda art=art: art.run_on_device(args, kwargs), reps=10)
        info[name] = {"fidelity": om.report["fidelity"]["outputs"],
                      "semi_structured": art.sparse}
        del om, art
    return {"model": f"Llama {LLAMA_7B_LAYERS}, batch 4 x 2048", "times": times, **info,
            "speedup": times["dense"]["median_ms"] / times["2:4 auto"]["median_ms"]}


def _tvm_cuda(work: Path) -> dict:
    import torch
    import transformers.modeling_outputs  # noqa: F401  (registers the output pytree)
    from safetensors.numpy import load_file, save_file
    from torch.utils._pytree import treespec_loads

    from backends import tvm_cuda

    d = work / "tvm_minilm"
    manifest = json.loads((d / "manifest.json").read_text())
    save_file({k: v.astype("float32") for k, v in
               load_file(str(d / "params_fp16.safetensors")).items()},
              str(d / "params.safetensors"))
    io = torch.load(d / "io.pt", weights_only=False)
    if not tvm_cuda.gpu_available():  # say why TVM's CUDA runtime did not load
        import ctypes

        import tvm.base

        lib = Path(tvm.base._LOADED_LIBS["tvm_runtime"]._name).parent / "libtvm_runtime_cuda.so"
        try:
            ctypes.CDLL(str(lib))
            why = "its CUDA runtime loads, but it sees no device"
        except OSError as e:
            why = str(e)
        raise RuntimeError(f"TVM sees no GPU: {why}")
    t0 = time.perf_counter()
    art = tvm_cuda.load_cuda(d, manifest, treespec_loads(manifest["in_spec"]),
                             treespec_loads(manifest["out_spec"]))
    load_s = time.perf_counter() - t0
    got = tvm_cuda.run_on_gpu(art, io["args"], io["kwargs"], io["ref"],
                              io["kwargs"]["attention_mask"])
    out = art(*io["args"], **io["kwargs"]).last_hidden_state
    keep = io["kwargs"]["attention_mask"].bool()
    rel = float((out[keep] - io["ref"][keep]).norm() / io["ref"][keep].norm())
    # eager PyTorch on the same GPU, same shape (random weights: latency only)
    z = _zoo("bert", MINILM_SHAPE, TVM_BATCH, TVM_SEQ)
    torch.backends.cuda.matmul.allow_tf32 = False
    eager = {}
    for name, dt in (("torch eager fp32", torch.float32), ("torch eager fp16", torch.float16)):
        m = z.model.to("cuda", dt)
        kw = {k: v.cuda() for k, v in z.example_kwargs.items()}
        with torch.inference_mode():
            eager[name] = _timer(lambda m=m: m(**kw))
    return {"load_seconds": load_s, "ran": got["ran"], "fidelity": got["fidelity"],
            "rel_error": rel, "tvm_cuda": got["latency"], "eager": eager,
            "tvm_version": __import__("tvm").__version__}


def _cost_configs() -> list:
    import torch

    rows = []
    torch.backends.cuda.matmul.allow_tf32 = False
    for name, o, batch, seq in COST_CONFIGS:
        z = _zoo(name, o, batch, seq)
        for label, dt in (("fp16", torch.float16), ("fp32", torch.float32)):
            m = z.model.to("cuda", dt)
            conv = lambda t: t.to("cuda", dt if t.is_floating_point() else None)  # noqa: E731
            args = tuple(conv(a) for a in z.example_args)
            kw = {k: conv(v) if isinstance(v, torch.Tensor) else v
                  for k, v in z.example_kwargs.items()}
            with torch.inference_mode():
                t = _timer(lambda: m(*args, **kw), warmup=3, reps=15)
            rows.append({"family": name, "config": o, "batch": batch, "seq": seq,
                         "precision": label, **t})
            print(f"  {name} b={batch} s={seq} {label}: {t['median_ms']:.3f} ms", flush=True)
        del z
        torch.cuda.empty_cache()
    return rows


def device(work: Path, out: Path, only: list | None = None) -> int:
    import torch

    out.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        print("no CUDA GPU visible to PyTorch", file=sys.stderr)
        return 2
    res: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                 "meta": json.loads((work / "meta.json").read_text())}
    stages = [("env", _env), ("ceilings", _ceilings), ("tvm_cuda", lambda: _tvm_cuda(work)),
              ("sparse_shapes", _sparse_shapes), ("sparse_end_to_end", _sparse_end_to_end),
              ("cost_configs", _cost_configs), ("graphed_shapes", _graphed_shapes),
              ("cuda_graphs", _cuda_graphs), ("sparse_llama", _sparse_llama)]
    if only:
        stages = [st for st in stages if st[0] in only]
    for name, fn in stages:
        t0 = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            res[name] = fn()
        except Exception:
            res[name] = {"error": traceback.format_exc()[-3000:]}
            print(res[name]["error"], flush=True)
        res.setdefault("stage_seconds", {})[name] = round(time.perf_counter() - t0, 1)
        (out / "gpu_check.json").write_text(json.dumps(res, indent=1, default=str))
    _summary(res)
    return 0


def _summary(res: dict) -> None:
    c = res.get("ceilings", {})
    if "copy_gbs" in c:
        print(f"copy {c['copy_gbs']:.0f} GB/s; GEMM fp16 {c['gemm_fp16_tflops']:.0f} "
              f"bf16 {c['gemm_bf16_tflops']:.0f} tf32 {c['gemm_tf32_tflops']:.0f} "
              f"fp32 {c['gemm_fp32_tflops']:.1f} TFLOP/s; eager op {c['eager_op_us']:.1f} us")
    t = res.get("tvm_cuda", {})
    if "tvm_cuda" in t:
        print(f"TVM CUDA: rel err {t['rel_error']:.2e}, {t['tvm_cuda']['median_ms']:.3f} ms; "
              + ", ".join(f"{k} {v['median_ms']:.3f} ms" for k, v in t["eager"].items()))
    for r in res.get("sparse_shapes", []) if isinstance(res.get("sparse_shapes"), list) else []:
        print(f"2:4 {r['tokens']}x{r['in']}->{r['out']}: dense {r['dense_ms']:.3f} ms; "
              + "; ".join(f"{k} {v['ms']:.3f} ms {v['speedup']:.2f}x err {v['rel_error']:.1e}"
                          for k, v in r.items() if isinstance(v, dict) and "ms" in v))
    e = res.get("sparse_end_to_end", {})
    if "speedup_vs_dense" in e:
        print("end to end:", {k: round(v, 3) for k, v in e["speedup_vs_dense"].items()},
              "converted always/auto:", e["semi_structured"]["converted"],
              e["semi_structured_auto"]["converted"], e["semi_structured"]["kernels"])
    for r in res.get("graphed_shapes", []) if isinstance(res.get("graphed_shapes"), list) else []:
        cs = r.get("cuSPARSELt", {})
        print(f"graphed 2:4 {r['tokens']}x{r['in']}->{r['out']}: dense {r['dense_graph_ms']:.3f} "
              f"ms, cuSPARSELt {cs.get('graph_ms', float('nan')):.3f} ms "
              f"{cs.get('speedup', float('nan')):.2f}x")
    for label, v in (res.get("cuda_graphs") or {}).items():
        if isinstance(v, dict) and "vs_dense_eager" in v:
            print(label, {k: round(x, 3) for k, x in v["vs_dense_eager"].items()})
    sl = res.get("sparse_llama", {})
    if "speedup" in sl:
        print(f"llama 2:4 auto vs dense (graphs): {sl['speedup']:.3f}x, converted "
              f"{sl['2:4 auto']['semi_structured']['converted']}")
    print("stage seconds:", res.get("stage_seconds"))


# ---------------------------------------------------------------- here: report


HELD_OUT = {1, 4, 8}  # COST_CONFIGS indices the calibration fit never sees


def _kernels_of(i: int) -> list:
    """The cost model's kernels for COST_CONFIGS[i], from its captured fp32 graph."""
    from hardware.opcost import graph_kernels
    from optim.ir import capture

    z = _zoo(*COST_CONFIGS[i])
    return graph_kernels(capture(z.model, z.example_args, z.example_kwargs).gm)


def report(data: Path, work: Path) -> str:
    """Markdown tables from the device JSON: TVM CUDA, 2:4 kernels, and the cost model scored
    against the eager latencies (spec defaults, then a fit on part of the configs)."""
    from hardware.calibrate import fit, score
    from hardware.costmodel import default_calibration, estimate_kernels
    from hardware.opcost import graph_kernels
    from hardware.spec import load_spec

    res = json.loads(data.read_text())
    meta = res.get("meta", {})
    env, c, t = res["env"], res["ceilings"], res["tvm_cuda"]
    spec = load_spec("h200")
    out = [f"Device: {env['device']} ({env['sms']} SMs), driver {env['nvidia_smi'].split(', ')[-6]}"
           f", PyTorch {env['torch']} (CUDA {env['cuda']}, cuSPARSELt {env['cusparselt']}), "
           f"{res['date']}.", "",
           "| ceiling | measured | datasheet | fraction |", "|---|---|---|---|",
           f"| device copy | {c['copy_gbs']:.0f} GB/s | {spec.mem_bandwidth.value / 1e9:.0f} GB/s "
           f"| {c['copy_gbs'] * 1e9 / spec.mem_bandwidth.value:.3f} |"]
    for k in ("bf16", "fp16", "tf32", "fp32"):
        peak = spec.peak[k].value / 1e12
        out.append(f"| GEMM 8192³ {k} | {c[f'gemm_{k}_tflops']:.0f} TFLOP/s | {peak:.0f} TFLOP/s"
                   f" | {c[f'gemm_{k}_tflops'] / peak:.3f} |")
    out.append(f"| eager PyTorch op (tiny add) | {c['eager_op_us']:.1f} µs | | |")
    out += ["", "| 2:4 GEMM (fp16) | dense ms | dense TFLOP/s | cuSPARSELt ms | speedup | "
            "CUTLASS |", "|---|---|---|---|---|---|"]
    for r in res["sparse_shapes"]:
        cs, cu = r.get("cuSPARSELt", {}), r.get("CUTLASS", {})
        out.append(f"| {r['tokens']}×{r['in']}→{r['out']} | {r['dense_ms']:.3f} | "
                   f"{r['dense_tflops']:.0f} | {cs.get('ms', float('nan')):.3f} | "
                   f"{cs.get('speedup', float('nan')):.2f}× | "
                   f"{'error: ' + cu['error'][:60] if 'error' in cu else cu.get('ms')} |")
    e = res["sparse_end_to_end"]
    out += ["", f"End to end, {e['model']}, optim's torch backend on the GPU in fp16:", "",
            "| variant | median ms | vs dense |", "|---|---|---|"]
    for k, v in e["times"].items():
        out.append(f"| {k} | {v['median_ms']:.3f} | {e['speedup_vs_dense'][k]:.2f}× |")
    if "graphed_shapes" in res:
        out += ["",
                "The same GEMMs replayed from CUDA graphs (host-side setup per call drops out):",
                "", "| 2:4 GEMM (fp16) | dense ms | cuSPARSELt ms | speedup |",
                "|---|---|---|---|"]
        for r in res["graphed_shapes"]:
            cs = r.get("cuSPARSELt", {})
            out.append(f"| {r['tokens']}×{r['in']}→{r['out']} | {r['dense_graph_ms']:.3f} | "
                       f"{cs.get('graph_ms', float('nan')):.3f} | "
                       f"{cs.get('speedup', float('nan')):.2f}× |")
    if "cuda_graphs" in res:
        out += ["", "optim's torch backend on the GPU in fp16, eager against `cuda_graph=True`:",
                "",
                "| model | variant | median ms | vs dense eager | 2:4 linears run sparse |",
                "|---|---|---|---|---|"]
        for label, v in res["cuda_graphs"].items():
            for k, tm in v["times"].items():
                conv = v.get(k, {})
                total = conv["converted"] + conv["kept_dense"] if conv else 0
                cell = f"{conv['converted']} of {total}" if total else ""
                out.append(f"| {label} | {k} | {tm['median_ms']:.3f} | "
                           f"{v['vs_dense_eager'][k]:.2f}× | {cell} |")
    if "sparse_llama" in res:
        sl = res["sparse_llama"]
        ss = sl["2:4 auto"]["semi_structured"]
        out += ["", f"{sl['model']}, fp16, CUDA graphs: dense "
                f"{sl['times']['dense']['median_ms']:.2f}"
                f" ms, 2:4 auto {sl['times']['2:4 auto']['median_ms']:.2f} ms "
                f"({sl['speedup']:.3f}×); {ss['converted']} of "
                f"{ss['converted'] + len(ss['kept_dense'])} linears run on cuSPARSELt:", "",
                "| shape | dense ms | cuSPARSELt ms | chosen |", "|---|---|---|---|"]
        for tm in ss["timings"]:
            faster = tm["cuSPARSELt_ms"] * 1.05 < tm["dense_ms"]
            out.append(f"| {tm['rows']}×{tm['in']}→{tm['out']} | {tm['dense_ms']:.3f} | "
                       f"{tm['cuSPARSELt_ms']:.3f} | {'sparse' if faster else 'dense'} |")
    # the cost model against eager PyTorch
    rows = res["cost_configs"]
    index = {(r["family"], json.dumps(r["config"], sort_keys=True), r["batch"], r["seq"]): None
             for r in rows}
    keys = list(index)
    graphs_by_cfg = {}
    for i, (name, o, b, sq) in enumerate(COST_CONFIGS):
        graphs_by_cfg[(name, json.dumps(o, sort_keys=True), b, sq)] = (i, _kernels_of(i))
    graphs = [graphs_by_cfg[(r["family"], json.dumps(r["config"], sort_keys=True), r["batch"],
                             r["seq"])] for r in rows]
    meas = [r["median_ms"] / 1e3 for r in rows]
    prec = [r["precision"] for r in rows]
    test = [j for j, (i, _) in enumerate(graphs) if i in HELD_OUT]
    train = [j for j in range(len(rows)) if j not in test]
    base = default_calibration(spec)
    pred0 = [estimate_kernels(g, spec, base, p).seconds for (_, g), p in zip(graphs, prec)]
    cal = fit(spec, [graphs[j][1] for j in train], [meas[j] for j in train],
              f"fit on {len(train)} eager PyTorch runs on an H200", [prec[j] for j in train])
    pred1 = [estimate_kernels(g, spec, cal, p).seconds for (_, g), p in zip(graphs, prec)]
    out += ["", f"Cost model vs eager PyTorch on the H200 ({len(keys)} configs × fp16/fp32; "
            "held-out configs marked *):", "",
            "| model | batch × seq | precision | measured ms | spec defaults ms | fitted ms |",
            "|---|---|---|---|---|---|"]
    for j, r in enumerate(rows):
        o = r["config"]
        width = o.get("hidden_size", o.get("n_embd"))
        out.append(f"| {r['family']} {width}{'*' if j in test else ''} | {r['batch']} × "
                   f"{r['seq'] or 'image 224'} | {r['precision']} | {meas[j] * 1e3:.2f} | "
                   f"{pred0[j] * 1e3:.2f} | {pred1[j] * 1e3:.2f} |")
    s0, s_tr, s_te = (score([pred0[j] for j in range(len(rows))], meas),
                      score([pred1[j] for j in train], [meas[j] for j in train]),
                      score([pred1[j] for j in test], [meas[j] for j in test]))
    out += ["", "| predictions | n | MAPE | within ±25% | Spearman |", "|---|---|---|---|---|",
            f"| spec defaults, all | {s0['n']} | {s0['mape']:.1%} | {s0['within_25']:.0%} | "
            f"{s0['spearman']:.3f} |",
            f"| fitted, fit set | {s_tr['n']} | {s_tr['mape']:.1%} | {s_tr['within_25']:.0%} | "
            f"{s_tr['spearman']:.3f} |",
            f"| fitted, held out | {s_te['n']} | {s_te['mape']:.1%} | {s_te['within_25']:.0%} |"
            f" {s_te['spearman']:.3f} |", "",
            "Fitted parameters: " + ", ".join(f"{k}={v:.3g}" for k, v in cal.fit["params"].items())]
    from optim.ir import capture

    z = _zoo("bert", MINILM_SHAPE, TVM_BATCH, TVM_SEQ)
    g = graph_kernels(capture(z.model, z.example_args, z.example_kwargs).gm)
    est = {p: (estimate_kernels(g, spec, base, p).seconds * 1e3,
               estimate_kernels(g, spec, cal, p).seconds * 1e3) for p in ("fp32", "fp16")}
    out += ["", f"TVM CUDA build ({meta.get('model', 'MiniLM-shaped BERT')}): "
            f"{meta.get('build', {}).get('kernels', '?')} kernels, dlight GPU rules, untuned; "
            f"compiled at load by nvcc in {t['load_seconds']:.1f} s.", "",
            "| run | median ms | estimate, spec defaults | estimate, fitted |", "|---|---|---|---|",
            f"| TVM CUDA fp32 (rel. error vs PyTorch {t['rel_error']:.1e}) | "
            f"{t['tvm_cuda']['median_ms']:.3f} | {est['fp32'][0]:.3f} | {est['fp32'][1]:.3f} |"]
    for k, v in t["eager"].items():
        p = "fp16" if "fp16" in k else "fp32"
        out.append(f"| {k} | {v['median_ms']:.3f} | {est[p][0]:.3f} | {est[p][1]:.3f} |")
    from hardware.calibrate import SHIPPED, save

    save(cal, SHIPPED / "h200.json")  # h200 estimates use it (a local fit still wins)
    out.append(f"Saved as {SHIPPED.name}/h200.json: `h200` estimates use it.")
    md = "\n".join(out)
    print(md)
    return md


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=("prepare", "device", "report"))
    ap.add_argument("--work", type=Path, default=WORK)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/gpu_out")))
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--only", nargs="*", help="device: run these stages only")
    a = ap.parse_args()
    if a.step == "prepare":
        prepare(a.work)
    elif a.step == "device":
        return device(a.work, a.out, a.only)
    else:
        md = report(a.data, a.work)
        (a.data.with_suffix(".md")).write_text(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
