"""C3: a partitioned upload through the cluster head, this tree against another (``--tree``), A B A B.

Since session 8 the head's supervisor no longer decodes an upload: a sandboxed split worker decodes, checks, splits,
encodes and digests it, and the supervisor only places the opaque bytes (``enclave/cluster/split.py``). Each sample
starts, from one tree, a scheduler, 2 workers and a head kernel (``serve --cluster``), then uploads the same frame
twice with ``partitions=2`` (the first call also starts the split worker in the new code), then runs one plan that
does not decompose (``c0.std()``: gathered, then evaluated; in this tree by a split worker) and measures, per call:

* wall seconds of the call (client side, receipt verified);
* CPU seconds of the head's supervisor process, of its sandboxed children (split or service workers), and of the
  two Dask workers (who check and seal the partitions);
* the supervisor's peak RSS during the call above its RSS before it (``VmHWM``, reset before each call through
  ``/proc/PID/clear_refs``; root only, else the lifetime peak is reported and said so).

Prints a table and writes bench/results/c3_head_upload.json.
Usage: python bench/c3_head_upload.py [MB] [SAMPLES] [--tree OTHER_TREE]   (defaults 200, 2)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import mesatee_notebook as mn  # noqa: E402
from bench._timing import alternate_trees  # noqa: E402

_SERVING = re.compile(r"serving on (atls://\S+)")
COLUMNS = 10


def _frame(mb: int) -> pd.DataFrame:
    rows = (mb << 20) // (8 * COLUMNS)
    rng = np.random.default_rng(11)
    return pd.DataFrame(rng.normal(size=(rows, COLUMNS)), columns=[f"c{i}" for i in range(COLUMNS)])


def _spawn(tree: Path, log: Path, *args: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    with log.open("ab") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "mesatee_notebook.cli", "enclave", *args],
            stdout=fh,
            stderr=fh,
            stdin=subprocess.DEVNULL,
            cwd=tree,
            env=env,
        )


def _wait(what: str, check: Any, log: Path, timeout: float = 180) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not come up:\n{log.read_text(errors='replace')[-3000:]}")


def _cpu(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def _status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) << 10
    return 0


def _reset_peak(pid: int) -> bool:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _measured(head: psutil.Process, workers: list[psutil.Process], call: Any) -> dict[str, Any]:
    """Run ``call()`` once; its wall time, the CPU of the head / its sandboxed children / the workers, peak RSS."""
    children = head.children(recursive=True)
    reset = _reset_peak(head.pid)
    rss0 = _status(head.pid, "VmRSS")
    cpu0 = (_cpu([head]), _cpu(children), _cpu(workers))
    t0 = time.perf_counter()
    call()
    wall = time.perf_counter() - t0
    children = list({p.pid: p for p in [*children, *head.children(recursive=True)]}.values())
    cpu1 = (_cpu([head]), _cpu(children), _cpu(workers))
    return {
        "wall_s": wall,
        "supervisor_cpu_s": cpu1[0] - cpu0[0],
        "sandboxed_cpu_s": cpu1[1] - cpu0[1],
        "dask_workers_cpu_s": cpu1[2] - cpu0[2],
        "supervisor_peak_rss_over_start_mb": (_status(head.pid, "VmHWM") - rss0) / (1 << 20),
        "peak_reset": reset,
    }


def _gathered(s: mn.Session, head: psutil.Process, workers: list[psutil.Process], df: pd.DataFrame) -> dict[str, Any]:
    """A plan that does not decompose (a standard deviation): gathered, then evaluated."""
    from mesatee_notebook.errors import MesateeError

    got: list[Any] = []

    def call() -> None:
        try:
            got.append(float(s.dataframe("big0").c0.std().collect()))
        except MesateeError as exc:  # reported in the table and the JSON, not hidden
            got.append(f"{type(exc).__name__}: {exc}")

    row = _measured(head, workers, call)
    if isinstance(got[0], str):
        print(f"  the gathered plan failed: {got[0]}")
        return {**{k: float("nan") for k in row if k != "peak_reset"}, "peak_reset": row["peak_reset"], "error": got[0]}
    assert abs(got[0] - float(df.c0.std())) < 1e-9
    return row


def _upload(
    s: mn.Session, head: psutil.Process, workers: list[psutil.Process], df: pd.DataFrame, name: str
) -> dict[str, Any]:
    infos: list[Any] = []
    args = {"name": name, "policy": {}, "replace": False, "partitions": 2}
    row = _measured(head, workers, lambda: infos.append(s.call("cluster.upload", args, {"data": df}).info))
    assert sum(int(p["rows"]) for p in infos[0]["partitions"]) == len(df)
    return row


def sample(tree: Path, df: pd.DataFrame) -> list[dict[str, Any]]:
    """One cluster + head from ``tree``, two uploads of ``df``; their figures."""
    base = Path(tempfile.mkdtemp(prefix="c3-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        subprocess.run(
            [sys.executable, "-m", "mesatee_notebook.cli", "enclave", "init-platform", "--data-dir", str(base)],
            check=True,
            capture_output=True,
            cwd=tree,
            env={**os.environ, "PYTHONPATH": str(tree)},
        )
        slog = base / "scheduler.log"
        procs.append(_spawn(tree, slog, "scheduler", "--data-dir", str(base), "--port", "0"))
        m = _wait("scheduler", lambda: _SERVING.search(slog.read_text(errors="replace")), slog)
        url = m.group(1)
        for i in range(2):
            procs.append(_spawn(tree, base / f"w{i}.log", "worker", "--data-dir", str(base), "--scheduler", url))
        _wait("workers", lambda: slog.read_text(errors="replace").count("Register worker") >= 2, slog)
        hdir = base / "head"
        hdir.mkdir()
        shutil.copytree(base / "platform", hdir / "platform")
        hlog = base / "head.log"
        procs.append(_spawn(tree, hlog, "serve", "--port", "0", "--data-dir", str(hdir), "--cluster", url))
        info = _wait(
            "head", lambda: (hdir / "kernel.json").exists() and json.loads((hdir / "kernel.json").read_text()), hlog
        )
        fp = (base / "platform" / "fingerprint").read_text().strip()
        policy = mn.Policy(platform_roots=[fp], measurements=[info["measurement"]], min_level="softtee")
        head = psutil.Process(info["pid"])
        workers = [psutil.Process(p.pid) for p in procs[1:3]]
        with mn.connect(f"mesatee://127.0.0.1:{info['port']}", policy=policy, identity=base / "owner") as s:
            rows = [_upload(s, head, workers, df, f"big{i}") for i in range(2)]
            return [*rows, _gathered(s, head, workers, df)]
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in reversed(procs):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(base, ignore_errors=True)


def _median(xs: list[float]) -> float:
    return float(np.median(xs)) if xs else float("nan")


def main() -> None:
    argv = sys.argv[1:]
    other = None
    if "--tree" in argv:
        i = argv.index("--tree")
        other = Path(argv[i + 1])
        del argv[i : i + 2]
    mb = int(argv[0]) if argv else 200
    samples = int(argv[1]) if len(argv) > 1 else 2
    df = _frame(mb)
    trees, runs, loads = alternate_trees(ROOT, other, samples, lambda tree: sample(tree, df))
    keys = ["wall_s", "supervisor_cpu_s", "sandboxed_cpu_s", "dask_workers_cpu_s", "supervisor_peak_rss_over_start_mb"]
    print(f"C3: a {mb} MB frame uploaded with partitions=2 through the cluster head; medians of {samples} samples")
    print(f"{'tree':<12} {'upload':<6} " + " ".join(f"{k:>22}" for k in keys))
    table: dict[str, Any] = {}
    for name, sams in runs.items():
        for j, label in enumerate(("cold", "warm", "std")):
            row = {k: _median([s[j][k] for s in sams]) for k in keys}
            table[f"{name}/{label}"] = row
            print(f"{name:<12} {label:<6} " + " ".join(f"{row[k]:>22.2f}" for k in keys))
    out = {
        "bench": "c3_head_upload",
        "mb": mb,
        "samples": samples,
        "trees": {k: str(v) for k, v in trees.items()},
        "runs": runs,
        "medians": table,
        "load_1min": loads,
        "peak_reset": all(s[j]["peak_reset"] for sams in runs.values() for s in sams for j in range(3)),
    }
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    (results / "c3_head_upload.json").write_text(json.dumps(out, indent=1))
    print(f"load average (1 min) during the samples: {min(loads):.1f} to {max(loads):.1f}")


if __name__ == "__main__":
    main()
