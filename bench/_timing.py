"""Timing helper shared by the engine benchmarks."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

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


T = TypeVar("T")


def alternate_trees(
    here: Path, other: Path | None, samples: int, sample: Callable[[Path], T]
) -> tuple[dict[str, Path], dict[str, list[T]], list[float]]:
    """``sample(tree)`` ``samples`` times for this tree and ``other`` (``--tree``), taking turns (A B A B, so a change
    of load hits both); returns the trees by name, their samples, and the 1-minute load average before each sample.
    """
    trees = {"this tree": here} | ({"other tree": other.resolve()} if other else {})
    runs: dict[str, list[T]] = {name: [] for name in trees}
    loads: list[float] = []
    for _ in range(samples):
        for name, tree in trees.items():
            loads.append(os.getloadavg()[0])
            runs[name].append(sample(tree))
    return trees, runs, loads


def tree_cpu(pid: int) -> float:
    """CPU seconds of a live process tree: each process's own time and that of the children it has reaped."""
    import psutil

    root = psutil.Process(pid)
    total = 0.0
    for proc in [root, *root.children(recursive=True)]:
        try:
            c = proc.cpu_times()
        except psutil.Error:
            continue
        total += c.user + c.system + c.children_user + c.children_system
    return total
