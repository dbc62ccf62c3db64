"""The pass contract: a config dataclass, a numerics contract, and a result that says what changed.

A pass is a function `fn(gm, cfg, ctx) -> PassResult` registered with `@register_pass`. It
mutates the `torch.fx.GraphModule` it is given (`optimize()` copies the user's model once before
the first pass), records one count per rewrite kind and a reason for every match it rejected.
"""

from __future__ import annotations

import dataclasses
import time
import types
import typing
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch.fx

from optim.errors import ConfigError
from optim.ir import prune_unused_constants
from optim.registry import PASSES


@dataclass(frozen=True)
class Exact:
    """The pass must not change outputs beyond floating-point reordering."""

    atol: float = 1e-4

    def describe(self) -> str:
        return f"exact (max abs error <= {self.atol:g})"


@dataclass(frozen=True)
class Lossy:
    """The pass changes numerics; its cost is reported as fidelity measured on data."""

    metric: str = "sqnr_db"
    min_value: float = 20.0  # contract floor on the zoo's random models (tests check it)

    def describe(self) -> str:
        return f"lossy ({self.metric} >= {self.min_value:g} on test models)"


@dataclass
class Skip:
    """A match the pass saw and did not rewrite, with the reason."""

    where: str
    reason: str


@dataclass
class PassResult:
    """What one pass did to the graph."""

    name: str
    changed: bool = False
    counts: dict[str, int] = field(default_factory=dict)
    skipped: list[Skip] = field(default_factory=list)
    seconds: float = 0.0
    # pass-specific data (e.g. per-layer SQNR)
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "changed": self.changed,
            "counts": dict(self.counts),
            "skipped": [dataclasses.asdict(s) for s in self.skipped],
            "seconds": round(self.seconds, 4),
            "details": self.details,
        }


class PassContext:
    """What a pass may look at besides the graph: target, example and calibration inputs, options.

    `record(kind)` counts a rewrite, `skip(where, reason)` records a rejected match; the pass
    manager turns them into the `PassResult`.
    """

    def __init__(self, target: Any = None, example_inputs: tuple = (),
                 calibration: list | None = None, seed: int = 0):
        self.target = target
        self.example_inputs = example_inputs  # (args, kwargs)
        self.calibration = calibration or []  # list of (args, kwargs) batches
        self.seed = seed
        # the captured model's outputs per calibration batch (keyed by id(batch)), recorded
        # before the first pass for pipelines with a pass registered with `teacher=True`
        self.teacher: dict[int, list] = {}
        self._counts: Counter = Counter()
        self._skips: list[Skip] = []
        self.details: dict[str, Any] = {}

    def record(self, kind: str, n: int = 1) -> None:
        if n:  # a zero count adds no key: `counts` lists only what happened
            self._counts[kind] += n

    def skip(self, where: str, reason: str) -> None:
        self._skips.append(Skip(where, reason))

    def _begin(self) -> None:
        self._counts, self._skips, self.details = Counter(), [], {}


@dataclass(frozen=True)
class PassSpec:
    name: str
    fn: Callable[[torch.fx.GraphModule, Any, PassContext], None]
    config: type
    numerics: Exact | Lossy
    requires: tuple[str, ...]
    expects: tuple[str, ...]  # count keys that must be > 0 when the pass runs (zero is an error)
    summary: str
    teacher: bool = False  # reads ctx.teacher: the original model's calibration outputs

    def make_config(self, options: Any = None, where: str = "") -> Any:
        return config_from_dict(self.config, options, where or f"pass {self.name!r}")

    def run(self, gm: torch.fx.GraphModule, cfg: Any, ctx: PassContext) -> PassResult:
        ctx._begin()
        t0 = time.perf_counter()
        self.fn(gm, cfg, ctx)
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
        prune_unused_constants(gm)
        counts = dict(ctx._counts)
        return PassResult(self.name, changed=sum(counts.values()) > 0, counts=counts,
                          skipped=list(ctx._skips), seconds=time.perf_counter() - t0,
                          details=dict(ctx.details))


def register_pass(name: str, *, config: type, numerics: Exact | Lossy,
                  requires: tuple[str, ...] = (), expects: tuple[str, ...] = (),
                  teacher: bool = False):
    """Register `fn(gm, cfg, ctx)` as pass `name`. The docstring's first line is its summary.
    `teacher`: the pass reads `ctx.teacher`, the original model's outputs on calibration."""

    def deco(fn):
        summary = (fn.__doc__ or config.__doc__ or "").strip().splitlines()[0]
        PASSES.add(name, PassSpec(name, fn, config, numerics, tuple(requires), tuple(expects),
                                  summary, teacher))
        return fn

    return deco


# ---- config dataclasses <-> plain dicts (YAML, JSON, CLI) ----

def config_to_dict(cfg: Any) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


MAX_STEPS = 100_000  # any option named *steps (Adam steps of distillation, fitting, QAT)


def config_from_dict(cls: type, options: Any, where: str) -> Any:
    """Build config `cls` from a dict (or an instance), validating names and types."""
    if options is None:
        options = {}
    if isinstance(options, cls):
        return options
    if not isinstance(options, dict):
        raise ConfigError(f"{where}: options must be a mapping, got {type(options).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in options.items():
        if key not in fields:
            import difflib

            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where}: unknown option {key!r}.{hint} "
                              f"Valid options: {', '.join(fields) or '(none)'}")
        kwargs[key] = _coerce(value, hints[key], f"{where}: option {key!r}")
        if key.endswith("steps") and isinstance(kwargs[key], int) \
                and not 0 <= kwargs[key] <= MAX_STEPS:
            raise ConfigError(f"{where}: option {key!r} must be in 0..{MAX_STEPS:,} (training "
                              f"steps), got {kwargs[key]}")
    try:
        cfg = cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None
    validate = getattr(cfg, "validate", None)
    if validate:
        try:
            validate()
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
    return cfg


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where} must be one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        inner = args[0] if args else Any
        return tuple(_coerce(v, inner, where) for v in value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    return value
