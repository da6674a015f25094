"""gbdt.train across hosts: 3 workers, each in a network namespace of its own, on xgboost's pinned federated channel.

One ``cluster up --netns --workers 3`` for the module (needs root and iproute2's ``ip``). The collective's traffic
leaves each worker's namespace on its veth, crosses the bridge and enters the head's namespace, where the federated
server runs. The kill -9 test runs last.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

import mesatee_notebook as mn
from mesatee_notebook.enclave.cluster import local
from mesatee_notebook.ml import gbdt

xgboost = pytest.importorskip("xgboost")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(900),
    pytest.mark.skipif(os.geteuid() != 0, reason="--netns needs root (CAP_NET_ADMIN) to create namespaces"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="--netns needs iproute2's `ip`"),
    pytest.mark.skipif(not xgboost.build_info().get("USE_FEDERATED"), reason="this xgboost has no federated plugin"),
]

PARAMS = {"objective": "binary:logistic", "max_depth": 4, "eta": 0.3}


def _frame(n: int, *, seed: int = 0, continuous: bool = False) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    a, b, c = rng.normal(size=n), rng.integers(0, 40, n).astype(np.float64), rng.normal(size=n)
    if not continuous:  # at most max_bin distinct values per feature: exact quantile cuts on every worker
        a, c = a.round(1), c.round(1)
    y = ((a + 0.08 * b - 0.5 * c + rng.normal(size=n)) > 1.5).astype(np.float64)
    return pd.DataFrame({"a": a, "b": b, "c": c, "y": y})


def _rx(veth: str) -> int:
    return int(Path(f"/sys/class/net/{veth}/statistics/rx_bytes").read_text())


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[local.LocalCluster]:
    data_dir = tmp_path_factory.mktemp("fednetns") / "c"
    cluster = local.up(3, data_dir, use_netns=True)
    try:
        yield cluster
    finally:
        local.down(data_dir)


@pytest.fixture(scope="module")
def parties(running: local.LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Any]]:
    ids = tmp_path_factory.mktemp("fedids")
    policy = running.policy()
    with (
        mn.connect(running.head_url, policy=policy, identity=ids / "owner") as owner,
        mn.connect(running.head_url, policy=policy, identity=ids / "trainer") as trainer,
    ):
        yield owner, trainer


def test_three_partitions_in_three_namespaces_match_single_node(
    running: local.LocalCluster, parties: tuple[Any, Any]
) -> None:
    owner, trainer = parties
    state = running.state
    veths = state["netns"]["veth"]
    df = _frame(3000)
    owner.upload(df, "fedparts", partitions=3, policy=mn.DataPolicy(code_access=(trainer.party_id,)))
    before = {w["name"]: _rx(veths[w["name"]]) for w in state["workers"]}
    args = {"data": {"dataset": "fedparts"}, "label": "y", "params": PARAMS, "num_boost_round": 20}
    info = trainer.call("gbdt.train", args).info
    grown = {name: _rx(veths[name]) - rx for name, rx in before.items()}
    cluster = info["cluster"]
    assert {w["address"] for w in cluster["workers"]} == {w["address"] for w in state["workers"]}
    assert sum(w["rows"] for w in cluster["workers"]) == 3000
    # The federated server listens in the head's namespace, at the head's address on the bridge.
    assert "federated" in cluster["collective"]["engine"]
    assert [s.rsplit(":", 1)[0] for s in cluster["collective"]["server"]] == [state["head"]["host"]]
    assert all(g > 20_000 for g in grown.values()), grown  # histograms and the model crossed every veth
    # Exact cuts: the same trees as one process (histogram sums in another order: leaf values to float rounding).
    model = trainer.gbdt.model(info["model"]["id"])
    single = gbdt.train(df, "y", params=PARAMS, num_boost_round=20)
    X = df.drop(columns=["y"])
    np.testing.assert_allclose(model.predict(X, engine="xgboost"), single.predict(X), rtol=0, atol=1e-6)


def test_kill_9_of_a_worker_in_its_namespace_is_a_quick_typed_error(
    running: local.LocalCluster, parties: tuple[Any, Any]
) -> None:
    owner, trainer = parties
    owner.upload(
        _frame(60_000, seed=2, continuous=True),
        "fedbig",
        partitions=3,
        policy=mn.DataPolicy(code_access=(trainer.party_id,)),
    )
    models_before = {m["id"] for m in trainer.gbdt.models()}
    outcome: dict[str, Any] = {}
    args = {
        "data": {"dataset": "fedbig"},
        "label": "y",
        "params": {**PARAMS, "max_depth": 8},
        "num_boost_round": 5000,
    }

    def run() -> None:
        try:
            outcome["info"] = trainer.call("gbdt.train", args).info
        except Exception as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    # The head's federated server process runs once the certificates are pinned; then the workers join it.
    deadline = time.monotonic() + 120
    while not _federated_servers(int(running.state["head"]["pid"])) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _federated_servers(int(running.state["head"]["pid"])), outcome
    time.sleep(3.0)
    assert thread.is_alive(), outcome
    victim = running.workers[2]
    os.kill(int(victim["pid"]), signal.SIGKILL)
    killed = time.monotonic()
    thread.join(timeout=120)
    assert not thread.is_alive(), "the head did not give up after a worker was killed"
    assert time.monotonic() - killed < 60
    err = outcome.get("error")
    assert isinstance(err, mn.RemoteExecutionError), repr(outcome)
    assert "nothing was kept" in str(err)
    assert {m["id"] for m in trainer.gbdt.models()} == models_before  # no model handle was written
    assert _federated_servers(int(running.state["head"]["pid"])) == []  # the head stopped its server


def _federated_servers(head_pid: int) -> list[int]:
    """Pids of federated server processes below the head kernel."""
    from .setup_helpers import descendants

    found = []
    for pid in descendants([head_pid]) - {head_pid}:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"gbdt_fed_server" in cmdline:
            found.append(pid)
    return found
