"""Pipeline files (YAML, schema `optim.pipeline/1`) and the pipelines shipped with optim.

Errors name the file, line and key: `pipelines/x.yaml:7: passes[1]: unknown pass 'quantise'`.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

import passes  # noqa: F401  (registers every pass, so names are checked)
from hardware.spec import target_names
from optim.errors import ConfigError, UnknownNameError
from optim.pass_base import config_from_dict
from optim.pipeline import split_expect
from optim.registry import PASSES
from optim.verify import check_budget_form


def _schema() -> dict:
    return json.loads(resources.files("optim").joinpath("schemas/pipeline.schema.json").read_text())


def shipped_pipelines() -> dict[str, Path]:
    folder = resources.files("optim").joinpath("pipelines")
    return {p.name.rsplit(".", 1)[0]: Path(str(p)) for p in folder.iterdir()
            if p.name.endswith(".yaml")}


def shipped_pipeline_passes(name: str) -> list | None:
    path = shipped_pipelines().get(name)
    return None if path is None else load_pipeline_file(path)["passes"]


def _refuse_duplicate_keys(path: Path, node) -> None:
    """YAML lets a key repeat and keeps the last; in a pipeline file that silently drops a
    setting (a second `target:`), so it is an error naming both lines."""
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, yaml.MappingNode):
            seen: dict = {}
            for key, value in n.value:
                k = getattr(key, "value", None)
                if isinstance(k, str) and k in seen:
                    raise ConfigError(f"{path}:{key.start_mark.line + 1}: key {k!r} appears "
                                      f"twice (first on line {seen[k]}); keep one")
                if isinstance(k, str):
                    seen[k] = key.start_mark.line + 1
                stack += [key, value]
        elif isinstance(n, yaml.SequenceNode):
            stack += n.value


def load_pipeline_file(path: Path) -> dict[str, Any]:
    """Parse and validate a pipeline file; every error names file, line and key."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such pipeline file (shipped pipelines: "
                          f"{', '.join(sorted(shipped_pipelines()))})") from None
    try:
        root = yaml.compose(text)
        _refuse_duplicate_keys(path, root)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{line}: malformed YAML: {getattr(e, 'problem', e)}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a pipeline file") from None
    if isinstance(data, dict) and "target" in data and "targets" in data:
        raise ConfigError(f"{path}:{_line(root, ['targets'])}: give 'target' (one) or "
                          f"'targets' (several), not both")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a pipeline file is a mapping with at least "
                          f"'version: 1' and 'passes: [...]'")
    validator = jsonschema.Draft202012Validator(_schema())
    errors = sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path))
    if errors:
        e = min(errors, key=lambda e: len(e.absolute_path))
        keypath = list(e.absolute_path)
        raise ConfigError(f"{path}:{_line(root, keypath)}: {_fmt(keypath)}: {_message(e)}")
    # names and options are checked against the registry so errors point at the line too
    for i, entry in enumerate(data["passes"]):
        name, options = (entry, None) if isinstance(entry, str) else next(iter(entry.items()))
        where = f"{path}:{_line(root, ['passes', i])}: passes[{i}]"
        try:
            spec = PASSES.get(name)
        except UnknownNameError as err:
            raise ConfigError(f"{where}: {err}") from None
        options, _ = split_expect(options, f"{where} ({name})")
        config_from_dict(spec.config, options, f"{where} ({name})")
    if "fidelity_budget" in data:
        try:
            check_budget_form(data["fidelity_budget"])
        except ConfigError as err:
            raise ConfigError(f"{path}:{_line(root, ['fidelity_budget'])}: {err}") from None
    for key in ("target", "targets"):
        names = data.get(key) if isinstance(data.get(key), list) else [data.get(key)]
        for i, name in enumerate(n for n in names if n is not None):
            if name not in target_names():
                err = UnknownNameError("target", str(name), target_names())
                where = [key, i] if key == "targets" else [key]
                raise ConfigError(f"{path}:{_line(root, where)}: {key}: {err}") from None
    return data


def _message(e: jsonschema.ValidationError) -> str:
    if e.validator == "additionalProperties":
        allowed = sorted(e.schema.get("properties", {}))
        return f"{e.message}; allowed keys: {', '.join(allowed)}"
    if e.validator == "required":
        return e.message
    return e.message


def _fmt(keypath: list) -> str:
    out = ""
    for k in keypath:
        out += f"[{k}]" if isinstance(k, int) else (f".{k}" if out else str(k))
    return out or "(top level)"


def _line(node: Any, keypath: list) -> int:
    """1-based line of the YAML node at `keypath` (the deepest one that exists)."""
    line = node.start_mark.line + 1 if node is not None else 1
    for k in keypath:
        if isinstance(node, yaml.MappingNode):
            nxt = next(((kn, vn) for kn, vn in node.value if kn.value == k), None)
            if nxt is None:
                break
            line, node = nxt[0].start_mark.line + 1, nxt[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(k, int) and k < len(node.value):
            node = node.value[k]
            line = node.start_mark.line + 1
        else:
            break
    return line
