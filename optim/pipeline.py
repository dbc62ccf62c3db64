"""A pipeline: an ordered list of (pass name, config), checked before anything runs.

Built from a Python list (`["fuse_attention", ("quantize", {"skip": ["lm_head"]})]`), a one-line
text form (`fuse_attention,quantize{per_token=true}`), or the `passes:` list of a YAML pipeline.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import yaml

from optim.errors import ConfigError, PassError
from optim.pass_base import Exact, PassContext, PassResult, PassSpec, config_to_dict
from optim.registry import PASSES


@dataclass
class Step:
    spec: PassSpec
    config: Any
    inserted_for: str | None = None  # set when the pipeline added this step as a prerequisite
    expect: bool = False  # a pass that matches nothing is an error (else recorded, and skipped)

    @property
    def name(self) -> str:
        return self.spec.name

    def to_dict(self) -> dict[str, Any]:
        return {self.name: {**config_to_dict(self.config),
                            **({"expect": True} if self.expect else {})}}


class Pipeline:
    def __init__(self, steps: list[Step], insert_prerequisites: bool = True):
        self.steps = _with_prerequisites(steps) if insert_prerequisites else steps
        self._check_requires()

    @property
    def inserted(self) -> list[Step]:
        """Steps the pipeline added because a later pass requires them."""
        return [s for s in self.steps if s.inserted_for]

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.steps]

    @classmethod
    def build(cls, entries: Any, overrides: dict[str, dict] | None = None,
              where: str = "pipeline", insert_prerequisites: bool = True) -> Pipeline:
        """Build from a list of names / {name: options} / (name, options) / Step entries.
        A pass's exact prerequisites that the list lacks are inserted before it (with their
        default options; `Step.inserted_for` says why); a lossy one is never inserted."""
        if isinstance(entries, str):
            entries = parse_text(entries)
        if not isinstance(entries, (list, tuple)):
            raise ConfigError(f"{where}: expected a list of passes, got {type(entries).__name__}")
        overrides = dict(overrides or {})
        steps = []
        for i, entry in enumerate(entries):
            name, options = _split_entry(entry, f"{where}[{i}]")
            spec = PASSES.get(name)
            if name in overrides:
                options = {**(options or {}), **overrides.pop(name)}
            options, expect = split_expect(options, f"{where}[{i}] pass {name!r}")
            steps.append(Step(spec, spec.make_config(options, f"{where}[{i}] pass {name!r}"),
                              expect=expect))
        for name in overrides:
            PASSES.get(name)  # unknown name -> did-you-mean
            raise ConfigError(f"options were given for pass {name!r}, which is not in the "
                              f"pipeline ({', '.join(s.name for s in steps) or 'empty'})")
        return cls(steps, insert_prerequisites)

    def _check_requires(self) -> None:
        seen: set[str] = set()
        for s in self.steps:
            missing = [r for r in s.spec.requires if r not in seen]
            if missing:
                lossy = [r for r in missing if not isinstance(PASSES.get(r).numerics, Exact)]
                why = (f"{lossy} change numerics, so they are not added for you" if lossy else
                       "prerequisites are not inserted in this pipeline")
                raise ConfigError(f"pass {s.name!r} requires {missing} to run before it, and "
                                  f"{why}; add them earlier in the pipeline")
            seen.add(s.name)

    def run(self, gm, ctx: PassContext, after_each=None, before_each=None
            ) -> list[PassResult]:
        """Run every step in order. `after_each(step, result)` may check numerics;
        `before_each(step)` runs first."""
        results: list[PassResult] = []
        for step in self.steps:
            try:
                if before_each is not None:
                    before_each(step)
                result = step.spec.run(gm, step.config, ctx)
                missing = [k for k in step.spec.expects if result.counts.get(k, 0) == 0]
                if missing:
                    why = "; ".join(f"{s.where}: {s.reason}" for s in result.skipped[:5])
                    if step.expect:
                        raise ConfigError(f"expected {missing} > 0 but the pass matched "
                                          f"nothing" + (f" (skipped: {why})" if why else ""))
                    result.details["matched_nothing"] = {
                        "expected": missing, "reasons": why or "no candidate in the graph"}
                if after_each is not None:
                    after_each(step, result)
            except PassError:
                raise
            except Exception as e:
                raise PassError(step.name, [r.name for r in results], e) from e
            results.append(result)
        return results

    def to_list(self) -> list[dict[str, Any]]:
        return [s.to_dict() for s in self.steps]


def _with_prerequisites(steps: list[Step], out: list[Step] | None = None) -> list[Step]:
    """`steps` with every missing exact prerequisite inserted before the first step needing it
    (prerequisites of prerequisites too, each once)."""
    out = [] if out is None else out
    for step in steps:
        for req in step.spec.requires:
            spec = PASSES.get(req)
            if req not in [s.name for s in out] and isinstance(spec.numerics, Exact):
                _with_prerequisites([Step(spec, spec.make_config(None), step.name)], out)
        out.append(step)
    return out


def split_expect(options: Any, where: str) -> tuple[Any, bool]:
    """(options without `expect`, expect): `expect: true` next to a pass's options makes its
    matching nothing an error instead of a note in the report."""
    if not isinstance(options, dict) or "expect" not in options:
        return options, False
    options = dict(options)
    expect = options.pop("expect")
    if not isinstance(expect, bool):
        raise ConfigError(f"{where}: option 'expect' must be true or false, got {expect!r}")
    return options, expect


def _split_entry(entry: Any, where: str) -> tuple[str, dict | None]:
    if isinstance(entry, str):
        return entry, None
    if isinstance(entry, Step):
        return entry.name, entry.config
    if isinstance(entry, tuple) and len(entry) == 2:
        return entry[0], entry[1]
    if isinstance(entry, dict) and len(entry) == 1:
        (name, options), = entry.items()
        return name, options
    raise ConfigError(f"{where}: a pass is a name or {{name: {{options}}}}, got {entry!r}")


_TEXT = re.compile(r"\s*([A-Za-z_][\w]*)\s*(\{[^}]*\})?\s*(?:,|$)")


def parse_text(text: str) -> list:
    """`a,b{x=1,y=[1,2]}` -> ["a", {"b": {"x": 1, "y": [1, 2]}}] (values parsed as YAML)."""
    out, pos = [], 0
    text = text.strip()
    while pos < len(text):
        m = _TEXT.match(text, pos)
        if not m or m.end() == pos:
            raise ConfigError(f"cannot parse pipeline text at column {pos + 1}: {text[pos:]!r}; "
                              "expected name or name{key=value,...}")
        name, body = m.group(1), m.group(2)
        if body:
            options = {}
            for item in _split_top(body[1:-1]):
                if "=" not in item:
                    raise ConfigError(f"pass {name!r}: option {item!r} must be key=value")
                k, v = item.split("=", 1)
                try:
                    options[k.strip()] = yaml.safe_load(v.strip())
                except yaml.YAMLError as e:
                    raise ConfigError(f"pass {name!r}: option {k.strip()!r}: cannot read the "
                                      f"value {v.strip()!r} ({getattr(e, 'problem', e)}); "
                                      f"quote it or write it as YAML") from None
            out.append({name: options})
        else:
            out.append(name)
        pos = m.end()
    return out


def _split_top(s: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in s:
        depth += ch in "[("
        depth -= ch in "])"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur)
    return [p.strip() for p in parts if p.strip()]
