"""C1 (setup): what ``mesatee-enclave cluster up`` costs: loopback, ``--level tpm``, ``--netns``, ``--bwrap``.

For each mode, in one run: the time until the launcher reports ready (the scheduler, 2 workers registered and the
head serving), a partitioned upload (``upload(..., partitions=2)``) of R rows through the head, the median of 5
partial group-bys, the time ``cluster down`` takes until every process is gone, and the CPU seconds the launcher's
process tree (its nodes, swtpms, the head and its executors) used until just before ``down``. The ``tpm``
row starts one swtpm (a SOFTWARE TPM) per node and every certificate is a TPM quote; it is skipped without swtpm or
tpm2-pytss. ``--netns`` needs root; the row is skipped otherwise.

Prints a table and writes bench/results/c1_cluster_setup.json. Usage: python bench/c1_cluster_setup.py [ROWS [MODES]]
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import mesatee_notebook as mn
from bench._timing import tree_cpu
from mesatee_notebook.enclave.cluster import local


def _frame(rows: int) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    return pd.DataFrame({"k": rng.choice([f"g{i}" for i in range(20)], rows), "x": rng.normal(size=rows)})


def _run(mode: str, rows: int, root: Path) -> dict[str, Any]:
    data_dir = root / mode
    t0 = time.perf_counter()
    level = "tpm" if mode == "tpm" else "softtee"
    cluster = local.up(workers=2, data_dir=data_dir, use_netns=mode == "netns", bwrap=mode == "bwrap", level=level)
    ready = time.perf_counter() - t0
    df = _frame(rows)
    try:
        with mn.connect(cluster.head_url, policy=cluster.policy(), identity=root / "owner") as s:
            t0 = time.perf_counter()
            sdf = s.upload(df, "bench", partitions=2, replace=True)
            upload = time.perf_counter() - t0
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                sdf.groupby("k").agg(n=("x", "size"), m=("x", "mean")).collect()
                times.append(time.perf_counter() - t0)
        cpu = tree_cpu(int(cluster.state["launcher_pid"]))
    finally:
        t0 = time.perf_counter()
        local.down(data_dir)
        stop = time.perf_counter() - t0
        launcher = local._DETACHED.pop(int(cluster.state["launcher_pid"]), None)
        if launcher is not None:
            launcher.wait()
    return {
        "mode": mode,
        "ready_s": ready,
        "upload_s": upload,
        "groupby_s": statistics.median(times),
        "down_s": stop,
        "cpu_s": cpu,
    }


def _tpm_available() -> bool:
    import importlib.util
    import shutil

    return shutil.which("swtpm") is not None and importlib.util.find_spec("tpm2_pytss") is not None


def main() -> None:
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    modes = ["loopback", *(["tpm"] if _tpm_available() else []), "bwrap"] + (["netns"] if os.geteuid() == 0 else [])
    if len(sys.argv) > 2:  # a comma-separated subset, e.g. loopback,tpm
        modes = [m for m in sys.argv[2].split(",") if m in modes]
    with tempfile.TemporaryDirectory(prefix="c1-setup-") as tmp:
        results = [_run(mode, rows, Path(tmp)) for mode in modes]
    print(f"cluster up, 2 workers; upload of {rows} rows in 2 partitions; group-by median of 5")
    print(f"{'mode':<10} {'ready':>8} {'upload':>8} {'group-by':>9} {'down':>7} {'CPU':>7}")
    base = results[0]
    for r in results:
        group_by = f"{r['groupby_s'] * 1e3:7.0f}ms"
        print(
            f"{r['mode']:<10} {r['ready_s']:7.1f}s {r['upload_s']:7.2f}s {group_by} {r['down_s']:6.1f}s "
            f"{r['cpu_s']:6.1f}s  (ready {r['ready_s'] / base['ready_s']:.2f}x, CPU {r['cpu_s'] / base['cpu_s']:.2f}x)"
        )
    print("tpm: one swtpm per node, a SOFTWARE TPM: whoever runs this host holds its keys and can set its PCRs")
    out = Path(__file__).resolve().parent / "results" / "c1_cluster_setup.json"
    out.write_text(json.dumps({"rows": rows, "workers": 2, "results": results}, indent=2))


if __name__ == "__main__":
    main()
