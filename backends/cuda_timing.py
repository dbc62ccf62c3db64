"""Timing on a CUDA GPU with CUDA events, and CUDA graphs (one launch replays a recorded call)."""

from __future__ import annotations

import torch


def cuda_times(fn, reps: int = 10, warmup: int = 3, graphed: bool = False) -> list[float]:
    """Sorted milliseconds of `reps` calls of `fn` (or replays of its CUDA graph), each timed by
    CUDA events after `warmup` calls."""
    if graphed:
        fn = cuda_graph(fn)[0].replay
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return sorted(ts)


def cuda_graph(fn):
    """(graph, outputs): `fn` warmed up on a side stream, then recorded as a CUDA graph whose
    replay recomputes `outputs` in place."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out
