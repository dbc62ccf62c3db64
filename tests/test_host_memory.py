"""keep_freed_memory: repeated long-sequence attention stops faulting in fresh pages for its
tensors over 32 MB (counted as minor page faults, not timed). Each case runs in a fresh
interpreter: the setting is process-wide and must not leak into the rest of the suite."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc",
                                reason="the setting is glibc's; elsewhere it is a no-op")

# flow attention at 16384 tokens × 12 heads: its output is 50 MB (its features are made a
# segment at a time, `flow_bidirectional_segmented`, so they fault no fresh pages in)
SCRIPT = """
import resource, sys, torch
import passes.linearize_attention.linear_attention as la
from optim.host_memory import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
torch.set_num_threads(1)
q, k, v = torch.randn(3, 1, 12, 16384, 64).unbind(0)
faults = []
with torch.inference_mode():
    for _ in range(6):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        la.attend("flow", q, k, v, None, False, 0.125, {})
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, sum(faults[1:]))
"""


def _faults_after_the_first_call(mode: str) -> tuple[str, int]:
    run = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True,
                         timeout=300, check=True)
    applied, faults = run.stdout.split()
    return applied, int(faults)


def test_repeated_calls_reuse_freed_pages_with_the_setting_and_fault_without():
    applied, kept = _faults_after_the_first_call("keep")
    _, default = _faults_after_the_first_call("default")
    assert applied == "True"
    tensor_pages = 12 * 16384 * 64 * 4 // 4096  # one [1, 12, 16384, 64] float tensor
    assert default > 5 * tensor_pages  # 5 calls, each faulting at least its output in
    assert kept < default / 4
