"""The service worker's dataset cache as a timing signal between parties (session 8, docs/sandbox.md red-team table).

One kernel with one service worker (every call lands on it); A owns every dataset, B is an analyst. Each round:
B collects ``x.sum()`` of a dataset nobody has read (``b_cold``); A collects another one, then B collects it
(``b_after_a``: with a cache shared by the parties this is warm for B, which tells B that someone used it); B again
(``b_repeat``, B's own warm frame); A again (``a_repeat``, the owner's own warm frame). Prints wall ms (what B sees)
and the kernel tree's CPU ms (supervisor and worker), medians over the rounds, and writes
bench/results/gaps_dataset_cache.json. Compare two checkouts back to back (the load of a shared machine moves the
wall times): ``PYTHONPATH=CHECKOUT python bench/gaps_dataset_cache.py [MB,MB,...] [ROUNDS]``.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import mesatee_notebook as mn
from bench._timing import tree_cpu
from tests.conftest import start_kernel, stop_kernel


def _rounds(a: Any, b: Any, proc: psutil.Process, mb: int, rounds: int) -> dict[str, list[tuple[float, float]]]:
    def timed(s: Any, name: str) -> tuple[float, float]:
        c0, t0 = tree_cpu(proc.pid), time.perf_counter()
        s.dataframe(name).x.sum().collect()
        return time.perf_counter() - t0, tree_cpu(proc.pid) - c0

    rows: dict[str, list[tuple[float, float]]] = {k: [] for k in ("b_cold", "b_after_a", "b_repeat", "a_repeat")}
    n = mb * (1 << 20) // 8
    for r in range(rounds):
        df = pd.DataFrame({"x": np.arange(n, dtype=np.float64)})
        cold, warm = f"cache_c{mb}_{r}", f"cache_w{mb}_{r}"
        for name in (cold, warm):
            a.upload(df, name, replace=True, policy=mn.DataPolicy(min_group_size=10))
        del df
        rows["b_cold"].append(timed(b, cold))
        timed(a, warm)
        rows["b_after_a"].append(timed(b, warm))
        rows["b_repeat"].append(timed(b, warm))
        rows["a_repeat"].append(timed(a, warm))
        for name in (cold, warm):
            a.call("dataset.delete", {"name": name})
    return rows


def main() -> None:
    sizes = [int(x) for x in (sys.argv[1] if len(sys.argv) > 1 else "100,250").split(",")]
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    tmp = Path(tempfile.mkdtemp(prefix="gaps-cache-"))
    k = start_kernel(tmp / "k", "--service-workers", "1")
    out: dict[str, Any] = {}
    try:
        a = mn.connect(k.url, policy=k.policy(), identity=tmp / "alice")
        b = mn.connect(k.url, policy=k.policy(), identity=tmp / "bob")
        print(f"{'MB':>5} {'case':<10} {'wall ms':>9} {'CPU ms':>8}")
        for mb in sizes:
            rows = _rounds(a, b, psutil.Process(k.proc.pid), mb, rounds)
            out[str(mb)] = {}
            for case, samples in rows.items():
                wall = round(statistics.median(w for w, _ in samples) * 1000)
                cpu = round(statistics.median(c for _, c in samples) * 1000)
                out[str(mb)][case] = {"wall_ms": wall, "cpu_ms": cpu}
                print(f"{mb:>5} {case:<10} {wall:>9} {cpu:>8}", flush=True)
        a.close()
        b.close()
    finally:
        stop_kernel(k)
    dest = Path(__file__).resolve().parent / "results" / "gaps_dataset_cache.json"
    dest.write_text(json.dumps({"rounds": rounds, "figures": out}, indent=2))


if __name__ == "__main__":
    main()
