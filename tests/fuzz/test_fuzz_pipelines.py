"""Fuzzing how a pipeline is written: the YAML file (schema and values), the one-line text, and
each pass's options. Every case ends in a pipeline or a project error with a message (issue 23).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from importlib import resources

import yaml
from fuzzing import examples, names, outcome, sometimes_wild, wild
from hypothesis import given
from hypothesis import strategies as st

import passes  # noqa: F401  (registers every pass)
from hardware.spec import target_names
from optim.config import load_pipeline_file
from optim.pass_base import config_to_dict
from optim.pipeline import Pipeline
from optim.registry import PASSES

PASS_NAMES = sorted(PASSES.names())
SCHEMA = json.loads(resources.files("optim").joinpath("schemas/pipeline.schema.json")
                    .read_text())


def from_schema(schema: dict) -> st.SearchStrategy:
    """Values of the shape `schema` describes (types, enums, bounds, keys), not always valid:
    bounds are edges to cross, and any value may turn wild."""
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    choices = schema.get("oneOf", schema.get("anyOf"))
    if choices:
        base = {k: v for k, v in schema.items() if k not in ("oneOf", "anyOf")}
        return st.one_of([from_schema({**base, **s}) for s in choices])
    kind = schema.get("type")
    if isinstance(kind, list):
        return st.one_of([from_schema({**schema, "type": k}) for k in kind])
    low = schema.get("minimum", schema.get("exclusiveMinimum"))
    if kind == "integer":
        return st.integers(-3 if low is None else low - 1, 10**9)
    if kind == "number":
        return st.floats(allow_nan=True) | st.floats(-1 if low is None else low - 1, 10)
    if kind == "boolean":
        return st.booleans()
    if kind == "string" and "pattern" in schema:
        return sometimes_wild(st.from_regex(schema["pattern"], fullmatch=True), 6)
    if kind == "string":
        return names | st.sampled_from(["x", "../x", "/tmp/x", "a b"])
    if kind == "array":
        return st.lists(from_schema(schema.get("items", {})), max_size=4)
    if kind == "object" or "properties" in schema:
        props = schema.get("properties", {})
        return st.fixed_dictionaries(
            {}, optional={k: sometimes_wild(from_schema(v), 8) for k, v in props.items()})
    return wild


def options_for(spec) -> st.SearchStrategy:
    """Options of one pass: its own keys with values of their declared types (edge values
    included), now and then a wrong type or an unknown key."""
    hints = typing.get_type_hints(spec.config)
    fields = {f.name: sometimes_wild(_typed(f.name, hints[f.name]), 6)
              for f in dataclasses.fields(spec.config)}
    return st.fixed_dictionaries({}, optional={**fields, "nosuch": wild})


def _typed(name: str, hint) -> st.SearchStrategy:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return st.sampled_from(args) | names
    if origin is tuple:
        return st.lists(_typed(name, args[0]), max_size=4)
    if hint is bool:
        return st.booleans()
    if hint is int:  # training steps and batch counts stay small so a case takes seconds
        small = name.endswith(("steps", "batches", "rows"))
        return st.integers(-2, 3) if small else (st.integers(-2, 300)
                                                 | st.sampled_from([0, 2**31, 2**62]))
    if hint is float:
        return st.floats(-2, 2) | st.sampled_from([0.0, 1.0, 1e9, -1e-9])
    if hint is str:
        return st.sampled_from(["classifier", "lm_head", "[", ".*"]) | names
    return wild


pass_entry = st.sampled_from(PASS_NAMES).flatmap(
    lambda n: st.just(n) | options_for(PASSES.get(n)).map(lambda o, n=n: {n: o}))
pipeline_file = from_schema(SCHEMA).flatmap(lambda d: st.fixed_dictionaries({
    "version": sometimes_wild(st.just(1), 10),
    "passes": sometimes_wild(st.lists(pass_entry, max_size=5), 10),
    "target": sometimes_wild(st.sampled_from(sorted(target_names())), 6),
}).map(lambda core, d=d: {**{k: v for k, v in d.items() if k != "targets"}, **core}))


def _load_text(tmp_path_factory, text: str):
    path = tmp_path_factory.mktemp("p") / "pipeline.yaml"
    path.write_text(text)
    return load_pipeline_file(path)


@examples(2.0)
@given(spec=pipeline_file, drop=st.sets(st.sampled_from(list(SCHEMA["properties"]))))
def test_pipeline_files(tmp_path_factory, spec, drop):
    spec = {k: v for k, v in spec.items() if k not in drop}
    loaded = outcome("pipeline file", _load_text, tmp_path_factory, yaml.safe_dump(spec))
    if loaded is not None:  # what loaded builds
        outcome("pipeline file: build", Pipeline.build, loaded["passes"])


edits = st.lists(st.tuples(st.integers(0, 10**4), st.integers(0, 6),
                           st.sampled_from(["", ":", "- ", "{", "}", "[", "]", "&a ", "*a",
                                            "!!python/object:os.system ", "\t", "\n  ", "'",
                                            "? ", "%YAML 1.1\n", "\x00", "é", "<<: *a\n"])),
                 min_size=1, max_size=4)


@examples()
@given(spec=pipeline_file, edits=edits)
def test_pipeline_file_text_edits(tmp_path_factory, spec, edits):
    """A valid-looking file with characters deleted or inserted: YAML errors, tags, aliases."""
    text = yaml.safe_dump(spec)
    for at, cut, insert in edits:
        at %= len(text) + 1
        text = text[:at] + insert + text[at + cut:]
    outcome("pipeline file: text", _load_text, tmp_path_factory, text)


def _one_line(parts) -> str:
    out = []
    for name, options, sep in parts:
        body = None if options is None else ",".join(f"{k}={v}" for k, v in options)
        out.append(name if body is None else f"{name}{{{body}}}")
        out.append(sep)
    return "".join(out)


text_value = st.sampled_from(["1", "-1", "0.5", "true", "[1,2]", "[", "]", "{a: 1}", "'x'",
                              "!!python/name:os.system", "1e999", ".nan", "", "=", "}"]) | names
one_line = st.lists(st.tuples(
    st.sampled_from(PASS_NAMES) | names,
    st.none() | st.lists(st.tuples(st.sampled_from(["skip", "min_seq_len", "sparsity",
                                                    "method", "r", "x"]) | names, text_value),
                         max_size=3),
    st.sampled_from([",", ", ", ",,", " ", "{", ""])), max_size=4)


@examples()
@given(text=one_line.map(_one_line) | st.text(max_size=40))
def test_one_line_text(text):
    outcome("one-line text", Pipeline.build, text)


@examples(2.0)
@given(entry=st.sampled_from(PASS_NAMES).flatmap(
    lambda n: st.tuples(st.just(n), options_for(PASSES.get(n)))))
def test_pass_options(entry):
    """Options become a config or a `ConfigError`; a config round-trips through its dict."""
    name, options = entry
    spec = PASSES.get(name)
    cfg = outcome("pass options", spec.make_config, options)
    if cfg is not None:
        assert spec.make_config(config_to_dict(cfg)) == cfg
