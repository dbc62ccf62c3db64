"""Errors optim raises. Each names the problem and the fix; none leaves the user's model changed."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class OptimError(Exception):
    """Base class: everything optim raises on bad input or a failed step."""


class UnknownNameError(OptimError, KeyError):
    """A pass, target, backend, pipeline or zoo name that is not registered."""

    def __init__(self, kind: str, name: str, valid: Iterable[str]):
        self.kind, self.name, self.valid = kind, name, sorted(valid)
        lowered = {v.lower(): v for v in self.valid}
        close = [lowered[c] for c in difflib.get_close_matches(str(name).lower(), lowered, n=1,
                                                                cutoff=0.5)]
        hint = f" Did you mean {close[0]!r}?" if close else ""
        kinds = kind + ("es" if kind.endswith("s") else "s")  # passes, targets
        super().__init__(f"unknown {kind} {name!r}.{hint} Valid {kinds}: "
                         f"{', '.join(self.valid) or '(none registered)'}")

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class ConfigError(OptimError, ValueError):
    """A pass option, pipeline key or YAML value that is wrong; says where and what is allowed."""


class CaptureError(OptimError):
    """The model could not be traced to a graph."""


MAX_CAUSE = 600  # characters of a failed pass's own error kept in the message


class PassError(OptimError):
    """A pass failed mid-pipeline. Names the pass and the passes that ran before it."""

    def __init__(self, name: str, before: list[str], cause: BaseException):
        self.pass_name, self.before, self.cause = name, before, cause
        ran = ", ".join(before) if before else "none"
        said = str(cause)
        if len(said) > MAX_CAUSE:  # torch.fx appends the whole graph to some errors
            said = f"{said[:MAX_CAUSE]}... ({len(said) - MAX_CAUSE:,} more characters)"
        super().__init__(
            f"pass {name!r} failed: {type(cause).__name__}: {said}\n"
            f"  passes that ran before it: {ran}\n"
            f"  the original model is untouched; drop or reconfigure {name!r} to continue"
        )


class StaticShapeError(PassError):
    """A pass left a graph that no longer runs at other sizes of a dynamic axis (it baked the
    traced size in). The driver captures again with that axis static, unless the user asked
    for it to be dynamic."""

    def __init__(self, name: str, before: list[str], axis: str, detail: str):
        self.axis, self.detail = axis, detail
        super().__init__(name, before, RuntimeError(
            f"after it the graph no longer runs at another {axis} ({detail}); it needs a "
            f"static {axis}: optimize with dynamic={{{axis!r}: None}}, or drop the pass"))


class NumericsError(OptimError):
    """A pass broke its numerics contract or the pipeline's fidelity budget."""


class BackendError(OptimError):
    """Lowering to or running on a backend failed."""


class SlowerWarning(UserWarning):
    """The optimized model measured slower than the original on this machine."""
