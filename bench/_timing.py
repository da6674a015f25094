"""Timing helper shared by the engine benchmarks."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np


def timeit(fn: Callable[[], Any], repeats: int, min_time: float = 0.05) -> dict[str, float]:
    """Median and spread of per-call seconds; each sample loops for about ``min_time``."""
    fn()
    t0 = time.perf_counter()
    fn()
    inner = max(1, int(min_time / max(time.perf_counter() - t0, 1e-7)))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - t0) / inner)
    a = np.asarray(samples)
    return {"median_s": float(np.median(a)), "p10_s": float(np.percentile(a, 10)), "p90_s": float(np.percentile(a, 90))}
