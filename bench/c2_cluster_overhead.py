"""C2: what the cluster costs on one machine. The same GBDT training (and the same PSI), single-node against a local
attested cluster of 2 worker processes (``mesatee-enclave scheduler`` + 2 ``worker``, ``atls://``), in one run.

Measures:
* GBDT: ``ml.gbdt.train`` in this process (1 thread, and 2 threads = the cores the two workers have together)
  against ``enclave/cluster/gbdt.train_on_partitions`` on 2 partitions (one per worker, 1 thread each); placing the
  partitions (scatter over atls://) is timed apart. A warm-up training runs first (workers import xgboost).
* bytes moved: the kernel's per-socket ``bytes_sent`` (``ss -tinp``, sampled every 0.1 s during the training) of
  every TCP socket the two worker processes own, split into xgboost's collective (gRPC + TLS to the federated
  server in the head) and Dask's atls:// connections (to the scheduler, the head, each other); plus Dask's own
  counter of worker-to-worker transfers (``Worker.transfer_outgoing_bytes_total``).
* GBDT across network namespaces (as root, with iproute2): ``cluster up --netns --workers 2`` and ``gbdt.train``
  through the head kernel on a 2-partition upload, with the bytes each worker's veth carried during the training
  (everything: the collective and Dask). Skipped otherwise. The rabit ring this replaced ran on loopback only; its
  figures come from running this bench of an older tree (docs/benchmarks.md, C2).
* PSI: single-node ``ml.psi`` against the cluster's sharded PSI when ``enclave/cluster/cluster_psi.py`` is present
  (built by the clusterdata work); otherwise the row says it was skipped.

Prints a table and writes bench/results/c2_cluster_overhead.json.
Usage: python bench/c2_cluster_overhead.py [ROWS] [ROUNDS] [PSI_ITEMS] [--no-netns]   (defaults 200000, 50, 1000000)
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mesatee_notebook.enclave.cluster.gbdt import train_on_partitions  # noqa: E402
from mesatee_notebook.enclave.cluster.head import ClusterHead  # noqa: E402
from mesatee_notebook.enclave.cluster.node_identity import (  # noqa: E402
    ClusterNode,
    NodeIdentity,
    cluster_measurement,
    cluster_policy,
)
from mesatee_notebook.enclave.platform import load_platform  # noqa: E402
from mesatee_notebook.ml import gbdt  # noqa: E402
from tests.cluster.conftest import init_platform, spawn_node, start_node, stop_node, wait_serving  # noqa: E402

FEATURES = 10
PARAMS = {"objective": "binary:logistic", "max_depth": 6, "eta": 0.1, "max_bin": 256}


def _frame(rows: int) -> pd.DataFrame:
    rng = np.random.default_rng(7)
    X = rng.normal(size=(rows, FEATURES))
    logit = X[:, 0] - 0.7 * X[:, 1] + 0.5 * X[:, 2] * X[:, 3] + rng.normal(size=rows)
    df = pd.DataFrame(X, columns=[f"f{i}" for i in range(FEATURES)])
    df["y"] = (logit > 0).astype(np.float64)
    return df


_SOCKET = re.compile(r"^ESTAB\s+\d+\s+\d+\s+(\S+)\s+(\S+)\s+users:\(\(\S+?pid=(\d+),")
_SENT = re.compile(r"bytes_sent:(\d+)")


def _sockets(pids: set[int]) -> dict[tuple[int, str, str], int]:
    """``bytes_sent`` of every established TCP socket of ``pids``: {(pid, local, peer): bytes}."""
    out = subprocess.run(["ss", "-tinpH"], capture_output=True, text=True, check=True).stdout
    found: dict[tuple[int, str, str], int] = {}
    key = None
    for line in out.splitlines():
        m = _SOCKET.match(line)
        if m:
            pid = int(m.group(3))
            key = (pid, m.group(1), m.group(2)) if pid in pids else None
            continue
        sent = _SENT.search(line)
        if key is not None and sent:
            found[key] = int(sent.group(1))
            key = None
    return found


class _Sampler:
    """Samples the workers' sockets while training runs; bytes sent per socket = last sample - first sample."""

    def __init__(self, pids: set[int]) -> None:
        self.pids = pids
        self.base = _sockets(pids)
        self.last: dict[tuple[int, str, str], int] = dict(self.base)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(0.1):
            self.last.update(_sockets(self.pids))

    def finish(self) -> dict[tuple[int, str, str], int]:
        self.stop.set()
        self.thread.join()
        self.last.update(_sockets(self.pids))
        return {k: v - self.base.get(k, 0) for k, v in self.last.items() if v > self.base.get(k, 0)}


def _split_traffic(sent: dict[tuple[int, str, str], int], dask_ports: set[str]) -> dict[str, int]:
    """Dask's atls:// sockets (one end is a Dask listener) against xgboost's collective (ring + tracker)."""
    dask = sum(
        v
        for (_, local, peer), v in sent.items()
        if local.rsplit(":", 1)[1] in dask_ports or peer.rsplit(":", 1)[1] in dask_ports
    )
    return {"dask_atls": dask, "collective": sum(sent.values()) - dask}


def _dask_transfers(head: ClusterHead) -> int:
    """Dask's own counter (a bench-only function, shipped by value: the product's tasks are module references)."""

    def total(dask_worker: Any) -> int:
        return int(dask_worker.transfer_outgoing_bytes_total)

    return sum(int(v) for v in head.client.run(total).values())


def _single(df: pd.DataFrame, rounds: int, threads: int) -> tuple[float, Any]:
    t = time.perf_counter()
    model = gbdt.train(df, "y", params={**PARAMS, "nthread": threads}, num_boost_round=rounds)
    return time.perf_counter() - t, model


def _cluster_gbdt(head: ClusterHead, workers: list[Any], df: pd.DataFrame, rounds: int) -> dict[str, Any]:
    half = len(df) // 2
    t = time.perf_counter()
    parts = [
        head.client.scatter(df.iloc[:half].reset_index(drop=True), workers=[workers[0].address], hash=False),
        head.client.scatter(df.iloc[half:].reset_index(drop=True), workers=[workers[1].address], hash=False),
    ]
    placement = time.perf_counter() - t
    train_on_partitions(head, parts, "y", params=PARAMS, num_boost_round=2)  # warm-up: workers import xgboost
    short = max(1, rounds // 3)
    t = time.perf_counter()
    train_on_partitions(head, parts, "y", params=PARAMS, num_boost_round=short)
    short_s = time.perf_counter() - t
    dask_before = _dask_transfers(head)
    sampler = _Sampler({w.proc.pid for w in workers})
    t = time.perf_counter()
    trained = train_on_partitions(head, parts, "y", params=PARAMS, num_boost_round=rounds)
    seconds = time.perf_counter() - t
    sent = sampler.finish()
    dask_ports = {a.rsplit(":", 1)[1] for a in [head.client.scheduler.address, *(w.address for w in workers)]}
    return {
        "placement_s": placement,
        "train_s": seconds,
        "train_only_s": trained.seconds,
        "collective_setup_s": trained.collective.get("setup_seconds"),
        "short_rounds": short,
        "short_train_s": short_s,
        "worker_rows": [w.get("rows") for w in trained.workers],
        "bytes_sent": _split_traffic(sent, dask_ports),
        "dask_worker_to_worker_bytes": _dask_transfers(head) - dask_before,
        "model": trained.model,
    }


def _psi(head: ClusterHead, workers: list[Any], n: int) -> dict[str, Any]:
    """The same PSI (cardinality of two sets of n integers, half shared): ml.psi here, sharded on the cluster."""
    try:
        from mesatee_notebook.enclave.cluster.cluster_psi import item_chunks, sharded_psi
    except ImportError:
        return {"skipped": "enclave/cluster/cluster_psi.py is not in this tree (sharded PSI: the clusterdata work)"}
    from mesatee_notebook.ml.psi import psi

    rng = np.random.default_rng(3)
    pool = rng.choice(np.iinfo(np.int64).max, size=int(n * 1.5), replace=False)
    a, b = pool[:n], pool[n // 2 :]
    t = time.perf_counter()
    single = psi({"a": a, "b": b}, "cardinality").cardinality
    single_s = time.perf_counter() - t
    t = time.perf_counter()
    chunks = [item_chunks(head, a), item_chunks(head, b)]
    placement = time.perf_counter() - t
    sharded_psi(head, [item_chunks(head, a[:1000]), item_chunks(head, b[:1000])])  # warm-up
    sampler = _Sampler({w.proc.pid for w in workers})
    t = time.perf_counter()
    result = sharded_psi(head, chunks, "cardinality")
    cluster_s = time.perf_counter() - t
    sent = sampler.finish()
    dask_ports = {a_.rsplit(":", 1)[1] for a_ in [head.client.scheduler.address, *(w.address for w in workers)]}
    assert result["cardinality"] == single == n // 2, (result["cardinality"], single)
    return {
        "items_per_party": n,
        "cardinality": single,
        "single_s": single_s,
        "cluster_s": cluster_s,
        "placement_s": placement,
        "bytes_sent": _split_traffic(sent, dask_ports),
    }


def _veth_bytes(veth: str) -> int:
    stats = Path(f"/sys/class/net/{veth}/statistics")
    return int((stats / "rx_bytes").read_text()) + int((stats / "tx_bytes").read_text())


def _netns_gbdt(df: pd.DataFrame, rounds: int) -> dict[str, Any]:
    """``gbdt.train`` through the head of a ``cluster up --netns`` cluster of 2 workers (root only)."""
    import os

    import mesatee_notebook as mn
    from mesatee_notebook.enclave.cluster import local

    if os.geteuid() != 0 or shutil.which("ip") is None:
        return {"skipped": "needs root and iproute2's ip (network namespaces)"}
    data_dir = Path(tempfile.mkdtemp(prefix="c2-netns-")) / "c"
    t = time.perf_counter()
    running = local.up(2, data_dir, use_netns=True)
    start_s = time.perf_counter() - t
    try:
        veths = running.state["netns"]["veth"]
        ids = data_dir.parent / "ids"
        with mn.connect(running.head_url, policy=running.policy(), identity=ids / "owner") as s:
            t = time.perf_counter()
            s.upload(df, "c2", partitions=2)
            upload_s = time.perf_counter() - t
            args = {"data": {"dataset": "c2"}, "label": "y", "params": PARAMS}
            s.call("gbdt.train", {**args, "num_boost_round": 2})  # warm-up: workers import xgboost
            timed = {}
            for n in (max(1, rounds // 3), rounds):
                before = {w["name"]: _veth_bytes(veths[w["name"]]) for w in running.workers}
                t = time.perf_counter()
                info = s.call("gbdt.train", {**args, "num_boost_round": n}).info
                timed[n] = {
                    "call_s": time.perf_counter() - t,
                    "train_s": float(info["train_seconds"]),
                    "veth_bytes": {w: _veth_bytes(veths[w]) - b for w, b in before.items()},
                    "model": info["model"]["id"],
                }
            model = s.gbdt.model(timed[rounds]["model"])
            auc = float(model.evaluate(df, "y")["auc"])
    finally:
        local.down(data_dir)
        shutil.rmtree(data_dir.parent, ignore_errors=True)
    short = max(1, rounds // 3)
    per_round = (timed[rounds]["train_s"] - timed[short]["train_s"]) / (rounds - short)
    return {
        "cluster_start_s": start_s,
        "upload_s": upload_s,
        "short_rounds": short,
        "train_s": timed[rounds]["train_s"],
        "call_s": timed[rounds]["call_s"],
        "short_train_s": timed[short]["train_s"],
        "per_round_s": per_round,
        "fixed_s": timed[rounds]["train_s"] - per_round * rounds,
        "veth_bytes": timed[rounds]["veth_bytes"],
        "auc": auc,
    }


def _start(data_dir: Path) -> tuple[Any, list[Any]]:
    scheduler = start_node("scheduler", data_dir, "--port", "0")
    workers = [spawn_node("worker", data_dir, "--scheduler", scheduler.address, "--name", f"b{i}") for i in range(2)]
    for w in workers:
        wait_serving(w)
    return scheduler, workers


def main() -> None:
    argv = [a for a in sys.argv[1:] if not a.startswith("--")]
    rows = int(argv[0]) if len(argv) > 0 else 200_000
    rounds = int(argv[1]) if len(argv) > 1 else 50
    psi_items = int(argv[2]) if len(argv) > 2 else 1_000_000
    df = _frame(rows)
    data_dir = Path(tempfile.mkdtemp(prefix="c2-"))
    fp = init_platform(data_dir)
    nodes: list[Any] = []
    head = None
    try:
        scheduler, workers = _start(data_dir)
        nodes = [scheduler, *workers]
        ident = NodeIdentity.create("head", load_platform(data_dir).key)
        head = ClusterHead(scheduler.address, ClusterNode(ident, cluster_policy((fp,), (cluster_measurement(),))))
        while len(head._workers()) < 2:
            time.sleep(0.2)
        single1, model1 = _single(df, rounds, 1)
        single1_short, _ = _single(df, max(1, rounds // 3), 1)
        single2, _ = _single(df, rounds, 2)
        cluster = _cluster_gbdt(head, workers, df, rounds)
        psi = _psi(head, workers, psi_items)
        cluster["collective"] = "xgboost federated (gRPC + mutual TLS, server in the head)"
    except Exception:
        for n in nodes:
            print(f"--- {n.role} log tail ---\n{n.text()[-2500:]}", file=sys.stderr)
        raise
    finally:
        if head is not None:
            head.close()
        for n in nodes:
            stop_node(n)
        shutil.rmtree(data_dir, ignore_errors=True)
    netns = {"skipped": "--no-netns"} if "--no-netns" in sys.argv else _netns_gbdt(df, rounds)
    auc_single = model1.evaluate(df)["auc"]
    auc_cluster = cluster.pop("model").evaluate(df)["auc"]
    sent = cluster["bytes_sent"]
    short = cluster["short_rounds"]
    per_round = {
        "single": (single1 - single1_short) / (rounds - short),
        "cluster": (cluster["train_s"] - cluster["short_train_s"]) / (rounds - short),
    }
    fixed = {
        "single": single1 - per_round["single"] * rounds,
        "cluster": cluster["train_s"] - per_round["cluster"] * rounds,
    }
    print(f"C2: GBDT {rows} rows x {FEATURES} features, {rounds} rounds, max_depth {PARAMS['max_depth']}")
    print(f"{'':<34} {'seconds':>9} {'auc':>8}")
    print(f"{'single node, 1 thread':<34} {single1:>9.2f} {auc_single:>8.4f}")
    print(f"{'single node, 2 threads':<34} {single2:>9.2f}")
    print(f"{'cluster, 2 workers x 1 thread':<34} {cluster['train_s']:>9.2f} {auc_cluster:>8.4f}")
    print(f"{'  placing 2 partitions (atls://)':<34} {cluster['placement_s']:>9.2f}")
    print(
        f"  of the cluster's {cluster['train_s']:.2f} s: training tasks {cluster['train_only_s']:.2f} s, pinning and "
        f"starting the federated server {cluster['collective_setup_s']} s"
    )
    print(
        f"from {short} and {rounds} rounds: per round single {per_round['single'] * 1e3:.0f} ms, cluster "
        f"{per_round['cluster'] * 1e3:.0f} ms; fixed single {fixed['single']:.2f} s, cluster {fixed['cluster']:.2f} s"
    )
    print(
        f"bytes sent by the 2 workers during training: collective (federated gRPC) {sent['collective'] / 1e6:.2f} MB "
        f"({sent['collective'] / rounds / 1e3:.1f} kB a round), Dask atls:// {sent['dask_atls'] / 1e3:.1f} kB; "
        f"Dask worker-to-worker transfers: {cluster['dask_worker_to_worker_bytes']} B"
    )
    if "skipped" in netns:
        print(f"GBDT across network namespaces: skipped: {netns['skipped']}")
    else:
        vb = netns["veth_bytes"]
        print(
            f"{'cluster --netns, 2 workers (head)':<34} {netns['train_s']:>9.2f} "
            f"{netns['auc'] if netns['auc'] is not None else float('nan'):>8.4f}"
        )
        print(
            f"  netns: per round {netns['per_round_s'] * 1e3:.0f} ms, fixed {netns['fixed_s']:.2f} s; upload "
            f"{netns['upload_s']:.2f} s; veth bytes (rx+tx) during training: "
            + ", ".join(f"{w} {b / 1e6:.2f} MB" for w, b in sorted(vb.items()))
        )
    if "skipped" in psi:
        print(f"PSI: skipped: {psi['skipped']}")
    else:
        print(f"PSI cardinality, 2 x {psi['items_per_party']} items (half shared)")
        print(f"{'single node (ml.psi)':<34} {psi['single_s']:>9.2f}")
        print(f"{'cluster, sharded over 2 workers':<34} {psi['cluster_s']:>9.2f}")
        print(f"{'  placing the items (atls://)':<34} {psi['placement_s']:>9.2f}")
        print(f"bytes sent by the 2 workers during PSI: Dask atls:// {psi['bytes_sent']['dask_atls'] / 1e6:.2f} MB")
    out = ROOT / "bench" / "results" / "c2_cluster_overhead.json"
    out.write_text(
        json.dumps(
            {
                "rows": rows,
                "features": FEATURES,
                "rounds": rounds,
                "params": PARAMS,
                "single_1thread_s": single1,
                "single_2threads_s": single2,
                "single_1thread_short_s": single1_short,
                "per_round_s": per_round,
                "fixed_s": fixed,
                "auc_single": auc_single,
                "auc_cluster": auc_cluster,
                "cluster": cluster,
                "netns": netns,
                "psi": psi,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
