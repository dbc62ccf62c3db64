"""Fuzzing what runs: each pass with generated options on a small graph, and `optim.load` of
saves whose manifest was edited (values replaced, keys dropped or added, nested structures
changed), then a call of what loaded. Every case ends in a result or a project error (issue 23).
"""

from __future__ import annotations

import copy
import json
import shutil

import torch
from factories import TinyMLP
from fuzzing import examples, outcome, wild
from hypothesis import given
from hypothesis import strategies as st
from test_fuzz_pipelines import PASS_NAMES, options_for

import optim
from optim import zoo
from optim.pass_base import Exact
from optim.registry import PASSES
from optim.testing import capture_example, run_pass

_GRAPHS: dict = {}


def _graph(name: str):
    """A small model's captured graph and example (built once per session)."""
    if name not in _GRAPHS:
        z = zoo.load(name)
        _GRAPHS[name] = (capture_example(z.model, z.example_args, z.example_kwargs),
                         z.example_args, z.example_kwargs)
    return _GRAPHS[name]


def _lossy_prerequisites(name: str) -> list[str]:
    out = []
    for req in PASSES.get(name).requires:
        out += _lossy_prerequisites(req)
        if not isinstance(PASSES.get(req).numerics, Exact):
            out.append(req)
    return out


@examples(0.5)
@given(entry=st.sampled_from(PASS_NAMES).flatmap(
    lambda n: st.tuples(st.just(n), options_for(PASSES.get(n)))))
def test_passes_run_with_generated_options(entry):
    """Options a pass accepts never crash it: it rewrites the graph or says why not."""
    name, options = entry
    gm, args, kwargs = _graph("vit" if name == "merge_tokens" else "bert")
    run = outcome("pass run", run_pass, name, gm, args, kwargs, options=options,
                  before=_lossy_prerequisites(name))
    if run is not None:
        assert all(torch.isfinite(t).all() or not torch.isfinite(b).all()
                   for t, b in zip(run.after, run.before)), f"{name} {options}: non-finite"


_SAVES: dict = {}
X = torch.randn(2, 8)
PROMPT = [[5, 6, 7]]


def _save(kind: str, root) -> tuple:
    """A save of each kind (a model on torch, on onnxruntime; a decoder), made once."""
    if kind not in _SAVES:
        if kind == "decoder":
            from transformers import GPT2Config, GPT2LMHeadModel

            torch.manual_seed(0)
            model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64,
                                               n_positions=32))
            om = optim.optimize(model, "cpu", torch.tensor(PROMPT), pipeline="cleanup",
                                backend="torch", measure_latency=False)
        else:
            om = optim.optimize(TinyMLP(), "cpu", (X,), pipeline="cleanup", backend=kind,
                                measure_latency=False)
        om.save(root / kind)
        _SAVES[kind] = root / kind, json.loads((root / kind / "manifest.json").read_text())
    return _SAVES[kind]


def _places(tree, at=()):
    """Every path into a JSON tree (the tree itself first)."""
    yield at
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) \
        if isinstance(tree, list) else ()
    for k, v in items:
        yield from _places(v, (*at, k))


def _edit(tree, path, op, value):
    if not path:
        return value if op == "replace" else tree
    parent = tree
    for k in path[:-1]:
        parent = parent[k]
    last = path[-1]
    if op == "replace":
        parent[last] = value
    elif op == "delete":
        del parent[last]
    elif isinstance(parent, dict):
        parent[f"{last}_"] = value
    else:
        parent.insert(last, value)
    return tree


SPECS = ("in_spec", "out_spec")  # JSON text inside the JSON: edited as trees too


@examples()
@given(kind=st.sampled_from(["torch", "onnxruntime", "decoder"]), data=st.data())
def test_edited_manifests_load_or_are_refused(tmp_path_factory, kind, data):
    root = tmp_path_factory.getbasetemp()
    source, original = _save(kind, root)
    manifest = copy.deepcopy(original)
    for key in SPECS:
        if isinstance(manifest.get(key), str):
            manifest[key] = json.loads(manifest[key])
    for _ in range(data.draw(st.integers(1, 3), "edits")):
        path = data.draw(st.sampled_from(list(_places(manifest))), "path")
        op = data.draw(st.sampled_from(["replace", "delete", "add"]), "op")
        value = data.draw(st.sampled_from([None, 0, -1, "", "x", "../x", "/etc/passwd", [],
                                           {}, "model.onnx", "torch", "tvm"]) | wild, "value")
        manifest = _edit(manifest, path, op, value)
    if isinstance(manifest, dict):
        for key in SPECS:
            if not isinstance(manifest.get(key), (str, type(None))):
                manifest[key] = json.dumps(manifest[key])
    target = tmp_path_factory.mktemp("m") / kind
    shutil.copytree(source, target)
    (target / "manifest.json").write_text(json.dumps(manifest))
    loaded = outcome(f"manifest: load {kind}", optim.load, target)
    if loaded is not None:
        call = (lambda: loaded.generate(PROMPT, 2)) if kind == "decoder" else (lambda: loaded(X))
        outcome(f"manifest: call {kind}", call)
