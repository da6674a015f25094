"""``cluster up --netns``: every node in a network namespace of its own, so Dask traffic crosses real veth links.

Needs root (CAP_NET_ADMIN) and iproute2's ``ip``; skipped otherwise. The fixture also checks the crash path: a
launcher killed with SIGKILL leaves its namespaces, and the next ``up`` on the same directory removes them.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import mesatee_notebook as mn
from mesatee_notebook.enclave.cluster import local, netns

from .setup_helpers import descendants, expected_groups, node_pids, spawn_launcher, visits, wait_gone, wait_ready

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="--netns needs root (CAP_NET_ADMIN) to create namespaces"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="--netns needs iproute2's `ip`"),
]


def _rx(veth: str) -> int:
    return int(Path(f"/sys/class/net/{veth}/statistics/rx_bytes").read_text())


@pytest.fixture(scope="module")
def netns_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict]]:
    data_dir = tmp_path_factory.mktemp("netns") / "c"
    tag = netns.tag_for(data_dir)
    first = spawn_launcher(data_dir, "--workers", "2", "--netns")
    stale = wait_ready(data_dir, first)
    first.send_signal(signal.SIGKILL)  # a crashed launcher: its namespaces stay behind
    first.wait()
    assert wait_gone(descendants(node_pids(stale))) == set()
    assert len(netns.node_names(tag)) == 4
    launcher = spawn_launcher(data_dir, "--workers", "2", "--netns")
    try:
        state = wait_ready(data_dir, launcher)
        assert "removed what a stopped launcher left" in data_dir.with_suffix(".out").read_text()
        yield data_dir, state
    finally:
        tree = descendants(node_pids(state)) if "state" in locals() else set()
        launcher.send_signal(signal.SIGTERM)
        launcher.wait(timeout=60)
        assert wait_gone(tree) == set()
        assert netns.node_names(tag) == []
        links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
        assert f"mtc{tag}" not in links, "every veth and the bridge are removed at stop"


def test_every_node_has_its_own_namespace_and_address(netns_cluster: tuple[Path, dict]) -> None:
    _, state = netns_cluster
    nodes = [state["scheduler"], *state["workers"], state["head"]]
    assert len({n["netns"] for n in nodes}) == 4 and len({n["host"] for n in nodes}) == 4
    subnet = state["netns"]["subnet"].rsplit(".", 1)[0]
    for n in nodes:
        assert n["host"].startswith(subnet + ".")
        shown = subprocess.run(["ip", "-n", n["netns"], "-o", "-4", "addr"], capture_output=True, text=True).stdout
        assert f"{n['host']}/24" in shown and "127.0.0.1/8" in shown  # eth0 and loopback up


def test_group_by_and_psi_across_namespaces_cross_the_veths(netns_cluster: tuple[Path, dict], tmp_path: Path) -> None:
    data_dir, state = netns_cluster
    running = local.status(data_dir)
    assert running is not None
    veths = state["netns"]["veth"]
    before = {w["name"]: _rx(veths[w["name"]]) for w in state["workers"]}
    df = visits(2000)
    with mn.connect(running.head_url, policy=running.policy(), identity=tmp_path / "owner") as s:
        sdf = s.upload(df, "visits", partitions=2)
        got = sdf.groupby("site").agg(n=("cost", "size"), total=("cost", "sum"), mean=("cost", "mean")).collect()
        psi = s.call(
            "cluster.psi",
            {
                "mode": "cardinality",
                "inputs": {"a": {"dataset": "visits", "column": "cost"}, "b": {"dataset": "visits", "column": "cost"}},
            },
        ).info
    assert got.sort_index().equals(expected_groups(df).sort_index())
    assert psi["cardinality"] == df["cost"].nunique()
    assert {sh["worker"] for sh in psi["shards"]} == {w["address"] for w in state["workers"]}
    time.sleep(0.2)
    # each worker's partition (2000 rows / 2, sealed there) came in over its veth: the counters grew by more
    grown = {name: _rx(veths[name]) - rx for name, rx in before.items()}
    assert all(g > 8_000 for g in grown.values()), grown
