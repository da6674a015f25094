"""``gbdt.train`` on a partitioned dataset: xgboost's federated collective across the workers holding the partitions.

Each worker trains on the partitions it holds, and xgboost's collective combines sketches and histograms so every
worker grows the same trees. The collective is xgboost's *federated* communicator: gRPC with mutual TLS to a server
the head runs in a child process, with the server's certificate and the client-root bundle pinned to the nodes'
attested keys (``gbdt_fed.py`` says how). So it works across hosts (``cluster up --netns``) as on loopback, and no
collective byte travels in plaintext. It needs an xgboost built with the federated plugin (the full ``xgboost``
wheel, not ``xgboost-cpu``); without one, training is refused with :class:`NotAvailableYet`.

**Tasks are references.** ``xgboost.dask.train`` ships a closure by value (cloudpickle) and starts its tracker on the
scheduler. This module uses the same pieces (``collective.CommunicatorContext``, ``QuantileDMatrix`` and ``train``
inside it, per-worker thread count as ``xgboost.dask``) from module-level functions of the measured package, so
tasks travel as references, and the server is started and pinned here.

**Faults.** When a worker dies mid-training (kill -9), the head sees it leave the scheduler and raises a typed
:class:`RemoteExecutionError` naming it; no model handle is written. The head then kills the federated server, which
fails the survivors' collective calls at once (xgboost 3.2's federated RPCs have no deadline of their own), so their
tasks end too. Dask cannot retry a collective task on another worker: the partitions live only where they are.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mesatee_notebook.errors import EncodingError, MesateeError, RemoteExecutionError, RemoteTimeout

if TYPE_CHECKING:
    import pandas as pd
    from distributed import Future

    from mesatee_notebook.enclave.cluster.gbdt_fed import FederatedServer
    from mesatee_notebook.enclave.cluster.head import ClusterHead
    from mesatee_notebook.ml.gbdt import GBDTModel

__all__ = [
    "TRAIN_TIMEOUT",
    "ClusterTraining",
    "partition_summary",
    "train_on_partitions",
    "train_task",
]

log = logging.getLogger("mesatee.cluster")

#: Seconds a cluster training may take before the head gives up with RemoteTimeout.
TRAIN_TIMEOUT = 600.0
_POLL = 0.5


def xgboost_version() -> str:
    import xgboost

    return str(xgboost.__version__)


# ---------------------------------------------------------------------------------------------
# Worker tasks (module-level: Dask pickles them by reference)


def _frame_of(parts: tuple[pd.DataFrame, ...], columns: list[str] | None) -> pd.DataFrame:
    import pandas as pd

    if not parts:
        msg = "a cluster training task got no partition"
        raise EncodingError(msg)
    frame = parts[0] if len(parts) == 1 else pd.concat(parts, ignore_index=True)
    return frame if columns is None else frame[columns]


def partition_summary(label: str, columns: list[str] | None, *parts: pd.DataFrame) -> dict[str, Any]:
    """Rows, columns and label range of this worker's partitions, and its federated client certificate.

    The head checks the summaries before training, and pins the certificate (the worker's own key and evidence).
    """
    import pandas as pd
    import xgboost  # noqa: F401  (imported now, so the collective's tasks start together)

    from mesatee_notebook.enclave.cluster.gbdt_fed import client_certificate

    frame = _frame_of(parts, columns)
    y = pd.to_numeric(frame[label], errors="coerce") if label in frame.columns else None
    return {
        "rows": len(frame),
        "columns": [[str(c), str(t)] for c, t in frame.dtypes.items()],
        "label_max": None if y is None or y.isna().all() else float(y.max()),
        "label_min": None if y is None or y.isna().all() else float(y.min()),
        "federated_cert": client_certificate(),
    }


def train_task(fed: dict[str, Any], rank: int, spec: dict[str, Any], *parts: pd.DataFrame) -> dict[str, Any]:
    """One worker's share of a collective training: its partitions, the same trees as every peer.

    ``fed``: the federated server's address and pinned certificate, and every rank's client certificate
    (``gbdt_fed.joined``). ``spec``: ``params`` (resolved by the head), ``rounds``, ``label``, ``weight`` (a column
    or None), ``columns``.
    """
    import numpy as np
    import xgboost as xgb
    from distributed import get_worker
    from xgboost.dask.utils import get_n_threads

    from mesatee_notebook.enclave.cluster.gbdt_fed import joined
    from mesatee_notebook.ml.gbdt import _split

    worker = get_worker()
    frame = _frame_of(parts, spec["columns"])
    label, weight_column, params = str(spec["label"]), spec["weight"], dict(spec["params"])
    weight = None
    if weight_column is not None:
        weight = frame[weight_column].to_numpy(dtype=np.float64, na_value=np.nan)
        frame = frame.drop(columns=[weight_column])
    X, y, names = _split(frame, label, in_place=True)
    threads = get_n_threads(params, worker)
    local = {**params, "nthread": threads}
    t0 = time.perf_counter()
    with joined({**fed, "host": fed["hosts"][rank]}, rank):
        dtrain = xgb.QuantileDMatrix(X, label=y, weight=weight, feature_names=names, nthread=threads)
        booster = xgb.train(local, dtrain, num_boost_round=int(spec["rounds"]), verbose_eval=False)
    raw = bytes(booster.save_raw(raw_format="ubj"))
    return {
        "address": worker.address,
        "pid": os.getpid(),
        "rows": len(frame),
        "seconds": time.perf_counter() - t0,
        "model_sha256": hashlib.sha256(raw).hexdigest(),
        "model": raw if rank == 0 else None,
    }


# ---------------------------------------------------------------------------------------------
# The head side


@dataclass
class ClusterTraining:
    """A model trained on the cluster, and who trained it."""

    model: GBDTModel
    workers: list[dict[str, Any]]
    rows: int
    seconds: float
    partitions: int
    objective: str
    collective: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _loaded(parts: list[Future], timeout: float = 120.0) -> None:
    """Wait until every partition future is in its worker's memory; a typed error if one fails or time runs out.

    They may still be loading from the workers' sealed stores, and ``who_has`` lists no holder for those yet.
    """
    deadline = time.monotonic() + timeout
    while True:
        failed = [f for f in parts if f.status in ("error", "cancelled", "lost")]
        if failed:
            raise _task_error(failed[0])
        if all(f.status == "finished" for f in parts):
            return
        if time.monotonic() > deadline:
            msg = f"the partitions were not loaded in their workers within {timeout:g} s; nothing was trained"
            raise RemoteTimeout(msg)
        time.sleep(0.05)


def _by_worker(head: ClusterHead, parts: list[Future]) -> dict[str, list[Future]]:
    """Which worker holds each partition (a partition held nowhere, or in several places, is refused)."""
    _loaded(parts)
    where = head.client.who_has(parts)
    groups: dict[str, list[Future]] = {}
    for part in parts:
        holders = sorted(where.get(part.key, ()))
        if not holders:
            msg = f"partition {part.key} is held by no live worker (a worker left the cluster)"
            raise RemoteExecutionError(msg)
        groups.setdefault(holders[0], []).append(part)
    return groups


def _summaries(
    head: ClusterHead, groups: dict[str, list[Future]], label: str, columns: list[str] | None
) -> dict[str, dict[str, Any]]:
    tag = uuid.uuid4().hex
    futures = {
        w: head.submit_to(w, partition_summary, label, columns, *ps, key=f"gbdt-sum-{tag}-{w}")
        for w, ps in groups.items()
    }
    return _gather(head, futures, 120.0)


def _check_partitions(summaries: dict[str, dict[str, Any]], label: str) -> list[list[str]]:
    schemas = {repr(s["columns"]) for s in summaries.values()}
    if len(schemas) != 1:
        msg = "the partitions do not all have the same columns and types; cannot train on them together"
        raise EncodingError(msg)
    columns: list[list[str]] = next(iter(summaries.values()))["columns"]
    if label not in [c for c, _ in columns]:
        msg = f"label column {label!r} is not in the partitioned dataset"
        raise EncodingError(msg, label=label)
    return columns


def _resolve_params(
    params: dict[str, Any], summaries: dict[str, dict[str, Any]], rounds: int
) -> tuple[dict[str, Any], list[str]]:
    """The engine's defaults and checks (``ml.gbdt``); ``auto:classifier`` and ``num_class`` from all partitions."""
    from mesatee_notebook.ml.gbdt import MULTICLASS_OBJECTIVES, _train_params

    notes: list[str] = []
    top = max((s["label_max"] for s in summaries.values() if s["label_max"] is not None), default=0.0)
    if params.get("objective") == "auto:classifier":
        params = {**params, "objective": "multi:softprob" if top > 1 else "binary:logistic"}
    merged = _train_params(params, None, rounds)
    if str(merged["objective"]) in MULTICLASS_OBJECTIVES and "num_class" not in merged:
        merged["num_class"] = int(top) + 1
    for key in ("nthread", "n_jobs"):
        if merged.pop(key, None) is not None:
            notes.append(f"{key} ignored: each worker uses its Dask threads")
    return merged, notes


def _gather(head: ClusterHead, futures: dict[str, Future], timeout: float) -> dict[str, Any]:
    """Wait for one task per worker; a typed error when a task fails, a worker leaves, or time runs out."""
    deadline = time.monotonic() + timeout
    pending = list(futures.values())
    try:
        while True:
            failed = [f for f in pending if f.status in ("error", "cancelled", "lost")]
            if failed:
                raise _task_error(failed[0])
            if all(f.status == "finished" for f in pending):
                return {w: f.result() for w, f in futures.items()}
            gone = sorted(set(futures) - _live_workers(head))
            if gone:
                msg = f"worker(s) {', '.join(gone)} left the cluster during training; nothing was kept"
                raise RemoteExecutionError(msg, workers=gone)
            if time.monotonic() > deadline:
                msg = f"cluster training did not finish within {timeout:g} s; nothing was kept"
                raise RemoteTimeout(msg)
            time.sleep(_POLL)
    except MesateeError:
        head.client.cancel(pending, force=True)
        raise
    except Exception as exc:  # Dask's own failures (comm errors)
        head.client.cancel(pending, force=True)
        msg = f"cluster training failed: {type(exc).__name__}: {exc}"
        raise RemoteExecutionError(msg) from None


def _live_workers(head: ClusterHead) -> set[str]:
    """The workers the scheduler knows now, asked directly.

    ``Client.scheduler_info()`` returns a cache that Dask's periodic refresh can replace, between the fetch and the
    return, with one that lists no worker (seen under load: every worker looked gone).
    """
    info = head.client.sync(head.client.scheduler.identity, n_workers=-1)
    return set(info["workers"])


def _task_error(future: Future) -> MesateeError:
    """The typed error for a failed task (a MesateeError raised on the worker keeps its type)."""
    if future.status != "error":
        return RemoteExecutionError(f"a cluster training task was {future.status}; nothing was kept")
    exc = future.exception(timeout=10)
    if isinstance(exc, MesateeError):
        return exc
    first = str(exc).splitlines()[0] if str(exc) else ""
    return RemoteExecutionError(f"a cluster training task failed: {type(exc).__name__}: {first}; nothing was kept")


def _pinned_federation(
    head: ClusterHead, order: list[str], summaries: dict[str, dict[str, Any]]
) -> tuple[dict[str, Any], FederatedServer]:
    """Pin the workers' federated certificates and start the server with exactly those as its client roots.

    Each certificate must be over the key of the node certificate the head sees on its own attested connection to
    that worker (``gbdt_fed.py``).
    """
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
    from distributed.comm import get_address_host

    from mesatee_notebook.enclave.cluster.gbdt_fed import (
        FederatedServer,
        check_pinned,
        local_address_towards,
        peer_spki,
        server_certificate,
    )

    certs = [str(summaries[w]["federated_cert"]) for w in order]
    for w, cert in zip(order, certs, strict=True):
        check_pinned(cert, peer_spki(head.node, head.client, w))
    hosts = [local_address_towards(get_address_host(w).strip("[]")) for w in order]
    ident = head.node.identity
    server_cert = server_certificate(ident, sorted(set(hosts)))
    key_pem = ident.tls_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    server = FederatedServer(len(order), key_pem, server_cert, "".join(certs))
    fed = {
        "hosts": hosts,
        "port": server.port,
        "server_cert": server_cert,
        "head_cert": ident.certificate_der,
        "client_certs": certs,
    }
    return fed, server


def _collective_record(fed: dict[str, Any]) -> dict[str, Any]:
    def digest(pem: str) -> str:
        return hashlib.sha256(pem.encode()).hexdigest()

    return {
        "engine": f"xgboost {xgboost_version()} federated (gRPC, mutual TLS; server in a child process of the head)",
        "server": [f"{h}:{fed['port']}" for h in sorted(set(fed["hosts"]))],
        "transport": "gRPC over TLS; the server pinned to the head's attested key, clients to the workers'",
        "server_cert_sha256": digest(fed["server_cert"]),
        "client_certs_sha256": [digest(c) for c in fed["client_certs"]],
        "setup_seconds": round(float(fed.get("setup_s", 0.0)), 3),
    }


def _run_training(
    head: ClusterHead,
    order: list[str],
    groups: dict[str, list[Future]],
    fed: dict[str, Any],
    spec: dict[str, Any],
    timeout: float,
) -> dict[str, Any]:
    tag = uuid.uuid4().hex
    futures = {
        w: head.submit_to(w, train_task, fed, rank, spec, *groups[w], retries=0, key=f"gbdt-train-{tag}-{rank}")
        for rank, w in enumerate(order)
    }
    return _gather(head, futures, timeout)


def train_on_partitions(
    head: ClusterHead,
    parts: list[Future],
    label: str,
    *,
    params: dict[str, Any] | None = None,
    num_boost_round: int = 100,
    weight_column: str | None = None,
    columns: list[str] | None = None,
    timeout: float = TRAIN_TIMEOUT,
) -> ClusterTraining:
    """Train one xgboost ``hist`` model over the partitions (futures of pandas frames held by workers)."""
    from mesatee_notebook.enclave.cluster.gbdt_fed import federated_available
    from mesatee_notebook.ml.gbdt import _LABEL_ATTR, GBDTModel, load_model

    if not parts:
        msg = "no partitions to train on"
        raise EncodingError(msg)
    missing = federated_available()
    if missing is not None:
        raise missing
    groups = _by_worker(head, parts)
    summaries = _summaries(head, groups, label, columns)
    schema = _check_partitions(summaries, label)
    if weight_column is not None and weight_column not in [c for c, _ in schema]:
        msg = f"sample_weight column {weight_column!r} is not in the partitioned dataset"
        raise EncodingError(msg, column=weight_column)
    merged, notes = _resolve_params(dict(params or {}), summaries, num_boost_round)
    order = sorted(groups)
    spec = {"params": merged, "rounds": num_boost_round, "label": label, "weight": weight_column, "columns": columns}
    t_pin = time.perf_counter()
    fed, server = _pinned_federation(head, order, summaries)
    fed["setup_s"] = time.perf_counter() - t_pin
    t0 = time.perf_counter()
    try:
        results = _run_training(head, order, groups, fed, spec, timeout)
    finally:
        server.stop()  # also fails the survivors' collective calls when a worker was lost
    seconds = time.perf_counter() - t0
    digests = {r["model_sha256"] for r in results.values()}
    if len(digests) != 1:
        msg = "the workers ended with different models; nothing was kept"
        raise RemoteExecutionError(msg)
    raw = results[order[0]]["model"]
    booster = load_model(raw).booster
    booster.set_attr(**{_LABEL_ATTR: label})
    verified = {r.address: r.to_dict() for r in head.verify_workers(order)}
    workers = [
        verified[w] | {"pid": results[w]["pid"], "rows": results[w]["rows"], "partitions": len(groups[w]), "rank": rank}
        for rank, w in enumerate(order)
    ]
    return ClusterTraining(
        model=GBDTModel(booster),
        workers=workers,
        rows=sum(int(r["rows"]) for r in results.values()),
        seconds=seconds,
        partitions=len(parts),
        objective=str(merged["objective"]),
        collective=_collective_record(fed),
        notes=notes,
    )
