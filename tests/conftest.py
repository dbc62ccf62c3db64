import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# a private cache: tests never see a calibration fitted on this machine by a benchmark run
os.environ["OPTIM_CACHE_DIR"] = os.path.join(
    os.environ.get("PYTEST_OPTIM_CACHE", "/tmp"), f"optim-test-cache-{os.getuid()}")
torch.set_num_threads(min(2, os.cpu_count() or 1))

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
