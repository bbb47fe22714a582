"""The timed loops of the benchmarks and the percentiles they report."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np


def timed_calls(fn: Callable[[int], object], iters: int, warmup: int) -> list[float]:
    """Seconds of each of `iters` calls fn(i), after `warmup` untimed ones."""
    for i in range(warmup):
        fn(i)
    out = []
    for i in range(warmup, warmup + iters):
        start = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - start)
    return out


def timed_turns(fns: list[Callable[[int], object]], iters: int, warmup: int) -> list[list[float]]:
    """Seconds of each call of each of `fns` (one list per fn), all called with i before
    any with i + 1, so that whatever else the machine does meanwhile hits them all alike.
    Who goes first rotates with i: none always follows the same one."""
    seconds: list[list[float]] = [[] for _ in fns]
    for i in range(warmup + iters):
        turn = i % len(fns)
        for k in [*range(turn, len(fns)), *range(turn)]:
            start = time.perf_counter()
            fns[k](i)
            if i >= warmup:
                seconds[k].append(time.perf_counter() - start)
    return seconds


def percentile_ms(seconds: list[float], q: float) -> float:
    return float(np.percentile(seconds, q)) * 1e3
