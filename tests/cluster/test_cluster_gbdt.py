"""gbdt.train on partitions with xgboost's federated collective, on a real attested cluster (scheduler + workers).

Two extra workers (g0, g1, loopback) join the session's scheduler (whose workers are w0, w1) for this module, plus one
worker listening on a non-loopback address of this host when there is one. The engine is driven through an in-process
ClusterHead, then end to end through a head kernel. The kill -9 test runs last and only on this module's workers.
Workers in network namespaces of their own: test_fed_netns.py; the pins: test_fed_pins.py.
"""

from __future__ import annotations

import shutil
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

import mesatee_notebook as mn
from mesatee_notebook.attestation.measurement import canonical_json
from mesatee_notebook.enclave.cluster.node_identity import cluster_measurement
from mesatee_notebook.errors import RemoteExecutionError
from mesatee_notebook.ml import gbdt
from mesatee_notebook.wire.digest import payload_digest
from tests.conftest import KernelProc, start_kernel, stop_kernel

from .conftest import Cluster, NodeProc, spawn_node, stop_node, wait_for, wait_serving
from .test_attested_comms import _node

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # the first test pays for starting 3 workers


def _outside_address() -> str | None:
    """A non-loopback IPv4 address of this host (the route a packet to a documentation address would take)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.123", 9))
            addr = str(s.getsockname()[0])
        except OSError:
            return None
    return None if addr.startswith("127.") else addr


@dataclass
class GbdtNodes:
    head: Any
    workers: list[NodeProc]
    outside: NodeProc | None


@pytest.fixture(scope="module")
def nodes(cluster: Cluster) -> Iterator[GbdtNodes]:
    from mesatee_notebook.enclave.cluster.head import ClusterHead

    outside_ip = _outside_address()
    spawned = [spawn_node("worker", cluster.data_dir, "--scheduler", cluster.url, "--name", f"g{i}") for i in range(2)]
    if outside_ip is not None:
        spawned.append(
            spawn_node("worker", cluster.data_dir, "--scheduler", cluster.url, "--name", "gx", "--host", outside_ip)
        )
    head = None
    try:
        for n in spawned:
            wait_serving(n)
        head = ClusterHead(cluster.url, _node(cluster))
        want = {n.address for n in spawned}
        wait_for(lambda: want <= set(head._workers()), timeout=60, what="the gbdt workers registered")
        yield GbdtNodes(head, spawned[:2], spawned[2] if outside_ip is not None else None)
    finally:
        if head is not None:
            head.close()
        for n in spawned:
            stop_node(n)


def _frame(n: int, *, continuous: bool, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=n)
    b = rng.integers(0, 40, n).astype(np.float64)
    c = rng.normal(size=n)
    if not continuous:  # at most max_bin (256) distinct values per feature: the quantile cuts are exact
        a, c = a.round(1), c.round(1)
    y = ((a + 0.08 * b - 0.5 * c + rng.normal(size=n)) > 1.5).astype(np.float64)
    return pd.DataFrame({"a": a, "b": b, "c": c, "y": y})


def _scatter(head: Any, df: pd.DataFrame, workers: list[str]) -> list[Any]:
    """One partition per worker (contiguous row ranges), each held only by that worker."""
    bounds = np.linspace(0, len(df), len(workers) + 1).astype(int)
    return [
        head.client.scatter(df.iloc[lo:hi].reset_index(drop=True), workers=[w], hash=False)
        for lo, hi, w in zip(bounds[:-1], bounds[1:], workers, strict=True)
    ]


PARAMS = {"objective": "binary:logistic", "max_depth": 4, "eta": 0.3}


def test_three_partitions_match_single_node(cluster: Cluster, nodes: GbdtNodes) -> None:
    from mesatee_notebook.enclave.cluster.gbdt import train_on_partitions

    three = [*cluster.workers, nodes.workers[0]]
    addresses = [w.address for w in three]
    # Exact cuts (<= max_bin distinct values a feature): xgboost's distributed hist builds the same histograms
    # (sums of the same gradients, added in another order) and so the same trees as one process: the same splits,
    # and leaf values equal up to float rounding.
    df = _frame(3000, continuous=False)
    parts = _scatter(nodes.head, df, addresses)
    trained = train_on_partitions(nodes.head, parts, "y", params=PARAMS, num_boost_round=20)
    single = gbdt.train(df, "y", params=PARAMS, num_boost_round=20)
    X = df.drop(columns=["y"])
    t_cluster, t_single = trained.model.booster.trees_to_dataframe(), single.booster.trees_to_dataframe()
    structure = ["Tree", "Node", "Feature", "Split", "Yes", "No", "Missing"]
    pd.testing.assert_frame_equal(t_cluster[structure], t_single[structure])
    np.testing.assert_allclose(t_cluster["Gain"], t_single["Gain"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(trained.model.predict(X), single.predict(X), rtol=0, atol=1e-6)
    assert trained.rows == 3000 and trained.partitions == 3
    by_address = {w["address"]: w for w in trained.workers}
    assert set(by_address) == set(addresses)
    for w in three:
        record = by_address[w.address]
        assert record["measurement"] == cluster_measurement()  # verified by the head on its own connection
        assert record["pid"] == w.proc.pid and record["rows"] == 1000
    assert "federated" in trained.collective["engine"]
    assert [s.rsplit(":", 1)[0] for s in trained.collective["server"]] == ["127.0.0.1"]
    assert len(trained.collective["client_certs_sha256"]) == 3

    # Continuous features: each worker sketches its own rows and xgboost merges the sketches, so the cuts (and the
    # trees) differ slightly from one process's; the fit is as good.
    df = _frame(6000, continuous=True, seed=1)
    parts = _scatter(nodes.head, df, addresses)
    trained = train_on_partitions(nodes.head, parts, "y", params=PARAMS, num_boost_round=30)
    single = gbdt.train(df, "y", params=PARAMS, num_boost_round=30)
    m_cluster, m_single = trained.model.evaluate(df), single.evaluate(df)
    assert abs(m_cluster["auc"] - m_single["auc"]) < 0.01, (m_cluster, m_single)
    assert abs(m_cluster["logloss"] - m_single["logloss"]) < 0.02, (m_cluster, m_single)


def test_a_worker_off_loopback_joins_over_the_pinned_channel(nodes: GbdtNodes) -> None:
    from mesatee_notebook.enclave.cluster.gbdt import train_on_partitions

    if nodes.outside is None:
        pytest.skip("this host has no non-loopback IPv4 address for a worker to listen on")
    df = _frame(400, continuous=False)
    parts = _scatter(nodes.head, df, [nodes.workers[0].address, nodes.outside.address])
    trained = train_on_partitions(nodes.head, parts, "y", params=PARAMS, num_boost_round=5)
    single = gbdt.train(df, "y", params=PARAMS, num_boost_round=5)
    X = df.drop(columns=["y"])
    np.testing.assert_allclose(trained.model.predict(X), single.predict(X), rtol=0, atol=1e-6)
    # The head dials each worker from the address the routing table picks, and the server's certificate names both.
    hosts = sorted(s.rsplit(":", 1)[0] for s in trained.collective["server"])
    outside_host = nodes.outside.address.split("://")[1].rsplit(":", 1)[0]
    assert hosts == sorted({"127.0.0.1", outside_host})


@pytest.fixture(scope="module")
def kernel_head(cluster: Cluster, nodes: GbdtNodes, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KernelProc]:
    data_dir = tmp_path_factory.mktemp("ghead")
    shutil.copytree(cluster.data_dir / "platform", data_dir / "platform")  # one platform for the cluster
    k = start_kernel(data_dir, "--cluster", cluster.url)
    yield k
    stop_kernel(k)


def test_train_through_the_head_names_the_workers_and_keeps_the_release_policy(
    cluster: Cluster, nodes: GbdtNodes, kernel_head: KernelProc, tmp_path: Path
) -> None:
    df = _frame(3000, continuous=False)
    X = df.drop(columns=["y"])
    url, policy = kernel_head.url, kernel_head.policy()
    with (
        mn.connect(url, policy=policy, identity=tmp_path / "owner") as owner,
        mn.connect(url, policy=policy, identity=tmp_path / "trainer") as trainer,
    ):
        owner.upload(df, "gparts", partitions=3, policy=mn.DataPolicy(code_access=(trainer.party_id,)))
        args = {"data": {"dataset": "gparts"}, "label": "y", "params": PARAMS, "num_boost_round": 20}
        res = trainer.call("gbdt.train", args)
        info = res.info
        # The receipt (checked by connect's policy) covers the info naming the workers with their measurements.
        assert res.verified.predicate["service"] == "gbdt.train"
        assert res.verified.subjects["info"] == payload_digest(canonical_json(info))
        workers = info["cluster"]["workers"]
        pids = {n.proc.pid for n in [*cluster.workers, *nodes.workers]}
        assert len(workers) == 3 and sum(w["rows"] for w in workers) == 3000
        for w in workers:
            assert w["measurement"] == cluster_measurement() and w["pid"] in pids
        assert "federated" in info["cluster"]["collective"]["engine"]
        model = trainer.gbdt.model(info["model"]["id"])
        single = gbdt.train(df, "y", params=PARAMS, num_boost_round=20)
        np.testing.assert_allclose(model.predict(X, engine="xgboost"), single.predict(X), rtol=0, atol=1e-6)
        # Trained on the owner's data: it stays in the enclave until the owner releases it, as on one node.
        with pytest.raises(mn.PolicyViolation, match="not released"):
            model.export()
        owner.gbdt.release(model.id)
        exported = gbdt.load_model(model.export())
        np.testing.assert_allclose(exported.predict(X), single.predict(X), rtol=0, atol=1e-6)
        with mn.connect(url, policy=policy, identity=tmp_path / "stranger") as stranger:
            with pytest.raises(mn.PolicyViolation, match="code_access"):
                stranger.call("gbdt.train", args)


def test_kill_9_of_a_worker_mid_training_is_a_typed_error(nodes: GbdtNodes) -> None:
    from mesatee_notebook.enclave.cluster.gbdt import train_on_partitions

    addresses = [w.address for w in nodes.workers]  # g0, g1: not the session's workers
    parts = _scatter(nodes.head, _frame(60_000, continuous=True, seed=2), addresses)
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["model"] = train_on_partitions(
                nodes.head, parts, "y", params={**PARAMS, "max_depth": 8}, num_boost_round=5000
            )
        except Exception as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def training() -> bool:
        busy = nodes.head.client.processing(workers=addresses)
        return all(any(str(k).startswith("gbdt-train") for k in busy.get(a, ())) for a in addresses)

    wait_for(training, timeout=120, what="the training tasks running on both workers")
    time.sleep(1.0)
    victim = nodes.workers[1]
    victim.proc.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    thread.join(timeout=120)
    assert not thread.is_alive(), "the head did not give up after a worker was killed"
    assert time.monotonic() - killed < 60
    assert "model" not in outcome  # nothing half-trained comes back
    err = outcome["error"]
    assert isinstance(err, RemoteExecutionError), repr(err)
    assert "nothing was kept" in str(err)
    # The head killed the federated server, which failed the survivor's collective call: its worker is free again.
    survivor = nodes.workers[0].address
    wait_for(
        lambda: not any(str(k).startswith("gbdt-train") for k in nodes.head.client.processing([survivor])[survivor]),
        timeout=60,
        what="the survivor's training task to end",
    )
