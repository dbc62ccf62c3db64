"""Dynamic shapes: which input axes may vary (batch, sequence), the range each accepts, and the
check every call goes through.

By default token inputs (integer `[batch, seq]` tensors: ids, masks, positions) get a dynamic
batch and sequence axis, and every other tensor a dynamic batch axis (its leading dimension);
scalars and non-tensors stay as traced. `dynamic={"batch": (1, 64), "seq": (1, 512)}` sets the
ranges, `{"seq": None}` keeps an axis static, `dynamic=False` keeps everything static.
`torch.export` may narrow a range (a 512-position table caps `seq` at 512) or find that the
model fixes an axis; the spec records what export accepted and why an axis is static.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.export import Dim, ShapesCollection
from torch.utils import _pytree as pytree

from optim.errors import ConfigError

AXES = ("batch", "seq")
DEFAULT_RANGES = {"batch": (1, 1024), "seq": (1, 8192)}
_TOKEN_DTYPES = (torch.int64, torch.int32, torch.bool)


class ShapeError(ConfigError):
    """A call whose inputs the optimized model does not accept (dtype, rank or shape)."""


@dataclass(frozen=True)
class InputShape:
    name: str  # "input_ids", "arg0"
    dtype: str
    dims: tuple  # per dimension: its traced size (int), or an axis name ("batch", "seq")
    value: Any = None  # a non-tensor input (dtype "-"): the value it was traced with


@dataclass
class ShapeSpec:
    inputs: list[InputShape]
    ranges: dict[str, tuple[int, int]]  # dynamic axis -> (min, max) accepted
    static: dict[str, str] = field(default_factory=dict)  # axis -> why it is static
    traced: dict[str, int] = field(default_factory=dict)  # axis -> its size in the example
    # integer input -> rows of the embedding table it indexes (ids must lie in 0..rows - 1)
    bounds: dict[str, int] = field(default_factory=dict)

    @property
    def dynamic(self) -> bool:
        return bool(self.ranges)

    def without(self, axis: str, reason: str) -> ShapeSpec:
        """This spec with `axis` static (at its traced size)."""
        inputs = [InputShape(i.name, i.dtype, tuple(self.traced[d] if d == axis else d
                                                     for d in i.dims), i.value)
                  for i in self.inputs]
        return ShapeSpec(inputs, {a: r for a, r in self.ranges.items() if a != axis},
                         {**self.static, axis: reason}, dict(self.traced), dict(self.bounds))

    def all_static(self, reason: str) -> ShapeSpec:
        out = self
        for axis in list(self.ranges):
            out = out.without(axis, reason)
        return out

    def check(self, args: tuple, kwargs: dict) -> None:
        """Raise `ShapeError` naming the input, what it got and what it accepts."""
        got = dict(_named_leaves(args, kwargs))
        names = [i.name for i in self.inputs]
        fixed = {i.name for i in self.inputs if i.dtype == "-"}
        if set(got) - set(names) or set(names) - set(got) - fixed:
            raise ShapeError(f"the model takes the inputs {names} it was traced with, got "
                             f"{list(got)}")
        sizes: dict[str, tuple[str, int]] = {}  # axis -> (first input with it, its size)
        for want in self.inputs:
            if want.name not in got:  # a non-tensor keyword left out: its traced value
                continue
            value = got[want.name]
            if want.dtype == "-":  # a non-tensor input, fixed at trace time
                if isinstance(value, (bool, int, float, str, type(None))) \
                        and value != want.value:
                    raise ShapeError(f"input {want.name!r} was traced as {want.value!r} and is "
                                     f"fixed in the optimized model, got {value!r}; optimize "
                                     f"again with {want.name}={value!r}")
                continue
            if not isinstance(value, torch.Tensor):
                raise ShapeError(f"input {want.name!r} must be a {want.dtype} tensor of shape "
                                 f"{self.describe(want)}, got {type(value).__name__}")
            dtype = str(value.dtype).replace("torch.", "")
            if dtype != want.dtype:
                raise ShapeError(f"input {want.name!r} must be {want.dtype}, got {dtype} "
                                 f"(cast it, e.g. .to(torch.{want.dtype}))")
            if value.dim() != len(want.dims):
                raise ShapeError(f"input {want.name!r} must have {len(want.dims)} dimensions "
                                 f"{self.describe(want)}, got shape {tuple(value.shape)}")
            for size, dim in zip(value.shape, want.dims):
                lo, hi = self.ranges.get(dim, (dim, dim)) if isinstance(dim, str) else (dim, dim)
                if not lo <= size <= hi:
                    raise ShapeError(f"input {want.name!r} has shape {tuple(value.shape)}; "
                                     f"the model accepts {self.describe(want)}"
                                     + self._why_static(dim))
                if isinstance(dim, str):
                    first, seen = sizes.setdefault(dim, (want.name, size))
                    if seen != size:
                        raise ShapeError(f"input {want.name!r} has {dim} {size}, but "
                                         f"{first!r} has {seen}: inputs must agree "
                                         f"(shape {tuple(value.shape)})")
            self._check_bounds(want.name, value)

    def _check_bounds(self, name: str, value: torch.Tensor) -> None:
        """Ids outside the embedding table: a compiled backend would read out of bounds
        (garbage or a crash) and ONNX Runtime wraps negative ids silently."""
        rows = self.bounds.get(name)
        if rows is None or not value.numel():
            return
        lo, hi = int(value.min()), int(value.max())
        if lo < 0 or hi >= rows:
            bad = lo if lo < 0 else hi
            raise ShapeError(f"input {name!r} holds {bad}, outside 0..{rows - 1}: it indexes an "
                             f"embedding table of {rows} rows (ids from another tokenizer or "
                             f"vocabulary?)")

    def describe(self, item: InputShape) -> str:
        parts = []
        for d in item.dims:
            if isinstance(d, str) and d in self.ranges:
                lo, hi = self.ranges[d]
                parts.append(f"{d} {lo}..{hi}")
            else:
                parts.append(str(d))
        return "[" + ", ".join(parts) + "]"

    def _why_static(self, dim) -> str:
        for axis, size in self.traced.items():
            if size == dim and axis in self.static:
                return f" ({axis} is static: {self.static[axis]})"
        return ""

    def with_defaults(self, kwargs: dict) -> dict:
        """`kwargs` with every traced non-tensor keyword the call left out set to its traced
        value (the compiled artifacts take the call's structure as traced)."""
        missing = {i.name: i.value for i in self.inputs
                   if i.dtype == "-" and "[" not in i.name and not i.name.startswith("arg")
                   and i.name not in kwargs}
        return {**kwargs, **missing} if missing else kwargs

    def to_dict(self) -> dict:
        return {"inputs": [{"name": i.name, "dtype": i.dtype, "dims": list(i.dims),
                            **({"value": i.value} if i.dtype == "-" else {})}
                           for i in self.inputs],
                "ranges": {a: list(r) for a, r in self.ranges.items()},
                "static": dict(self.static), "traced": dict(self.traced),
                "bounds": dict(self.bounds)}

    @classmethod
    def from_dict(cls, d: dict) -> ShapeSpec:
        axes = {dim for i in d["inputs"] for dim in i["dims"] if isinstance(dim, str)}
        if axes - set(d["ranges"]):
            raise ValueError(f"axes {sorted(axes - set(d['ranges']))} have no range")
        return cls([InputShape(i["name"], i["dtype"], tuple(i["dims"]), i.get("value"))
                    for i in d["inputs"]],
                   {a: (int(r[0]), int(r[1])) for a, r in d["ranges"].items()},
                   dict(d.get("static", {})), {a: int(s) for a, s in d["traced"].items()},
                   {n: int(r) for n, r in d.get("bounds", {}).items()})


def infer(args: tuple, kwargs: dict, dynamic: Any = None) -> ShapeSpec:
    """The spec for example inputs: `dynamic` None/True (default axes and ranges), False (all
    static), or {"batch": (lo, hi) | None, "seq": (lo, hi) | None}."""
    ranges = _ranges(dynamic)
    inputs, traced = [], {}
    for name, value in _named_leaves(args, kwargs):
        if not isinstance(value, torch.Tensor):
            kept = value if isinstance(value, (bool, int, float, str, type(None))) else None
            inputs.append(InputShape(name, "-", (), kept))
            continue
        axes = _default_axes(value)
        dims = []
        for i, size in enumerate(value.shape):
            axis = axes.get(i)
            if axis is not None:
                if traced.setdefault(axis, size) != size:
                    raise ConfigError(f"example input {name!r} has {axis} {size}, but an earlier "
                                      f"input has {traced[axis]}: inputs must agree")
            dims.append(axis if axis in ranges else size)
        inputs.append(InputShape(name, str(value.dtype).replace("torch.", ""), tuple(dims)))
    static = {a: "dynamic shapes are off for it" for a in AXES if a not in ranges and a in traced}
    return ShapeSpec(inputs, {a: r for a, r in ranges.items() if a in traced}, static, traced)


def export_shapes(spec: ShapeSpec, args: tuple, kwargs: dict) -> ShapesCollection | None:
    """`torch.export`'s dynamic_shapes for these inputs (None when nothing is dynamic)."""
    if not spec.dynamic:
        return None
    shapes = ShapesCollection()
    for want, (_, value) in zip(spec.inputs, _named_leaves(args, kwargs)):
        marks = {i: Dim.AUTO(min=spec.ranges[d][0], max=spec.ranges[d][1])
                 for i, d in enumerate(want.dims) if isinstance(d, str)}
        if isinstance(value, torch.Tensor) and marks:
            shapes[value] = marks
    return shapes


def export_program(gm: torch.fx.GraphModule, args: tuple, kwargs: dict
                   ) -> torch.export.ExportedProgram:
    """`gm` exported again (to save it, or to hand it to the ONNX exporter) with the dynamic
    axes of `gm.meta["shapes"]`, so what is written runs every shape the graph does."""
    spec = gm.meta.get("shapes")
    dynamic = export_shapes(spec, args, kwargs) if isinstance(spec, ShapeSpec) else None
    return torch.export.export(gm, args, kwargs, dynamic_shapes=dynamic, strict=False)


def accepted(spec: ShapeSpec, ep: torch.export.ExportedProgram) -> ShapeSpec:
    """`spec` narrowed to what export accepted: the range of each axis's symbols, and axes the
    model fixed made static with the reason."""
    symbols: dict[str, list] = {}
    placeholders = [n for n in ep.graph.nodes if n.op == "placeholder"
                    and n.name not in ep.graph_signature.inputs_to_parameters
                    and n.name not in ep.graph_signature.inputs_to_buffers
                    and n.name not in ep.graph_signature.inputs_to_lifted_tensor_constants]
    tensors = [i for i in spec.inputs if i.dtype != "-"]
    vals = [n.meta.get("val") for n in placeholders if isinstance(n.meta.get("val"),
                                                                   torch.Tensor)]
    for want, val in zip(tensors, vals):
        for d, size in zip(want.dims, val.shape):
            if isinstance(d, str):
                symbols.setdefault(d, []).append(size)
    out = ShapeSpec(spec.inputs, dict(spec.ranges), dict(spec.static), dict(spec.traced),
                    _index_bounds(tensors, placeholders, ep))
    for axis, sizes in symbols.items():
        if any(isinstance(s, int) for s in sizes):
            why = (f"traced at {axis} {spec.traced[axis]}, which torch.export always fixes: "
                   f"trace with a {axis} of 2 or more" if spec.traced[axis] <= 1 else
                   "the model fixes it (torch.export specialized it to the traced size)")
            out = out.without(axis, why)
            continue
        lo, hi = out.ranges[axis]
        for s in sizes:  # export's lower bound of 2 is its 0/1 rule, not the model's: kept
            vr = ep.range_constraints.get(s.node.expr)
            if vr is not None and vr.upper.is_finite:
                hi = min(hi, int(vr.upper))
        out.ranges[axis] = (lo, hi)
    return out


_PASS_THROUGH = {torch.ops.aten.view.default, torch.ops.aten.reshape.default,
                 torch.ops.aten._to_copy.default, torch.ops.aten.clone.default,
                 torch.ops.aten.contiguous.default, torch.ops.aten.flatten.using_ints}


def _index_bounds(tensors: list[InputShape], placeholders: list, ep) -> dict[str, int]:
    """Integer inputs that index an embedding table (directly or through views and casts):
    input name -> the table's rows."""
    out: dict[str, int] = {}
    for want, node in zip(tensors, [n for n in placeholders
                                    if isinstance(n.meta.get("val"), torch.Tensor)]):
        if want.dtype not in ("int64", "int32"):
            continue
        frontier, seen = [node], set()
        while frontier:
            n = frontier.pop()
            for user in n.users:
                if user in seen:
                    continue
                seen.add(user)
                if user.target is torch.ops.aten.embedding.default and user.args[1] is n:
                    rows = user.args[0].meta["val"].shape[0]
                    out[want.name] = min(out.get(want.name, rows), int(rows))
                elif user.target in _PASS_THROUGH:
                    frontier.append(user)
    return out


def probes(spec: ShapeSpec, example: tuple) -> list[tuple[str, tuple]]:
    """Batches at other shapes within the ranges, built from the example's own values (rows
    repeated for a larger batch, tokens cut or repeated for another length): one per dynamic
    axis, changing only that axis, labelled like "batch 3"."""
    traced = spec.traced
    out = []
    for axis, (lo, hi) in spec.ranges.items():
        size = traced[axis]
        other = size + 1 if size + 1 <= hi else size - 1
        if axis == "seq":  # an odd, shorter length catches chunking that assumed the traced one
            other = max(lo, size // 2 + 1) if size // 2 + 1 != size else other
        if other == size or not lo <= other <= hi:
            continue
        out.append((f"{axis} {other}", resize(spec, example, axis, other)))
    return out


def resize(spec: ShapeSpec, example: tuple, axis: str, size: int) -> tuple:
    """`example` with `axis` at `size`: rows or tokens taken cyclically from the example."""
    args, kwargs = example
    leaves, treespec = pytree.tree_flatten((args, kwargs))
    new = []
    for leaf, want in zip(leaves, spec.inputs):
        if isinstance(leaf, torch.Tensor) and axis in want.dims:
            dim = want.dims.index(axis)
            index = torch.arange(size) % leaf.shape[dim]
            leaf = leaf.index_select(dim, index)
        new.append(leaf)
    return pytree.tree_unflatten(new, treespec)


def _ranges(dynamic: Any) -> dict[str, tuple[int, int]]:
    if dynamic is False:
        return {}
    if dynamic is None or dynamic is True:
        return dict(DEFAULT_RANGES)
    if not isinstance(dynamic, dict):
        raise ConfigError(f"dynamic must be True, False or a dict like {{'batch': (1, 64), "
                          f"'seq': (1, 512)}}, got {dynamic!r}")
    unknown = set(dynamic) - set(AXES)
    if unknown:
        raise ConfigError(f"dynamic: unknown axis {sorted(unknown)}; the axes are {AXES}")
    out = {}
    for axis in AXES:
        r = dynamic.get(axis, DEFAULT_RANGES[axis])
        if r is None or r is False:
            continue
        if (not isinstance(r, (list, tuple)) or len(r) != 2
                or not all(isinstance(x, int) for x in r) or not 1 <= r[0] <= r[1]):
            raise ConfigError(f"dynamic[{axis!r}] must be (min, max) with 1 <= min <= max, or "
                              f"None for a static {axis}; got {r!r}")
        out[axis] = (int(r[0]), int(r[1]))
    return out


def _default_axes(t: torch.Tensor) -> dict[int, str]:
    if t.dim() == 0:
        return {}
    if t.dtype in _TOKEN_DTYPES and t.dim() == 2:
        return {0: "batch", 1: "seq"}
    return {0: "batch"}


def _named_leaves(args: tuple, kwargs: dict) -> list[tuple[str, Any]]:
    out = []
    for i, a in enumerate(args):
        out += [(f"arg{i}" if len(pytree.tree_leaves(a)) == 1 else f"arg{i}[{j}]", leaf)
                for j, leaf in enumerate(pytree.tree_leaves(a))]
    for k, v in kwargs.items():
        leaves = pytree.tree_leaves(v)
        out += [(k if len(leaves) == 1 else f"{k}[{j}]", leaf) for j, leaf in enumerate(leaves)]
    return out
