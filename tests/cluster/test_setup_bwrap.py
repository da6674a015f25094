"""``cluster up --bwrap``: the scheduler and workers in bubblewrap (mount, PID, IPC, UTS namespaces), still serving."""

from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

import pytest

import mesatee_notebook as mn
from mesatee_notebook.enclave.cluster import local

from .setup_helpers import descendants, expected_groups, node_pids, spawn_launcher, visits, wait_gone, wait_ready

pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap")]


def _node_inside(bwrap_pid: int) -> int:
    """The mesatee-enclave process bubblewrap runs (below bwrap and its pid-1 helper)."""
    for pid in sorted(descendants([bwrap_pid]) - {bwrap_pid}):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        if b"mesatee_notebook.cli" in cmdline and not cmdline.startswith(b"/usr/bin/bwrap"):
            return pid
    raise AssertionError(f"no node process below bwrap {bwrap_pid}")


def _unconfined_worker_is_refused(data_dir: Path, scheduler: str) -> None:
    """A worker on the cluster's own platform and code, but not in bubblewrap: the scheduler refuses it."""
    import asyncio

    from distributed.comm import connect

    from mesatee_notebook.enclave.cluster.comm import AttestedSecurity
    from mesatee_notebook.enclave.cluster.node_identity import ClusterNode, NodeIdentity, cluster_policy
    from mesatee_notebook.enclave.platform import load_platform

    ident = NodeIdentity.create("worker", load_platform(data_dir).key)
    node = ClusterNode(ident, cluster_policy((ident.platform_fingerprint,)))

    async def go() -> None:
        comm = await connect(scheduler, timeout=5, **AttestedSecurity(node).get_connection_args("client"))
        try:
            await comm.write({"op": "identity"})
            await comm.read()
        finally:
            await comm.close()

    with pytest.raises(OSError):
        asyncio.run(go())
    log = data_dir / "cluster" / "logs" / "sched.log"
    deadline = time.monotonic() + 30
    while "SandboxRequired" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "SandboxRequired: the cluster worker is not confined" in log.read_text()


def test_bwrapped_nodes_see_only_the_platform_and_a_private_tmp(tmp_path: Path) -> None:
    data_dir = tmp_path / "c"
    (tmp_path / "host-secret").write_text("the host's /tmp")
    launcher = spawn_launcher(data_dir, "--workers", "2", "--bwrap")
    try:
        state = wait_ready(data_dir, launcher)
        assert "[bubblewrap]" in data_dir.with_suffix(".out").read_text()
        for record in (state["scheduler"], *state["workers"]):
            assert record["bwrap"] is True
            node = _node_inside(int(record["pid"]))
            root = Path(f"/proc/{node}/root")
            assert (root / str(data_dir / "platform" / "fingerprint").lstrip("/")).exists()
            assert not (root / str(data_dir / "head").lstrip("/")).exists(), "the head's store is not visible"
            assert not (root / str(tmp_path / "host-secret").lstrip("/")).exists(), "the host's /tmp is not visible"
            nspid = next(x for x in Path(f"/proc/{node}/status").read_text().splitlines() if x.startswith("NSpid"))
            assert len(nspid.split()) == 3, f"a PID namespace of its own: {nspid}"
        assert state["head"]["bwrap"] is False  # the head runs its own sandboxes for cells
        running = local.status(data_dir)
        assert running is not None
        df = visits()
        with mn.connect(running.head_url, policy=running.policy(), identity=tmp_path / "owner") as s:
            status = s.call("cluster.status").info["cluster"]
            sdf = s.upload(df, "visits", partitions=2)
            got = sdf.groupby("site").agg(n=("cost", "size"), total=("cost", "sum"), mean=("cost", "mean")).collect()
        assert got.sort_index().equals(expected_groups(df).sort_index())
        # Every node requires the profile of schedulers and workers; the head verified each one's statement.
        assert {r["confinement"] for r in (status["scheduler"], *status["workers"])} == {"bwrap"}
        _unconfined_worker_is_refused(data_dir, state["scheduler"]["address"])
        tree = descendants(node_pids(state))
    finally:
        launcher.send_signal(signal.SIGINT)
        code = launcher.wait(timeout=60)
    assert code == 0 and wait_gone(tree) == set()
    worker_log = Path(state["workers"][0]["log"]).read_text()
    assert "Stopping worker" in worker_log, "SIGTERM reached the node inside bwrap: it stopped cleanly"
