"""Post-pass FX graph -> kernels with FLOPs and bytes moved by class
(weights, activations, KV cache).

What a backend launches is modelled, not what FX lists:
- GEMM-like ops (linear, mm, bmm, matmul, conv, einsum, `optim::linear_int8`/`int4`/`binary`)
  and fused attention (`optim::attention`) are one kernel each, with their (M, N, K) shape;
- view-like ops (view, reshape, expand, slice, getitem, ...) are free;
- every other op is pointwise, a reduction or a copy, and connected runs of them between GEMMs
  fuse into one kernel that reads its external inputs and writes its external outputs once (what
  Inductor, TVM's FuseOps and ORT's elementwise fusions do). A run holding `r` reductions is
  `max(1, r)` launches.

Ops passes add register a rule in `KERNEL_RULES` (target name -> function(node) -> Kernel).
Shapes come from `node.meta["val"]`, so graphs captured on the meta device (no weights) work.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Node

from optim.ir import module_path, target_name

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
               torch.int8: "int8", torch.uint8: "int8", torch.int64: "int64",
               torch.int32: "int32", torch.bool: "bool", torch.float64: "fp64"}
BYTES = {"fp32": 4, "tf32": 4, "fp16": 2, "bf16": 2, "fp8": 1, "int8": 1, "int4": 0.5,
         "binary": 1 / 8, "int64": 8, "int32": 4, "bool": 1, "fp64": 8}


@dataclass
class Kernel:
    """One launched kernel: work, traffic by class, and the shape efficiency depends on."""

    name: str
    kind: str  # gemm | attention | fused | embedding
    dtype: str  # compute dtype of the math (peak lookup)
    flops: float
    bytes: dict[str, float] = field(default_factory=dict)  # weights / activations / kv_cache
    shape: tuple = ()  # gemm: (batch, M, N, K); attention: (B, H, Lq, Lk, D)
    launches: int = 1
    nodes: list[str] = field(default_factory=list)
    weight_format: str = "dense"  # dense | 2:4 | unstructured | binary | int4 ...
    density: float = 1.0  # nonzero fraction of the weights (sparsity passes set it)
    module: str = ""  # the user's module it came from (e.g. model.layers.3.mlp.down_proj)

    @property
    def total_bytes(self) -> float:
        return sum(self.bytes.values())

    @property
    def intensity(self) -> float:
        return self.flops / max(self.total_bytes, 1.0)

    def to_dict(self) -> dict:
        return {**self.__dict__, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict) -> Kernel:
        return cls(**{**d, "shape": tuple(d["shape"])})


def _val(n) -> torch.Tensor | None:
    v = n.meta.get("val") if isinstance(n, Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _nbytes(t: torch.Tensor | None, dtype: str | None = None) -> float:
    if t is None:
        return 0.0
    return t.numel() * BYTES.get(dtype or DTYPE_NAMES.get(t.dtype, "fp32"), 4)


def _dtype(t: torch.Tensor | None) -> str:
    return DTYPE_NAMES.get(t.dtype, "fp32") if t is not None else "fp32"


def _is_weight(n) -> bool:
    return isinstance(n, Node) and n.op == "get_attr"


def _classed(inputs: list, out: torch.Tensor | None) -> dict[str, float]:
    b = {"weights": 0.0, "activations": _nbytes(out)}
    for a in inputs:
        cls = "weights" if _is_weight(a) else "activations"
        b[cls] += _nbytes(_val(a))
    return b


# ------------------------------------------------------------------ kernel rules

def _sparsity(n: Node) -> dict:
    """The weight format a pruning pass left on the node (`prune_weights`), for sparse_scaling."""
    return {"weight_format": n.meta.get("weight_format", "dense"),
            "density": n.meta.get("weight_density", 1.0)}


def _linear(n: Node) -> Kernel:
    x, w = _val(n.args[0]), _val(n.args[1])
    out = _val(n)
    k, nout = x.shape[-1], w.shape[0]
    m = x.numel() // k
    return Kernel(n.name, "gemm", _dtype(x), 2.0 * m * nout * k, _classed(list(n.args[:3]), out),
                  (1, m, nout, k), nodes=[n.name], **_sparsity(n))


def _addmm(n: Node) -> Kernel:
    bias, a, b = (_val(x) for x in n.args[:3])
    m, k = a.shape
    nout = b.shape[1]
    return Kernel(n.name, "gemm", _dtype(a), 2.0 * m * nout * k,
                  _classed(list(n.args[:3]), _val(n)), (1, m, nout, k), nodes=[n.name],
                  **_sparsity(n))


def _matmul(n: Node) -> Kernel:
    a, b, out = _val(n.args[0]), _val(n.args[1]), _val(n)
    k = a.shape[-1]
    m = a.shape[-2] if a.dim() > 1 else 1
    nout = b.shape[-1] if b.dim() > 1 else 1
    batch = max(1, out.numel() // max(1, m * nout))
    return Kernel(n.name, "gemm", _dtype(a), 2.0 * batch * m * nout * k,
                  _classed(list(n.args[:2]), out), (batch, m, nout, k), nodes=[n.name])


def _conv(n: Node) -> Kernel:
    x, w, out = _val(n.args[0]), _val(n.args[1]), _val(n)
    groups = n.args[6] if len(n.args) > 6 else 1
    k = w[0].numel()  # Cin/groups * kh * kw
    m = out.numel() // out.shape[1]
    nout = w.shape[0]
    return Kernel(n.name, "gemm", _dtype(x), 2.0 * m * nout * k,
                  _classed(list(n.args[:3]), out), (groups, m, nout // groups, k),
                  nodes=[n.name])


def _einsum(n: Node) -> Kernel:
    """Two-operand einsum: every distinct index is a loop; the ones missing from the output
    are the contraction (K)."""
    eq = n.args[0].replace(" ", "")
    ins = [a for a in n.args[1] if isinstance(a, Node)]
    lhs, rhs = eq.split("->")
    size = {}
    for letters, a in zip(lhs.split(","), ins):
        size.update(zip(letters, _val(a).shape))
    k = math.prod(size[c] for c in set(size) - set(rhs))
    out = _val(n)
    nout = out.shape[-1] if out.dim() else 1
    return Kernel(n.name, "gemm", _dtype(_val(ins[0])), 2.0 * out.numel() * k,
                  _classed(ins, out), (1, out.numel() // max(1, nout), nout, k), nodes=[n.name])


def _linear_int8(n: Node) -> Kernel:
    """Integer GEMM plus its dynamic per-token activation quantization and output rescale, as
    lowered: |x| max (reads x), quantize (reads x, writes int8), int GEMM, scale and bias (read and
    write y twice). Dequantization is never free: four launches and that traffic are counted."""
    x, w, out = _val(n.args[0]), _val(n.args[1]), _val(n)
    k, nout = x.shape[-1], w.shape[0]
    m = x.numel() // k
    b = _classed(list(n.args[1:4]), out)
    b["activations"] += 2 * _nbytes(x) + m * k + 2 * _nbytes(out)
    return Kernel(n.name, "gemm", "int8", 2.0 * m * nout * k, b, (1, m, nout, k), launches=4,
                  nodes=[n.name])


def _linear_int4(n: Node) -> Kernel:
    """Weight-only int4: 4-bit weights (plus one fp32 scale per block) stream from memory and
    are dequantized in registers; the math runs at the activation dtype."""
    x, w, scales, out = _val(n.args[0]), _val(n.args[1]), _val(n.args[2]), _val(n)
    nout, k = w.shape[0], w.shape[1] * n.args[4]
    m = x.numel() // k
    b = {"weights": _nbytes(w) + _nbytes(scales) + _nbytes(_val(n.args[3])),
         "activations": _nbytes(x) + _nbytes(out), "kv_cache": 0.0}
    return Kernel(n.name, "gemm", _dtype(x), 2.0 * m * nout * k, b, (1, m, nout, k),
                  nodes=[n.name], weight_format="int4")


def _linear_binary(n: Node) -> Kernel:
    """1-bit weights (64 per word, plus scales). With binary activations (a threshold), the
    activations are packed first (read x, write bits) and the math is XNOR/popcount ("binary"
    ops, which only a target with a binary peak or a popcount feature runs fast); weights-only
    layers are unpacked and run at the activation dtype."""
    x, w, scales, out = _val(n.args[0]), _val(n.args[1]), _val(n.args[2]), _val(n)
    k, nout = n.args[5], w.shape[1]
    m = x.numel() // k
    binary_act = n.args[4] is not None
    b = {"weights": _nbytes(w) + _nbytes(scales) + _nbytes(_val(n.args[3])),
         "activations": _nbytes(x) + _nbytes(out), "kv_cache": 0.0}
    if binary_act:
        b["activations"] += _nbytes(x) + 2 * m * w.shape[0] * 8  # x read again, bits written/read
    return Kernel(n.name, "gemm", "binary" if binary_act else _dtype(x), 2.0 * m * nout * k, b,
                  (1, m, nout, k), launches=2 if binary_act else 1, nodes=[n.name],
                  weight_format="binary")


def _merge_tokens(n: Node) -> Kernel:
    """ToMe matching and merging: a [N/2 × N/2] similarity GEMM on the keys, then sorts, gathers
    and scatters over the tokens. The torch kernel issues about 20 small ops, all counted."""
    x, metric = _val(n.args[0]), _val(n.args[1])
    bsz, tokens, _ = x.shape
    d = metric.shape[-1]
    half = tokens // 2
    b = {"weights": 0.0, "activations": 2 * _nbytes(metric) + 4 * _nbytes(x), "kv_cache": 0.0}
    return Kernel(n.name, "gemm", _dtype(x), 2.0 * bsz * half * half * d, b,
                  (bsz, half, half, d), launches=20, nodes=[n.name])


def _unmerge_tokens(n: Node) -> Kernel:
    x, out = _val(n.args[0]), _val(n)
    return Kernel(n.name, "fused", _dtype(x), 0.0,
                  {"weights": 0.0, "activations": _nbytes(x) + _nbytes(out), "kv_cache": 0.0},
                  nodes=[n.name])


def _attention(n: Node) -> Kernel:
    """Fused attention: scores never leave on-chip memory; Q, K, V, mask and O move once."""
    q, k, v, out = (_val(a) for a in (n.args[0], n.args[1], n.args[2], n))
    bsz, heads, lq, d = q.shape
    lk = k.shape[-2]
    flops = 4.0 * bsz * heads * lq * lk * d + 5.0 * bsz * heads * lq * lk  # 2 GEMMs + softmax
    mask = n.args[3] if len(n.args) > 3 else None
    b = {"weights": 0.0, "activations": _nbytes(q) + _nbytes(out) + _nbytes(_val(mask)),
         "kv_cache": 0.0}
    b["activations"] += _nbytes(k) + _nbytes(v)
    return Kernel(n.name, "attention", _dtype(q), flops, b, (bsz, heads, lq, lk, d),
                  nodes=[n.name])


def _attention_trimmed(n: Node) -> Kernel:
    """Attention over the first `meta["attended"]` positions (the longest sequence of the
    batch it was estimated at; remove_padding sets it), else over all of them."""
    k = _attention(n)
    attended = n.meta.get("attended")
    if attended is None or attended >= k.shape[2]:
        return k
    bsz, heads, lq, lk, d = k.shape
    f = attended / lq
    k.flops *= f * f
    k.bytes = {c: v * f for c, v in k.bytes.items()}
    k.shape = (bsz, heads, attended, attended, d)
    return k


def _sdpa(n: Node) -> list[Kernel]:
    """`aten.scaled_dot_product_attention` left in the graph is costed unfused (QK^T GEMM, softmax
    over the [Lq, Lk] scores in memory, PV GEMM): ONNX export and TVM decompose it; only
    `fuse_attention` turns it into one kernel."""
    fused = _attention(n)
    bsz, heads, lq, lk, d = fused.shape
    scores = bsz * heads * lq * lk * 4.0
    qkv = fused.bytes["activations"]
    return [Kernel(n.name + ".qk", "gemm", fused.dtype, 2.0 * bsz * heads * lq * lk * d,
                   {"activations": qkv * 0.5 + scores}, (bsz * heads, lq, lk, d), nodes=[n.name]),
            Kernel(n.name + ".softmax", "fused", fused.dtype, 5.0 * bsz * heads * lq * lk,
                   {"activations": 2 * scores}, (), nodes=[n.name]),
            Kernel(n.name + ".pv", "gemm", fused.dtype, 2.0 * bsz * heads * lq * lk * d,
                   {"activations": qkv * 0.5 + scores}, (bsz * heads, lq, d, lk), nodes=[n.name])]


def _embedding(n: Node) -> Kernel:
    out = _val(n)
    return Kernel(n.name, "embedding", _dtype(out), 0.0,
                  {"weights": _nbytes(out), "activations": _nbytes(out)}, nodes=[n.name])


KERNEL_RULES: dict[str, Callable[[Node], Kernel | list[Kernel]]] = {
    "aten.linear": _linear, "aten.addmm": _addmm, "aten.mm": _matmul, "aten.bmm": _matmul,
    "aten.matmul": _matmul, "aten.baddbmm": _matmul, "aten.conv2d": _conv,
    "aten.conv1d": _conv, "aten.convolution": _conv, "aten.einsum": _einsum,
    "optim.linear_int8": _linear_int8, "optim.linear_int4": _linear_int4,
    "optim.linear_binary": _linear_binary,
    "optim.merge_tokens": _merge_tokens, "optim.unmerge_tokens": _unmerge_tokens,
    "optim.attention": _attention, "optim.attention_trimmed": _attention_trimmed,
    "aten.scaled_dot_product_attention": _sdpa, "aten.embedding": _embedding,
}

FREE = {"aten.view", "aten.reshape", "aten._unsafe_view", "aten.unsqueeze", "aten.squeeze",
        "aten.expand", "aten.slice", "aten.select", "aten.flatten", "aten.split",
        "aten.split_with_sizes", "aten.chunk", "aten.unbind", "getitem", "aten.alias",
        "aten.detach", "aten.t", "aten.lift_fresh_copy", "aten.dropout", "aten.contiguous",
        "aten.transpose", "aten.permute", "aten.expand_as", "aten.view_as", "aten.unflatten",
        "aten._assert_tensor_metadata", "aten.sym_size", "aten.sym_constrain_range_for_size"}
# transpose/permute/contiguous are counted free: fused backends fold layout changes into the
# neighbouring GEMM/attention kernels' indexing (cuBLAS/oneDNN strides, ORT's Attention input).
REDUCTIONS = {"aten.layer_norm", "aten.softmax", "aten._softmax", "aten.mean", "aten.sum",
              "aten.amax", "aten.rms_norm", "aten.group_norm", "aten.native_layer_norm",
              "aten.cumsum", "aten.log_softmax", "aten.var", "aten.std", "aten.max",
              "aten.argmax", "aten.norm"}


def _pointwise_flops(n: Node) -> float:
    out = _val(n)
    if out is None:
        return 0.0
    name = target_name(n.target)
    per = 8.0 if name in REDUCTIONS else (8.0 if name in ("aten.gelu", "aten.silu", "aten.tanh",
                                                          "aten.exp", "aten.sigmoid") else 1.0)
    src = max((_val(a).numel() for a in n.all_input_nodes if _val(a) is not None),
              default=out.numel())
    return per * max(out.numel(), src if name in REDUCTIONS else out.numel())


def graph_kernels(gm: GraphModule) -> list[Kernel]:
    """The kernels a fusing backend launches for `gm`, in graph order (fused runs placed at
    their first node)."""
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    kernels: dict[str, Kernel] = {}
    order: list[str] = []
    fusable: list[Node] = []
    for n in nodes:
        name = target_name(n.target)
        if name in KERNEL_RULES and (_val(n) is not None or
                                     isinstance(n.meta.get("val"), (tuple, list))):
            made = KERNEL_RULES[name](n)
            for k in made if isinstance(made, list) else [made]:
                k.module = module_path(n)
            kernels[n.name] = made
            order.append(n.name)
        elif name not in FREE and _val(n) is not None:
            fusable.append(n)
    # union-find over fusable nodes connected through fusable or free nodes
    group = {n: n for n in fusable}

    def find(x):
        while group[x] is not x:
            group[x] = group[group[x]]
            x = group[x]
        return x

    # fuse producer->consumer only at the same "GEMM depth": a run that spanned a GEMM would
    # depend on itself (the residual stream is connected through every layer otherwise)
    depth: dict[Node, int] = {}
    for n in gm.graph.nodes:
        depth[n] = max((depth[a] + (a.name in kernels) for a in n.all_input_nodes), default=0)
    for n in fusable:
        for a in n.all_input_nodes:
            for s in _source(a):
                if s in group and depth[s] == depth[n]:
                    group[find(s)] = find(n)
    members: dict[Node, list[Node]] = {}
    for n in fusable:
        members.setdefault(find(n), []).append(n)
    for ms in members.values():
        kernels[ms[0].name] = _fused(ms)
        kernels[ms[0].name].module = module_path(ms[-1])
        order.append(ms[0].name)
    pos = {n.name: i for i, n in enumerate(nodes)}
    out: list[Kernel] = []
    for k in sorted(order, key=pos.get):
        out += kernels[k] if isinstance(kernels[k], list) else [kernels[k]]
    return out


def _source(a: Node) -> list[Node]:
    """The nodes whose data a free (view-like) node reads."""
    if a.op == "call_function" and target_name(a.target) in FREE:
        return [s for x in a.all_input_nodes for s in _source(x)]
    return [a]


def _fused(ms: list[Node]) -> Kernel:
    inside = set(ms)
    ext_in = {s: None for n in ms for a in n.all_input_nodes for s in _source(a)
              if s not in inside}
    b = {"weights": 0.0, "activations": 0.0}
    for a in ext_in:
        b["weights" if _is_weight(a) else "activations"] += _nbytes(_val(a))
    for n in ms:
        if any(u not in inside for u in _consumers(n)):
            b["activations"] += _nbytes(_val(n))
    reductions = sum(target_name(n.target) in REDUCTIONS for n in ms)
    return Kernel(ms[0].name if len(ms) == 1 else f"{ms[0].name}..{ms[-1].name}", "fused",
                  _dtype(_val(ms[-1])), sum(_pointwise_flops(n) for n in ms), b, (),
                  max(1, reductions), [n.name for n in ms])


def _consumers(n: Node) -> list[Node]:
    """Users, looking through free (view-like) ops to the ops that actually read the data."""
    out = []
    for u in n.users:
        if u.op == "call_function" and target_name(u.target) in FREE:
            out += _consumers(u) or [u]
        else:
            out.append(u)
    return out
