import os
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# a private cache: tests never see a calibration fitted on this machine by a benchmark run
os.environ["OPTIM_CACHE_DIR"] = os.path.join(
    os.environ.get("PYTEST_OPTIM_CACHE", "/tmp"), f"optim-test-cache-{os.getuid()}")
torch.set_num_threads(min(2, os.cpu_count() or 1))
# the speed gate times every pass (seconds each, and noisy at test sizes); the tests that are
# about it turn it on (tests/test_api.py)
os.environ.setdefault("OPTIM_SPEED_GATE", "0")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "fuzz"))
import fuzzing  # noqa: E402  (tests/fuzz: loads the hypothesis profile, OPTIM_FUZZ_PROFILE)

import backends  # noqa: E402,F401  (registers every backend)
import passes  # noqa: E402,F401  (registers every pass)
from optim import zoo  # noqa: E402

SMALL = ["bert", "gpt2", "llama", "vit", "dit"]


@pytest.fixture(scope="session")
def zoo_model():
    cache = {}

    def get(name: str) -> zoo.ZooModel:
        if name not in cache:
            cache[name] = zoo.load(name)
        return cache[name]

    return get


@pytest.fixture
def shipped_pipeline(tmp_path):
    """A shipped pipeline file as written, with some fields made smaller (`inputs.seq`,
    `passes.distill_widths.steps`, `dynamic`, ...), saved to a temporary file: the file's own
    structure runs end to end in seconds instead of minutes."""
    import yaml

    from optim.config import shipped_pipelines

    def shrink(name: str, **changes) -> str:
        spec = yaml.safe_load(shipped_pipelines()[name].read_text())
        for dotted, value in changes.items():
            if "__" not in dotted:  # a top-level key, e.g. dynamic=False
                spec[dotted] = value
                continue
            section, key = dotted.split("__")
            if section == "inputs":
                spec["inputs"][key] = value
                continue
            step = next(p for p in spec["passes"] if isinstance(p, dict) and section in p)
            step[section][key] = value
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(spec))
        return str(path)

    return shrink


def pytest_terminal_summary(terminalreporter):
    """The fuzz tests' outcomes per target, after a run that had any (tests/fuzz/README.md)."""
    counts = fuzzing.write_tally()
    if not counts:
        return
    terminalreporter.section(f"fuzz outcomes (profile {fuzzing.PROFILE})")
    for target, c in counts.items():
        terminalreporter.write_line(f"{target:<28} {sum(c.values()):>7,} cases  "
                                    + ", ".join(f"{k} {v:,}" for k, v in c.items()))
