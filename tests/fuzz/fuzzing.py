"""What every fuzz test shares: the two settings profiles, the outcome check and its tally, and
strategies for wild values.

The property is the same everywhere: a generated case ends in a result or in a project error
(`OptimError` and its subclasses) that has a message; any other exception type, a pass that
crashed inside (a `PassError` caused by something that is not an `OptimError`) or a case that
runs past `CASE_SECONDS` fails the test with the case hypothesis shrank it to.

Profiles (`OPTIM_FUZZ_PROFILE`):
  suite  the default test suite: few cases per test, derandomized (the same cases every run)
  fuzz   the dedicated run (`tests/fuzz/README.md`): `OPTIM_FUZZ_EXAMPLES` cases per test
         (default 2,000), random seeds; the tally is printed at the end and written to
         `OPTIM_FUZZ_COUNTS` (a JSON file) when set.
"""

from __future__ import annotations

import json
import math
import os
import signal
from collections import Counter, defaultdict
from contextlib import contextmanager

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from optim.errors import OptimError, PassError

PROFILE = os.environ.get("OPTIM_FUZZ_PROFILE", "suite")
SUITE_EXAMPLES = {"suite": 30}  # per test in the default suite
CASE_SECONDS = 120  # one case running longer than this is a hang

_common = dict(deadline=None, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.filter_too_much])
settings.register_profile("suite", max_examples=SUITE_EXAMPLES["suite"], derandomize=True,
                          **_common)
settings.register_profile("fuzz", max_examples=int(os.environ.get("OPTIM_FUZZ_EXAMPLES", 2000)),
                          **_common)
settings.load_profile(PROFILE)


def examples(scale: float = 1.0) -> settings:
    """Settings for one test: the profile's case count times `scale` (an expensive target
    runs fewer cases)."""
    base = settings.get_profile(PROFILE)
    return settings(base, max_examples=max(5, int(base.max_examples * scale)))


TALLY: dict[str, Counter] = defaultdict(Counter)


@contextmanager
def _time_limit(seconds: int):
    def hang(signum, frame):
        raise TimeoutError(f"one fuzz case ran longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def outcome(target: str, fn, *args, **kwargs):
    """Run one case: its result, or None after a project error (tallied under `target`);
    anything else propagates and fails the test."""
    with _time_limit(CASE_SECONDS):
        try:
            result = fn(*args, **kwargs)
        except PassError as e:
            if not isinstance(e.cause, OptimError):
                raise AssertionError(f"a pass crashed inside instead of refusing its input: "
                                     f"{e}") from e
            TALLY[target][type(e).__name__] += 1
            return None
        except OptimError as e:
            assert str(e).strip(), f"{type(e).__name__} without a message"
            TALLY[target][type(e).__name__] += 1
            return None
    TALLY[target]["ok"] += 1
    return result


def write_tally() -> dict:
    counts = {target: dict(sorted(c.items())) for target, c in sorted(TALLY.items())}
    path = os.environ.get("OPTIM_FUZZ_COUNTS")
    if path and counts:
        with open(path, "w") as f:
            json.dump({"profile": PROFILE, "targets": counts,
                       "cases": sum(sum(c.values()) for c in counts.values())}, f, indent=2)
    return counts


# ---- strategies ----

names = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12)
scalars = (st.none() | st.booleans() | st.integers(-2**63, 2**64) | st.floats()
           | st.sampled_from([0, 1, -1, 2**31, math.nan, math.inf, -math.inf, "", "1", "x"])
           | names)
wild = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(names, inner, max_size=4), max_leaves=10)


def sometimes_wild(strategy, one_in: int = 5):
    """`strategy`, replaced by a wild value in about one case in `one_in` (the last choice:
    hypothesis favours small integers, and shrinks towards them, so towards `strategy`)."""
    return st.integers(0, one_in - 1).flatmap(lambda i: wild if i == one_in - 1 else strategy)
