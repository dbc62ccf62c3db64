"""Fuzz tests: the profile comes from `OPTIM_FUZZ_PROFILE` (`fuzzing.py`); the tally of
outcomes per target is printed after the run."""

import fuzzing
from hypothesis import settings

settings.load_profile(fuzzing.PROFILE)


def pytest_terminal_summary(terminalreporter):
    counts = fuzzing.write_tally()
    if not counts:
        return
    terminalreporter.section(f"fuzz outcomes (profile {fuzzing.PROFILE})")
    for target, c in counts.items():
        terminalreporter.write_line(f"{target:<24} {sum(c.values()):>7,} cases  "
                                    + ", ".join(f"{k} {v:,}" for k, v in c.items()))
