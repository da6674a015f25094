"""``mesatee-enclave cluster up|down|status`` on loopback: bad input, a tutorial-sized run, clean stops, no orphans."""

from __future__ import annotations

import signal
import socket
import subprocess
from pathlib import Path

import pytest

import mesatee_notebook as mn
from mesatee_notebook.enclave.cluster import local, netns
from mesatee_notebook.errors import ClusterSetupError

from .setup_helpers import (
    descendants,
    expected_groups,
    node_pids,
    processes_naming,
    run_cluster,
    spawn_launcher,
    visits,
    wait_gone,
    wait_ready,
)


@pytest.mark.parametrize("workers", ["0", "-1", "33", "many"])
def test_a_bad_worker_count_is_one_line_and_exit_2(workers: str, tmp_path: Path) -> None:
    run = run_cluster("up", "--workers", workers, "--data-dir", str(tmp_path / "c"))
    assert run.returncode == 2
    assert "workers: give a whole number from 1 to 32" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "c").exists()  # nothing was started or created


def test_a_port_in_use_is_refused_before_anything_starts(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        run = run_cluster("up", "--port", str(port), "--data-dir", str(tmp_path / "c"))
        assert run.returncode == 2 and "Traceback" not in run.stderr
        assert f"--port {port}: 127.0.0.1:{port} is in use" in run.stderr
        run = run_cluster("up", "--head-port", str(port), "--data-dir", str(tmp_path / "c"))
        assert run.returncode == 2 and f"--head-port {port}" in run.stderr
    assert not (tmp_path / "c" / "cluster").exists()


def test_check_spec_refuses_what_would_fail_later(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ClusterSetupError, match="give 1 to 32 workers"):
        local.check_spec(local.ClusterSpec(tmp_path, workers=0))
    with pytest.raises(ClusterSetupError, match="not a TCP port"):
        local.check_spec(local.ClusterSpec(tmp_path, head_port=70000))
    monkeypatch.setattr(netns, "_has_net_admin", lambda: False)
    with pytest.raises(ClusterSetupError, match=r"--netns needs root \(CAP_NET_ADMIN\)"):
        local.check_spec(local.ClusterSpec(tmp_path, use_netns=True))
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "distributed" else real(name))
    with pytest.raises(ClusterSetupError, match=r"needs the cluster extra .*mesatee_notebook\[cluster\]"):
        local.check_spec(local.ClusterSpec(tmp_path))


def test_status_and_down_without_a_cluster(tmp_path: Path) -> None:
    run = run_cluster("status", "--data-dir", str(tmp_path))
    assert run.returncode == 1 and "none running" in run.stdout
    run = run_cluster("down", "--data-dir", str(tmp_path))
    assert run.returncode == 0 and "nothing was running" in run.stdout


@pytest.mark.slow
def test_up_serves_a_partitioned_group_by_and_ctrl_c_stops_every_process(tmp_path: Path) -> None:
    data_dir = tmp_path / "c"
    launcher = spawn_launcher(data_dir, "--workers", "2")
    try:
        state = wait_ready(data_dir, launcher)
        out = data_dir.with_suffix(".out").read_text()
        assert "softtee is SOFTWARE trust" in out and f'mn.connect("{state["head"]["url"]}"' in out
        assert state["scheduler"]["address"].startswith("atls://127.0.0.1:") and len(state["workers"]) == 2
        # a second launcher on the same directory is refused, naming the first
        again = run_cluster("up", "--data-dir", str(data_dir))
        assert again.returncode == 2 and f"already runs from {data_dir}" in again.stderr
        assert f"launcher pid {launcher.pid}" in again.stderr
        running = local.status(data_dir)
        assert running is not None and running.head_url == state["head"]["url"]
        df = visits()
        with mn.connect(running.head_url, policy=running.policy(), identity=tmp_path / "owner") as s:
            sdf = s.upload(df, "visits", partitions=2)
            got = sdf.groupby("site").agg(n=("cost", "size"), total=("cost", "sum"), mean=("cost", "mean")).collect()
            probe = s.call("cluster.probe").info["cluster"]
        assert got.sort_index().equals(expected_groups(df).sort_index())
        assert sorted(str(w["address"]) for w in probe["workers"]) == sorted(w["address"] for w in state["workers"])
        tree = descendants(node_pids(state))
        assert len(tree) > 4  # the head's sandboxed executors and service workers are in the tree
    finally:
        launcher.send_signal(signal.SIGINT)  # Ctrl-C
        code = launcher.wait(timeout=60)
    assert code == 0
    assert wait_gone(tree) == set(), "no node or head child outlives the launcher"
    assert not (data_dir / "cluster" / "state.json").exists()
    assert "mesatee-enclave cluster: stopped" in data_dir.with_suffix(".out").read_text()


@pytest.mark.slow
def test_a_killed_launcher_takes_its_nodes_and_down_reports_clean(tmp_path: Path) -> None:
    data_dir = tmp_path / "c"
    started = local.up(workers=1, data_dir=data_dir)  # detached, as the tutorial starts it
    tree = descendants(node_pids(started.state))
    launcher = int(started.state["launcher_pid"])
    subprocess.run(["kill", "-9", str(launcher)], check=True)
    assert wait_gone(tree) == set(), "PR_SET_PDEATHSIG stops every node when the launcher dies"
    assert local.status(data_dir) is None
    run = run_cluster("down", "--data-dir", str(data_dir))
    assert run.returncode == 0 and "Traceback" not in run.stderr
    assert not (data_dir / "cluster" / "state.json").exists()
    assert local.down(data_dir) == []  # nothing left to stop; reaps the launcher this process started (no warning)
    assert launcher not in local._DETACHED


@pytest.mark.slow
def test_down_while_the_launcher_is_still_starting_stops_it(tmp_path: Path) -> None:
    import json
    import time

    data_dir = tmp_path / "c"
    launcher = spawn_launcher(data_dir, "--workers", "1")
    state_path = data_dir / "cluster" / "state.json"
    deadline = time.monotonic() + 60
    while not state_path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert json.loads(state_path.read_text())["ready"] is False
    assert local.status(data_dir) is None  # not ready: nothing to connect to yet
    run = run_cluster("down", "--data-dir", str(data_dir))
    assert run.returncode == 0 and f"stopped launcher pid {launcher.pid}" in run.stdout
    assert launcher.wait(timeout=60) == 130
    logs = data_dir / "cluster" / "logs"
    started = [p.stem for p in logs.iterdir()] if logs.exists() else []
    assert "head" not in started  # stopped before the head
    assert not state_path.exists()
    assert wait_gone(processes_naming(data_dir)) == set()
