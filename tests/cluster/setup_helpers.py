"""Helpers for the ``mesatee-enclave cluster up`` tests: the launcher process, its nodes' process trees."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


def cluster_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "mesatee_notebook.cli", "enclave", "cluster", *args]


def run_cluster(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cluster_cmd(*args), capture_output=True, text=True, timeout=timeout, check=False)


def spawn_launcher(data_dir: Path, *args: str) -> subprocess.Popen[str]:
    """``cluster up`` in the foreground (as a terminal user runs it), output to ``data_dir.out``."""
    with data_dir.with_suffix(".out").open("w") as out:
        return subprocess.Popen(
            cluster_cmd("up", "--data-dir", str(data_dir), *args), stdout=out, stderr=subprocess.STDOUT, text=True
        )


def wait_ready(data_dir: Path, launcher: subprocess.Popen[str], timeout: float = 240) -> dict[str, Any]:
    state_path = data_dir / "cluster" / "state.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if state_path.exists():
            state = json.loads(state_path.read_text())
            if state.get("ready") and state["launcher_pid"] == launcher.pid:
                return dict(state)
        if launcher.poll() is not None:
            raise RuntimeError(data_dir.with_suffix(".out").read_text())
        time.sleep(0.2)
    launcher.terminate()
    raise RuntimeError(f"the cluster did not start:\n{data_dir.with_suffix('.out').read_text()}")


def node_pids(state: dict[str, Any]) -> list[int]:
    return [int(n["pid"]) for n in (state["scheduler"], state["head"], *state["workers"])]


def descendants(roots: list[int]) -> set[int]:
    """The given pids and every process below them (from /proc: the head's executors and service workers too)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    seen: set[int] = set()
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        todo.extend(children.get(pid, []))
    return seen


def alive(pids: set[int]) -> set[int]:
    out = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            out.add(pid)
    return out


def wait_gone(pids: set[int], timeout: float = 30) -> set[int]:
    deadline = time.monotonic() + timeout
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive(pids)


def processes_naming(path: Path) -> set[int]:
    """Live processes whose command line names ``path`` (a cluster's nodes all name its data directory)."""
    out = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if str(path).encode() in cmdline:
                out.add(int(entry.name))
    return alive(out)


def visits(n: int = 600) -> pd.DataFrame:
    rng = np.random.default_rng(18)
    return pd.DataFrame({"site": rng.choice(["north", "south", "east"], n), "cost": rng.integers(10, 500, n)})


def expected_groups(df: pd.DataFrame) -> pd.DataFrame:
    return df.groupby("site").agg(n=("cost", "size"), total=("cost", "sum"), mean=("cost", "mean"))


__all__ = [
    "alive",
    "cluster_cmd",
    "descendants",
    "expected_groups",
    "node_pids",
    "processes_naming",
    "run_cluster",
    "spawn_launcher",
    "visits",
    "wait_gone",
    "wait_ready",
]
