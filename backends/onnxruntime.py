"""onnxruntime backend: export the rewritten graph to ONNX and run it in an ORT session.

The session uses all cores (intra-op threads = `os.cpu_count()`) and full graph optimization;
`info()` lists the op types of the final, ORT-optimized graph, which is how fused nodes are
proven to exist.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import onnxscript
import torch
import torch.fx
from onnxscript.rewriter.ort_fusions import rms_normalization, skip_normalization
from torch.utils import _pytree as pytree

from backends.base import Artifact, Batch, Progress, pytree_specs, register_backend
from backends.onnx_lowering import OPSET, translation_table
from hardware.target import Target
from optim.errors import BackendError
from optim.ir import require_lowerings
from optim.shapes import export_program


def export_onnx(gm: torch.fx.GraphModule, args: tuple, kwargs: dict,
                int4_accuracy_level: int = 0) -> onnx.ModelProto:
    """The graph as one self-contained ONNX model (weights inline)."""
    require_lowerings(gm, {op.name().split("::")[1] for op in translation_table()},
                      "onnxruntime")
    quiet = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript")]
    levels = [lg.level for lg in quiet]
    try:
        for lg in quiet:  # the exporter logs optional-dependency and constant-folding chatter
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exported = export_program(gm, args, kwargs)  # dynamic axes become symbolic dims
            dynamic = bool(exported.range_constraints)
            # the exporter's fusions (opset-23 RotaryEmbedding) build caches ORT rejects at
            # other shapes (measured: Llama at batch 3 after export at 2): with dynamic axes
            # only the plain optimizer runs (constant folding), and ORT's session fuses
            program = torch.onnx.export(exported, dynamo=True, opset_version=OPSET,
                                        custom_translation_table=translation_table(
                                            int4_accuracy_level),
                                        optimize=not dynamic, verbose=False, report=False)
            if dynamic:
                onnxscript.optimizer.optimize(program.model)
            _fuse_rms_norms(program.model)
    except Exception as e:
        raise BackendError(f"ONNX export failed: {type(e).__name__}: {str(e)[:500]}") from e
    finally:
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)
    return program.model_proto


def _fuse_rms_norms(model) -> None:
    """RMSNorm (Llama, Qwen2, Mistral: x / sqrt(mean(x²) + eps) · w), with the residual add
    before it where there is one, as ORT's (Skip)SimplifiedLayerNormalization: one node instead
    of seven, which ORT's own fusion misses in the exporter's form. Shape-agnostic, so safe with
    dynamic axes (unlike the exporter's rotary-embedding fusion)."""
    rms_normalization.fuse_rms_normalization(model)
    skip_normalization.fuse_skip_rms_normalization(model)


class OrtArtifact(Artifact):
    backend = "onnxruntime"

    def __init__(self, model: onnx.ModelProto, out_spec=None, in_spec=None,
                 threads: int | None = None, spin_wait: bool = False,
                 memory_arena: str = "keep"):
        self.model = model
        self.out_spec, self.in_spec = out_spec, in_spec
        self.threads = threads or os.cpu_count() or 1
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # by default idle worker threads do not spin: on a 2-core machine a spinning ORT pool
        # steals the cores from whatever runs next (the eager model, in interleaved
        # measurements); decode steps spin (`OrtOptions.spin_wait`)
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin_wait else "0")
        self.spin_wait = spin_wait
        if memory_arena not in ARENA_MODES:
            raise BackendError(f"onnxruntime backend: memory_arena must be one of "
                               f"{', '.join(ARENA_MODES)}, got {memory_arena!r}")
        so.enable_cpu_mem_arena = memory_arena != "off"
        self.memory_arena = memory_arena
        # "shrink": after each unbound run (a decoder's prefill) the arena returns what that
        # run grew it by; bound runs (decode steps) keep reusing it
        self.run_options = ort.RunOptions()
        if memory_arena == "shrink":
            self.run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage",
                                                  "cpu:0")
        with tempfile.TemporaryDirectory() as tmp:
            so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
            so.log_severity_level = 3
            try:
                self.session = ort.InferenceSession(model.SerializeToString(), so,
                                                    providers=["CPUExecutionProvider"])
            except Exception as e:
                raise BackendError(f"ONNX Runtime could not load the model: {e}") from e
            final = onnx.load(so.optimized_model_filepath, load_external_data=False)
        self.final_ops = dict(sorted(Counter(
            (f"{n.domain}." if n.domain not in ("", "ai.onnx") else "") + n.op_type
            for n in final.graph.node).items()))
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    binds_buffers = True

    def run_bound(self, inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> None:
        """One run on flat inputs, in place: ORT reads every input and writes every output
        where the torch tensors lie (I/O binding), so a KV cache is never copied."""
        if len(inputs) != len(self.input_names) or len(outputs) != len(self.output_names):
            raise BackendError(f"run_bound: the ONNX model takes {len(self.input_names)} inputs "
                               f"and gives {len(self.output_names)} outputs, got "
                               f"{len(inputs)} and {len(outputs)}")
        binding = self.session.io_binding()
        for names, tensors, bind in ((self.input_names, inputs, binding.bind_input),
                                     (self.output_names, outputs, binding.bind_output)):
            for name, t in zip(names, tensors):
                if not t.is_contiguous():
                    raise BackendError(f"run_bound: {name} must be contiguous")
                bind(name, "cpu", 0, _NUMPY[t.dtype], tuple(t.shape), t.data_ptr())
        self.session.run_with_iobinding(binding)

    def __call__(self, *args, **kwargs):
        if self.in_spec is not None:
            from torch.fx._pytree import tree_flatten_spec

            flat = list(tree_flatten_spec((args, kwargs), self.in_spec))
        else:
            flat = list(args) + list(kwargs.values())
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        if len(tensors) != len(self.input_names):
            raise BackendError(f"the ONNX model takes {len(self.input_names)} tensor inputs "
                               f"({', '.join(self.input_names)}), got {len(tensors)}")
        feeds = {n: t.detach().cpu().numpy() for n, t in zip(self.input_names, tensors)}
        outs = [torch.from_numpy(np.asarray(o))
                for o in self.session.run(None, feeds, self.run_options)]
        return (pytree.tree_unflatten(outs, self.out_spec) if self.out_spec is not None
                else tuple(outs))

    def info(self) -> dict:
        return {"runtime": f"onnxruntime {ort.__version__}", "threads": self.threads,
                "opset": OPSET, "ops": self.final_ops}


    def save(self, directory: Path) -> dict:
        onnx.save_model(self.model, directory / "model.onnx")
        changed = {k: v for k, v in (("spin_wait", self.spin_wait),
                                     ("memory_arena", self.memory_arena))
                   if v != getattr(OrtOptions, k)}
        return {"artifact": "model.onnx", "backend_options": changed}


ARENA_MODES = ("keep", "shrink", "off")

_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64,
          torch.int32: np.int32, torch.bool: np.bool_, torch.uint8: np.uint8,
          torch.int8: np.int8}


@dataclass(frozen=True)
class OrtOptions:
    """The session uses every core and all graph optimizations. `int4_accuracy_level` is
    MatMulNBits' compute type for int4 linears: 4 quantizes activations to int8 per block and
    runs ORT's integer kernel (onnxruntime-genai's CPU default), 0 dequantizes to fp32.
    `spin_wait`: worker threads spin between nodes (lower latency for many small nodes)."""

    int4_accuracy_level: int = 4
    # idle worker threads spin instead of sleeping: a decode step's hundreds of small nodes
    # then do not wait for threads to wake (Llama-100M int4 decode 3.1 -> 2.1 ms/token here),
    # but the threads hold the cores briefly after each run (off for one-shot models, which
    # interleaved measurements run next to other work; decoders turn it on)
    spin_wait: bool = False
    # ORT's CPU arena keeps the largest run's buffers for the session's life ("keep"); "shrink"
    # hands back after each unbound run what it grew by (decoders: a long prompt's prefill
    # would otherwise pin gigabytes, while decode steps keep their arena); "off": no arena
    memory_arena: str = "keep"


def load(directory: Path, manifest: dict, in_spec=None, out_spec=None) -> OrtArtifact:
    options = manifest.get("backend_options") or {}
    return OrtArtifact(onnx.load(directory / manifest["artifact"]), out_spec=out_spec,
                       in_spec=in_spec, spin_wait=bool(options.get("spin_wait", False)),
                       memory_arena=str(options.get("memory_arena", "keep")))


@register_backend("onnxruntime", options=OrtOptions, load=load, dynamic=True)
def lower(gm: torch.fx.GraphModule, example: Batch, target: Target, options: OrtOptions,
          progress: Progress | None = None) -> OrtArtifact:
    """ONNX export (opset 23, optim's ops as ONNX/contrib ops) run by an ORT CPU session."""
    if options.int4_accuracy_level not in (0, 1, 2, 3, 4):
        raise BackendError(f"onnxruntime backend: int4_accuracy_level must be 0..4, got "
                           f"{options.int4_accuracy_level!r}")
    in_spec, out_spec = pytree_specs(gm)
    return OrtArtifact(export_onnx(gm, *example, options.int4_accuracy_level),
                       out_spec=out_spec, in_spec=in_spec, spin_wait=options.spin_wait,
                       memory_arena=options.memory_arena)
