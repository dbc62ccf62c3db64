"""Keep freed host memory in the process, so that large CPU tensors stop paying page faults.

glibc's malloc serves every request above its mmap threshold (raised adaptively up to 32 MB,
never beyond) with fresh pages from the kernel, and unmaps them on free. PyTorch's CPU
allocator does not cache, so each [L, D] tensor over 32 MB (12 heads × 16384 tokens × 64 floats
is 50 MB) costs one page fault per 4 KB page, every time it is made: on this VM writing such a
fresh tensor took 1.4–1.8 ns per element against 0.5 ns for a reused one (2026-12-01), and
the linear attention forms, whose work is linear in L, grew faster than L from 8192 tokens on.

`keep_freed_memory()` tells glibc to serve every allocation from its heap and never to return
the heap's free top to the kernel (`mallopt(M_MMAP_MAX, 0)`, `mallopt(M_TRIM_THRESHOLD, max)`),
so freed pages are reused once the heap has grown to the working set. Measured on this VM
(2026-12-01): flow attention over 16384 tokens faulted about 63k pages per call by default, and
0–12k per call after the first with the setting; bidirectional flow then ran 2× faster at
16384 tokens (`benchmarks/results/HISTORY.md`, linear attention runs 12 and 13). Since then optim's
linear attention makes its large temporaries a segment at a time, and that call faults about
16k pages (its 50 MB output) by default. Smaller tensors pay
too whenever the heap's free top passes glibc's trim threshold and is handed back: a plain
all-MiniLM-L6-v2 forward at batch 8 × 128 (no tensor over 6 MB) ran 1.15× faster eager and
1.08× as optim's graph with the setting (`benchmarks/host_memory.py`, an AMD EPYC,
2026-12-01). Intel's PyTorch CPU
guide gets the same from jemalloc or tcmalloc; this uses the C library every Linux Python
already has. The cost: the process keeps its peak heap until it exits. It is process-wide and
applies from the next allocation on. Not glibc (macOS, musl, Windows): nothing changes and it
returns False.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's adaptive mmap threshold never passes this (64-bit)
M_TRIM_THRESHOLD = -1  # <malloc.h>
M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1


def keep_freed_memory() -> bool:
    """Serve all allocations from the heap and keep it; True where glibc accepted both."""
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success, 0 on error
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, _INT_MAX))
