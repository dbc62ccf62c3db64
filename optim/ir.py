"""Capture: a PyTorch model traced by `torch.export` into an FX graph of aten ops.

The graph is `ep.module()`: weights are `get_attr` nodes, inputs and outputs keep the model's
pytree structure, and every node carries `meta["val"]` (a meta tensor with shape and dtype) at
the example inputs' shapes. Captured with dynamic shapes (`optim.shapes`), the graph computes
its sizes from its inputs (`sym_size` nodes) and runs at any shape in the declared ranges;
`meta["val"]` still holds the example's sizes, which is what passes reason about.
"""

from __future__ import annotations

import time
import traceback
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch.utils import _pytree as pytree

from optim.errors import BackendError, CaptureError
from optim.model_state import modes_kept


@dataclass
class Captured:
    gm: torch.fx.GraphModule
    args: tuple
    kwargs: dict
    seconds: float
    program: torch.export.ExportedProgram | None = None  # what export returned


def capture(model: torch.nn.Module, args: tuple, kwargs: dict | None = None,
            dynamic_shapes: Any = None) -> Captured:
    """Trace `model(*args, **kwargs)` into an FX graph with its own copy of the weights;
    `dynamic_shapes` as `torch.export` takes them (`optim.shapes.export_shapes`)."""
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"optimize() takes a torch.nn.Module, got {type(model).__name__}")
    kwargs = dict(kwargs or {})
    args = tuple(args) if isinstance(args, (tuple, list)) else (args,)
    t0 = time.perf_counter()
    try:
        with modes_kept(model), torch.no_grad():
            model.eval()
            ep = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes,
                                     strict=False)
    except Exception as e:  # torch.export raises many types; all become one clear error
        raise CaptureError(_explain_capture_failure(model, e)) from e
    gm = ep.module()
    _own_weights(gm)
    captured = Captured(gm, args, kwargs, time.perf_counter() - t0, ep)
    refresh_meta(gm, args, kwargs)
    return captured


def _own_weights(gm: torch.fx.GraphModule) -> None:
    """Give the graph copies of its parameters and buffers so no pass can touch the user's."""
    for name, p in list(gm.named_parameters(recurse=True)):
        _set(gm, name, torch.nn.Parameter(p.detach().clone(), requires_grad=False))
    for name, b in list(gm.named_buffers(recurse=True)):
        _set(gm, name, b.detach().clone())


def _set(root: torch.nn.Module, qualname: str, value: Any) -> None:
    *path, leaf = qualname.split(".")
    mod = root
    for p in path:
        mod = getattr(mod, p)
    if isinstance(value, torch.nn.Parameter):
        mod._parameters[leaf] = value
    elif leaf in getattr(mod, "_buffers", {}):
        mod._buffers[leaf] = value
    else:
        setattr(mod, leaf, value)


_HINTS = [
    (("DynamicCache", "Cache", "past_key_values"),
     "the model returns a KV cache object; pass use_cache=False (e.g. in example kwargs or "
     "config)"),
    (("data-dependent", "GuardOnDataDependentSymNode", "Could not guard on data-dependent"),
     "control flow depends on tensor values; make it static (fixed shapes, no .item() branching)"),
    (("Dynamic control flow", "cond"),
     "Python control flow on tensors cannot be traced; use torch.where or static branches"),
    (("not supported", "Unsupported", "NotImplementedError"),
     "an operation is not traceable; replace it or wrap it as a torch.library custom op"),
]


def _explain_capture_failure(model: torch.nn.Module, e: Exception) -> str:
    text = f"{type(e).__name__}: {e}"
    where = _failing_module(model, e)
    hint = next((h for keys, h in _HINTS if any(k in text for k in keys)),
                "check that the model runs eagerly with these inputs and uses static shapes")
    first = text.strip().splitlines()[0][:400] if text.strip() else type(e).__name__
    loc = f" in module {where}" if where else ""
    return (f"could not trace {type(model).__name__}{loc}: {first}\n  hint: {hint}\n"
            "  your model was not changed")


def _failing_module(model: torch.nn.Module, e: BaseException) -> str | None:
    """Name the deepest submodule of `model` whose forward is on the failing stack."""
    names = {id(m): (n or type(model).__name__) for n, m in model.named_modules()}
    found = None
    tb = e.__traceback__
    for frame, _ in traceback.walk_tb(tb):
        owner = frame.f_locals.get("self")
        if owner is not None and id(owner) in names:
            found = f"{names[id(owner)]} ({type(owner).__name__}, {frame.f_code.co_name})"
    if found is None and e.__cause__ is not None and e.__cause__ is not e:
        return _failing_module(model, e.__cause__)
    return found


# ---- running the graph and refreshing metadata ----

def flatten_inputs(gm: torch.fx.GraphModule, args: tuple, kwargs: dict) -> list:
    """The flat input list the graph's placeholders take, in order."""
    info = getattr(gm._graph._codegen, "pytree_info", None)
    if info is None:
        return list(args)
    from torch.fx._pytree import tree_flatten_spec

    return list(tree_flatten_spec((args, kwargs), info.in_spec))


# op -> fn(input values of a node) -> meta entries that depend on values, not only shapes
# (`optim.ops` registers one for attention_trimmed: the length it attends over); a non-fake
# `refresh_meta` records them, so the cost model sees them at the inputs the graph last ran on
VALUE_META: dict[Any, Any] = {}


class _MetaRecorder(torch.fx.Interpreter):
    def run_node(self, n):
        out = super().run_node(n)
        if n.target in VALUE_META:
            n.meta.update(VALUE_META[n.target](*self.fetch_args_kwargs_from_env(n)[0]))
        n.meta["val"] = pytree.tree_map(
            lambda t: t.detach().to("meta") if isinstance(t, torch.Tensor) else t, out)
        return out


def refresh_meta(gm: torch.fx.GraphModule, args: tuple, kwargs: dict, fake: bool = False) -> None:
    """Recompute every node's `meta["val"]` (shape, dtype) by running the graph once; with
    `fake`, on fake tensors (shapes only, no arithmetic: for passes that re-shape the graph
    several times)."""
    if not fake:
        with torch.no_grad():
            _MetaRecorder(gm).run(*flatten_inputs(gm, args, kwargs))
        return
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    with torch.no_grad():
        FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(
            *flatten_inputs(gm, args, kwargs))
    for n in gm.graph.nodes:
        if "val" in n.meta:
            n.meta["val"] = pytree.tree_map(
                lambda t: torch.empty(t.shape, dtype=t.dtype, device="meta")
                if isinstance(t, torch.Tensor) else t, n.meta["val"])


def trial_copy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of `gm`'s graph (and its meta) over the same weights: a pass rewrites the copy,
    checks it, and keeps it (`gm.graph = copy.graph`) or drops it."""
    import copy

    out = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
    out.graph._codegen = copy.deepcopy(gm.graph._codegen)
    out.meta.update(gm.meta)
    out.recompile()
    return out


def _reachable(node: torch.fx.Node, step) -> set:
    seen, todo = set(), [node]
    while todo:
        for other in step(todo.pop()):
            if other not in seen:
                seen.add(other)
                todo.append(other)
    return seen


def upstream(node: torch.fx.Node) -> set:
    """Every node `node` reads, directly or not."""
    return _reachable(node, lambda n: n.all_input_nodes)


def downstream(node: torch.fx.Node) -> set:
    """Every node that reads `node`, directly or not."""
    return _reachable(node, lambda n: n.users)


def depends_on_inputs(node: torch.fx.Node) -> bool:
    """Whether `node`'s values can change with the values of the graph's inputs (weights are
    get_attr). Reading an input's size does not count: in a graph with dynamic shapes,
    `ones(batch, seq)` or a CLS token expanded to the batch hold the same values at any shape."""
    return bool(value_inputs(node))


def value_inputs(node: torch.fx.Node) -> set:
    """The graph inputs (placeholders) whose values `node` reads, directly or not; reading an
    input's size does not count."""
    if node.op == "placeholder":
        return {node}
    reads = _reachable(node, lambda n: [] if n.target in _SIZE_READS else n.all_input_nodes)
    return {a for a in reads if a.op == "placeholder"}


_SIZE_READS = {torch.ops.aten.sym_size.int, torch.ops.aten.sym_numel.default}


def evaluate_nodes(gm: torch.fx.GraphModule, nodes: list, args: tuple, kwargs: dict) -> dict:
    """The values `nodes` take on one run of the graph on (args, kwargs)."""
    wanted, captured = set(nodes), {}
    if not wanted:
        return captured

    class Tap(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n in wanted:
                captured[n] = out
            return out

    with torch.no_grad():
        Tap(gm).run(*flatten_inputs(gm, args, kwargs))
    return captured


def shape(node: torch.fx.Node) -> tuple[int, ...] | None:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def op_histogram(gm: torch.fx.GraphModule) -> dict[str, int]:
    """Count call_function targets by name, e.g. {"aten.linear": 36, "optim.attention": 6}."""
    c: Counter = Counter()
    for n in gm.graph.nodes:
        if n.op == "call_function":
            c[target_name(n.target)] += 1
    return dict(sorted(c.items()))


def target_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        ns, name = target.namespace, target._schema.name.split("::")[-1]
        return f"{ns}.{name}"
    if isinstance(target, torch._ops.OpOverloadPacket):
        return str(target).replace("::", ".")
    return getattr(target, "__name__", str(target))


def add_constant(gm: torch.fx.GraphModule, base: str, value: torch.Tensor,
                 before: torch.fx.Node) -> torch.fx.Node:
    """Register `value` as a new buffer on `gm` and return a `get_attr` node for it."""
    name, i = base.replace(".", "_"), 0
    while hasattr(gm, name if i == 0 else f"{name}_{i}"):
        i += 1
    name = name if i == 0 else f"{name}_{i}"
    gm.register_buffer(name, value)
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(name)
    node.meta["val"] = value.detach().to("meta")
    return node


def replace_constant(gm: torch.fx.GraphModule, node: torch.fx.Node,
                     value: torch.Tensor) -> None:
    """Point the constant behind `node` at `value` (a Parameter stays a Parameter). Only for
    constants the graph owns: capture copied the user's weights."""
    old = get_constant(gm, node)
    _set(gm, node.target, torch.nn.Parameter(value.contiguous(), requires_grad=False)
         if isinstance(old, torch.nn.Parameter) else value.contiguous())


def require_lowerings(gm: torch.fx.GraphModule, lowered: set[str], backend: str) -> None:
    """Raise `BackendError` naming every optim op in `gm` that `backend` cannot lower
    (`lowered`: op names such as "attention"), and what to do instead."""
    missing = sorted({n.target.__name__.split(".")[0] for n in gm.graph.nodes
                      if n.op == "call_function" and getattr(n.target, "namespace", "") == "optim"
                      and n.target.__name__.split(".")[0] not in lowered})
    if missing:
        ops = ", ".join(f"optim::{m}" for m in missing)
        raise BackendError(f"the {backend} backend has no lowering for {ops} (added by a pass in "
                           f"the pipeline); run this pipeline with backend 'torch', or drop the "
                           f"pass that adds it")


def prune_unused_constants(gm: torch.fx.GraphModule) -> int:
    """Delete parameters and buffers no `get_attr` node reads any more; returns how many."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    dropped = 0
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name not in used:
            *path, leaf = name.split(".")
            mod = gm
            for p in path:
                mod = getattr(mod, p)
            mod._parameters.pop(leaf, None)
            mod._buffers.pop(leaf, None)
            dropped += 1
    return dropped


def get_constant(gm: torch.fx.GraphModule, node: Any) -> torch.Tensor | None:
    """The tensor behind a `get_attr` node, or None when `node` is not a constant."""
    if not isinstance(node, torch.fx.Node) or node.op != "get_attr":
        return None
    obj: Any = gm
    for p in node.target.split("."):
        obj = getattr(obj, p, None)
        if obj is None:
            return None
    return obj if isinstance(obj, torch.Tensor) else None


def module_path(node: torch.fx.Node) -> str:
    """The dotted name of the user's module a node came from (from export's nn_module_stack)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return node.name
    path = list(stack.values())[-1][0]
    return path.replace("L['self'].", "").replace("L__self__.", "") or node.name




def trace_function(fn, inputs: list) -> torch.fx.GraphModule:
    """`fn` traced into aten ops on the shapes of `inputs` (nodes, by `meta["val"]`, or tensors);
    matmul and friends stay whole (pre-dispatch), so the graph runs on any strides."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    with FakeTensorMode(allow_non_fake_inputs=True):
        fakes = [torch.empty(x.meta["val"].shape, dtype=x.meta["val"].dtype)
                 if isinstance(x, torch.fx.Node) else torch.empty(x.shape, dtype=x.dtype)
                 for x in inputs]
    return make_fx(fn, tracing_mode="fake", pre_dispatch=True)(*fakes)


def splice(gm: torch.fx.GraphModule, sub: torch.fx.GraphModule, inputs: list,
           before: torch.fx.Node, name: str = "inlined") -> torch.fx.Node:
    """Copy the ops of `sub` (from `trace_function`) into `gm` before `before`, its placeholders
    bound to `inputs` (nodes of `gm`, or tensors that become buffers of `gm`); returns the node
    holding its output. New nodes inherit `before`'s module path, so reports attribute them."""
    env: dict = {}
    placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
    for p, x in zip(placeholders, inputs):
        env[p] = x if isinstance(x, torch.fx.Node) else add_constant(gm, f"{name}_const", x, before)
    stack = before.meta.get("nn_module_stack")
    out = None
    for n in sub.graph.nodes:
        if n.op == "placeholder":
            continue
        if n.op == "output":
            out = env[n.args[0] if not isinstance(n.args[0], (tuple, list)) else n.args[0][0]]
            continue
        if n.op == "get_attr":  # a tensor the function created from Python values
            env[n] = add_constant(gm, f"{name}_const", getattr(sub, n.target), before)
            continue
        with gm.graph.inserting_before(before):
            new = gm.graph.node_copy(n, lambda a: env[a])
        new.meta = {"val": pytree.tree_map(
            lambda t: torch.empty(t.shape, dtype=t.dtype, device="meta")
            if isinstance(t, torch.Tensor) else t, n.meta.get("val"))}
        if stack:
            new.meta["nn_module_stack"] = stack
        env[n] = new
    return out
