"""``gbdt.train`` on a partitioned dataset: xgboost's collective (rabit) across the workers that hold the partitions.

Each worker trains on the partitions it holds, and xgboost's collective (a rabit tracker and a ring of TCP sockets,
the same machinery ``xgboost.dask`` drives) combines sketches and histograms so every worker grows the same trees.

**Where the collective traffic goes.** The tracker and the ring are plain TCP inside libxgboost; Dask's ``atls://``
comms cannot carry them, and this xgboost wheel has no federated (TLS) communicator
(``xgboost.build_info()["USE_FEDERATED"]`` is False). So the collective runs only over loopback: the head runs the
tracker bound to 127.0.0.1, and training is refused with :class:`NotAvailableYet` unless the scheduler and every
worker that holds a partition have loopback addresses, i.e. run on the head's host. That traffic never leaves the
host (softtee trusts the host operator; cells run in sandboxes with no network). docs/cluster.md says why and what
would lift the limit.

**Tasks are references.** ``xgboost.dask.train`` ships a closure by value (cloudpickle) and starts its tracker on the
scheduler at an address it guesses. This module uses the same pieces (``RabitTracker``, ``collective.
CommunicatorContext``, ``QuantileDMatrix`` and ``train`` inside it, per-worker thread count as ``xgboost.dask``)
from module-level functions of the measured package, so tasks travel as references, and the tracker's address is
chosen here, not guessed.

**Faults.** When a worker dies mid-training (kill -9), the head sees it leave the scheduler and raises a typed
:class:`RemoteExecutionError` naming it; no model handle is written. The survivors' tasks are cancelled, but a running
xgboost call cannot be interrupted: each stays busy until xgboost gives up on the lost peer (``dmlc_timeout``). Dask
cannot retry a collective task on another worker: the partitions live only where they are.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mesatee_notebook.errors import EncodingError, MesateeError, NotAvailableYet, RemoteExecutionError, RemoteTimeout

if TYPE_CHECKING:
    import pandas as pd
    from distributed import Future

    from mesatee_notebook.enclave.cluster.head import ClusterHead
    from mesatee_notebook.ml.gbdt import GBDTModel

__all__ = [
    "TRAIN_TIMEOUT",
    "ClusterTraining",
    "collective_refusal",
    "partition_summary",
    "train_on_partitions",
    "train_task",
]

log = logging.getLogger("mesatee.cluster")

#: Seconds a cluster training may take before the head gives up with RemoteTimeout.
TRAIN_TIMEOUT = 600.0
#: Seconds the collective may take to form (every worker connects to the tracker and its ring peers).
BOOTSTRAP_TIMEOUT = 300
_POLL = 0.5


def xgboost_version() -> str:
    import xgboost

    return str(xgboost.__version__)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def collective_refusal(scheduler: str, workers: list[str]) -> NotAvailableYet | None:
    """The error to raise when xgboost's collective would leave the host; None when every node is on loopback."""
    from distributed.comm import get_address_host

    away = [a for a in [scheduler, *workers] if not _is_loopback(get_address_host(a))]
    if not away:
        return None
    msg = (
        "gbdt.train on a partitioned dataset runs only when the scheduler and every worker holding a partition "
        f"are on the head's host (loopback addresses); not on loopback: {', '.join(away)}. xgboost's collective "
        "(its tracker and ring) is plain TCP outside the attested atls:// comms, and this xgboost build has no "
        "federated communicator with TLS (xgboost.build_info()['USE_FEDERATED'] is False): training across hosts "
        "needs such a build, with certificates bound to the nodes' evidence (docs/cluster.md)"
    )
    return NotAvailableYet(msg, workers=away)


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
    """Rows, columns and label range of the partitions this worker holds (checked by the head before training)."""
    import pandas as pd
    import xgboost  # noqa: F401  (imported now, so the collective's tasks start together)

    frame = _frame_of(parts, columns)
    y = pd.to_numeric(frame[label], errors="coerce") if label in frame.columns else None
    return {
        "rows": len(frame),
        "columns": [[str(c), str(t)] for c, t in frame.dtypes.items()],
        "label_max": None if y is None or y.isna().all() else float(y.max()),
        "label_min": None if y is None or y.isna().all() else float(y.min()),
    }


def train_task(coll_args: dict[str, Any], rank: int, spec: dict[str, Any], *parts: pd.DataFrame) -> dict[str, Any]:
    """One worker's share of a collective training: its partitions, the same trees as every peer.

    ``spec``: ``params`` (resolved by the head), ``rounds``, ``label``, ``weight`` (a column or None), ``columns``.
    """
    import hashlib

    import numpy as np
    import xgboost as xgb
    from distributed import get_worker
    from xgboost.dask.utils import get_n_threads

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
    # dmlc_task_id orders the ranks (the tracker sorts by task): rank i holds partition group i.
    with xgb.collective.CommunicatorContext(**coll_args, dmlc_task_id=f"{rank:06d}"):
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


def _by_worker(head: ClusterHead, parts: list[Future]) -> dict[str, list[Future]]:
    """Which worker holds each partition (a partition held nowhere, or in several places, is refused)."""
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
        w: head.client.submit(
            partition_summary,
            label,
            columns,
            *ps,
            workers=[w],
            allow_other_workers=False,
            pure=False,
            key=f"gbdt-sum-{tag}-{w}",
        )
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


def _start_tracker(n_workers: int) -> dict[str, Any]:
    """A rabit tracker in the head, bound to loopback, owned by a daemon thread that waits for it and then frees it.

    Only that thread holds the tracker: freeing it blocks until the group ends (up to ``BOOTSTRAP_TIMEOUT`` after a
    lost worker) and raises for a failed group, which must not happen in whatever thread drops the last reference
    (``RabitTracker.__del__``).
    """
    from xgboost.tracker import RabitTracker

    tracker = RabitTracker(n_workers=n_workers, host_ip="127.0.0.1", port=0, sortby="task", timeout=BOOTSTRAP_TIMEOUT)
    tracker.start()
    args = dict(tracker.worker_args())
    args["dmlc_timeout"] = BOOTSTRAP_TIMEOUT

    def wait(tracker: Any) -> None:
        try:
            tracker.wait_for(int(TRAIN_TIMEOUT))
        except Exception:  # a failed or timed-out group: the head's own checks report it
            log.info("the rabit tracker ended with a failed group")
        try:
            tracker.free()
        except Exception:
            log.info("the rabit tracker of a failed group was freed")

    threading.Thread(target=wait, args=(tracker,), name="mesatee-rabit-tracker", daemon=True).start()
    del tracker
    return args


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
    from mesatee_notebook.ml.gbdt import _LABEL_ATTR, GBDTModel, load_model

    if not parts:
        msg = "no partitions to train on"
        raise EncodingError(msg)
    groups = _by_worker(head, parts)
    refusal = collective_refusal(head.client.scheduler.address, sorted(groups))
    if refusal is not None:
        raise refusal
    summaries = _summaries(head, groups, label, columns)
    schema = _check_partitions(summaries, label)
    if weight_column is not None and weight_column not in [c for c, _ in schema]:
        msg = f"sample_weight column {weight_column!r} is not in the partitioned dataset"
        raise EncodingError(msg, column=weight_column)
    merged, notes = _resolve_params(dict(params or {}), summaries, num_boost_round)
    order = sorted(groups)
    spec = {"params": merged, "rounds": num_boost_round, "label": label, "weight": weight_column, "columns": columns}
    coll_args = _start_tracker(len(order))
    tag = uuid.uuid4().hex
    t0 = time.perf_counter()
    futures = {
        w: head.client.submit(
            train_task,
            coll_args,
            rank,
            spec,
            *groups[w],
            workers=[w],
            allow_other_workers=False,
            pure=False,
            retries=0,
            key=f"gbdt-train-{tag}-{rank}",
        )
        for rank, w in enumerate(order)
    }
    results = _gather(head, futures, timeout)
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
        collective={
            "engine": f"xgboost {xgboost_version()} rabit (tracker in the head)",
            "tracker": f"{coll_args['dmlc_tracker_uri']}:{coll_args['dmlc_tracker_port']}",
            "transport": "plain TCP over loopback only (this host); not over atls:// (docs/cluster.md)",
        },
        notes=notes,
    )
