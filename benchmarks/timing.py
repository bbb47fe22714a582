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


def timed_pair(first: Callable[[int], object], second: Callable[[int], object], iters: int,
               warmup: int) -> tuple[list[float], list[float]]:
    """Seconds of each of `first` and `second`, called in turn, so that whatever else
    the machine does meanwhile hits both alike."""
    a, b = [], []
    for i in range(warmup + iters):
        start = time.perf_counter()
        first(i)
        middle = time.perf_counter()
        second(i)
        if i >= warmup:
            a.append(middle - start)
            b.append(time.perf_counter() - middle)
    return a, b


def percentile_ms(seconds: list[float], q: float) -> float:
    return float(np.percentile(seconds, q)) * 1e3
