"""Timing loops shared by the benchmarks (standard library only: it runs in the peer's venv too)."""

import time


def timed(fn, warmup, iters):
    """Seconds per call of ``fn()`` over ``iters`` calls, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times
