r"""Partitioned datasets: row partitions sealed in the workers' stores, metadata in the head's (issue 18, "Data").

``upload(df, name, partitions=N)`` on a kernel served with ``--cluster``: the head splits the frame into N
contiguous row ranges, encodes each as an Arrow IPC stream, and places partition i on worker ``i mod W`` (the
workers sorted by address). The bytes travel head -> worker over ``atls://`` (``scatter(direct=True)``); the
worker checks their SHA-256 and seals them in its own store (a directory under its 0700 work dir).

Keys (docs/cluster.md "Partition keys")::

    cluster secret = HKDF(kernel platform sealing secret, salt "mesatee-notebook/cluster",
                          info "cluster partitions v1\0cluster secret")
    node secret    = HKDF(cluster secret, salt "mesatee-notebook/cluster",
                          info "cluster partitions v1\0node\0" + worker measurement + "\0" + worker address)
    worker store   = SealedStore(workdir/mesatee-partitions, node secret, the worker's own measurement)

The measurement in the node secret is the one the head verified on its own attested connection to the worker. The
head sends each worker only its node secret, over ``atls://`` (``Client.run``, routed through the attested
scheduler, never written anywhere), and only after admitting it. A worker never sees the cluster secret or another
node's secret. The worker's store is removed when the worker exits, so a partition lives as long as its worker.

Metadata (owner, policy, schema, the partition -> worker map, every digest) stays in the head's sealed dataset
store (``svc/datasets/NAME/meta``, plus a zero-row ``schema`` frame). A load task checks the partition's digest
against the head's metadata before it returns the frame.

The interface the engines use (clustergbdt): :func:`partition_futures`, :func:`is_partitioned`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import pandas as pd
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from mesatee_notebook.enclave.datasets import load_meta, meta_name, validate_dataset_name
from mesatee_notebook.errors import NotFound, PolicyViolation, RemoteExecutionError, TamperedData

if TYPE_CHECKING:
    from distributed import Future

    from mesatee_notebook.enclave.cluster.head import ClusterHead

__all__ = [
    "EncodedPartition",
    "PartitionBook",
    "cluster_secret",
    "drop_dataset",
    "encode_partitions",
    "gather_bytes",
    "gather_frame",
    "is_partitioned",
    "load_partition",
    "node_secret",
    "read_partition",
    "partition_futures",
    "place_frame",
    "ready_partitions",
    "schema_frame",
    "seal_partition",
]

log = logging.getLogger("mesatee.cluster")
_SALT: Final = b"mesatee-notebook/cluster"
_INFO: Final = b"cluster partitions v1\x00"
#: Seconds a placement or a gather waits for the workers before it gives up with RemoteExecutionError.
TASK_TIMEOUT: Final = 120.0
#: Decoded partitions a worker keeps in memory between tasks (most recently used).
CACHED_PARTITIONS: Final = 4


def _hkdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=_SALT, info=_INFO + info).derive(secret)


def cluster_secret(kernel_sealing_secret: bytes) -> bytes:
    """The cluster's sealing secret: derived by the head from its platform sealing secret; it never leaves the head."""
    return _hkdf(bytes(kernel_sealing_secret), b"cluster secret")


def node_secret(cluster: bytes, measurement: str, address: str) -> bytes:
    """One worker's secret: bound to the measurement the head verified for it and to its address."""
    return _hkdf(cluster, b"node\x00" + measurement.encode() + b"\x00" + address.encode())


def schema_name(name: str) -> str:
    return f"svc/datasets/{validate_dataset_name(name)}/schema"


# -- the worker side (tasks: references to this measured module, never code) ------------------------------------

_WORKER: dict[str, Any] = {}
_WORKER_LOCK = threading.Lock()


def install_node_secret(secret: bytes, dask_worker: Any = None) -> str:
    """Run on a worker by ``Client.run``: keep its node secret in memory and open its partition store."""
    from distributed import get_worker

    from mesatee_notebook.enclave.sealing import SealedStore

    worker = dask_worker if dask_worker is not None else get_worker()
    node = getattr(worker.security, "node", None)
    if node is None:
        msg = "this worker is not an attested mesatee cluster node"
        raise PolicyViolation(msg)
    root = Path(worker.local_directory) / "mesatee-partitions"
    with _WORKER_LOCK:
        _WORKER["store"] = SealedStore(root, secret, node.identity.measurement)
    return str(worker.address)


def _store() -> Any:
    with _WORKER_LOCK:
        store = _WORKER.get("store")
    if store is None:
        msg = "this worker holds no partition key (it restarted or the head never installed one)"
        raise NotFound(msg)
    return store


def seal_partition(sealed_as: str, data: bytes | memoryview, sha256: str) -> int:
    """Seal one partition's Arrow bytes in this worker's store after checking their digest; return the size."""
    view = memoryview(data).cast("B")
    if hashlib.sha256(view).hexdigest() != sha256:
        msg = f"partition {sealed_as}: the bytes received do not match the head's digest"
        raise TamperedData(msg)
    _store().put(sealed_as, view)
    return view.nbytes


def load_partition(sealed_as: str, sha256: str) -> pd.DataFrame:
    """Load this worker's partition as a pandas DataFrame, from its sealed store, checked against the head's digest."""
    from mesatee_notebook.wire.codecs import decode_value

    store = _store()
    with _WORKER_LOCK:
        cache: OrderedDict[tuple[str, str], pd.DataFrame] = _WORKER.setdefault("cache", OrderedDict())
        hit = cache.get((sealed_as, sha256))
        if hit is not None:
            cache.move_to_end((sealed_as, sha256))
            return hit
    raw = store.get(sealed_as)
    if hashlib.sha256(raw).hexdigest() != sha256:
        msg = f"partition {sealed_as}: the sealed bytes do not match the digest in the head's metadata"
        raise TamperedData(msg)
    df = decode_value("arrow.frame", raw)
    assert isinstance(df, pd.DataFrame)
    with _WORKER_LOCK:  # decoded partitions stay in memory (never on disk), the most recent few
        cache[(sealed_as, sha256)] = df
        while len(cache) > CACHED_PARTITIONS:
            cache.popitem(last=False)
    return df


def read_partition(sealed_as: str, sha256: str) -> bytes:
    """The partition as this worker's sealed Arrow bytes, checked against the head's digest, not decoded."""
    raw = _store().get(sealed_as)
    if hashlib.sha256(raw).hexdigest() != sha256:
        msg = f"partition {sealed_as}: the sealed bytes do not match the digest in the head's metadata"
        raise TamperedData(msg)
    return bytes(raw)


def delete_partition(sealed_as: str) -> bool:
    with _WORKER_LOCK:
        cache = _WORKER.get("cache", {})
        for key in [k for k in cache if k[0] == sealed_as]:
            del cache[key]
    try:
        _store().delete(sealed_as)
    except NotFound:
        return False
    return True


# -- the head side -------------------------------------------------------------------------------------------


@dataclass
class PartitionBook:
    """What the head needs to place and find partitions: its dataset store and the cluster secret."""

    store: Any
    secret: bytes = field(repr=False)
    installed: dict[str, str] = field(default_factory=dict)  # worker address -> measurement its secret is bound to
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


def _book(head: ClusterHead) -> PartitionBook:
    book: PartitionBook | None = getattr(head, "partitions", None)
    if book is None:
        msg = "this cluster head has no dataset store (serve --cluster on a softtee kernel)"
        raise NotFound(msg)
    return book


def _ensure_secrets(head: ClusterHead, workers: list[str]) -> None:
    """Install a node secret on each worker that has none yet, after verifying it on a fresh attested connection.

    A worker that holds one is not verified again here: every Dask connection to it is attested anyway, and a
    worker restarted at the same address has an empty store, so it can only fail with ``NotFound``.
    """
    book = _book(head)
    with book.lock:
        todo = [w for w in workers if w not in book.installed]
    for record in head.verify_workers(todo) if todo else []:
        secret = node_secret(book.secret, record.measurement, record.address)
        done = head.client.run(install_node_secret, secret, workers=[record.address])
        if done.get(record.address) != record.address:
            msg = f"worker {record.address} did not take its partition key"
            raise RemoteExecutionError(msg)
        with book.lock:
            book.installed[record.address] = record.measurement


def _result(
    futures: list[Any],
    what: str,
    timeout: float = TASK_TIMEOUT,
    head: ClusterHead | None = None,
    workers: Sequence[str] = (),
) -> list[Any]:
    """Gather ``futures``; any failure (a worker died, a digest mismatch) is one typed error, nothing half-used.

    With ``head``, a task whose pinned worker (in ``workers``) leaves the cluster fails at once: Dask would keep it
    waiting for that worker (the tasks run where the data is, ``allow_other_workers=False``).
    """
    deadline = time.monotonic() + timeout
    pinned = set(workers)
    next_check = time.monotonic() + 0.5
    try:
        while not all(f.done() for f in futures):
            now = time.monotonic()
            if now > deadline:
                raise TimeoutError
            if head is not None and pinned and now >= next_check:
                gone = sorted(pinned - set(head._workers()))
                if gone:
                    msg = f"{what}: worker(s) {gone} left the cluster during the tasks; nothing was released"
                    raise RemoteExecutionError(msg)
                next_check = now + 0.5
            time.sleep(0.02)
        # every task is done; a large result (a gathered partition's bytes) may take a while to come over
        return [f.result(timeout=max(1.0, deadline - time.monotonic())) for f in futures]
    except TimeoutError:
        msg = f"{what}: the workers did not answer within {timeout:g} s (a worker died or is stuck)"
        raise RemoteExecutionError(msg) from None
    except RemoteExecutionError:
        raise
    except Exception as exc:  # KilledWorker, CommClosedError, a worker's own error ...
        msg = f"{what} failed on the cluster: {type(exc).__name__}: {exc}"
        raise RemoteExecutionError(msg) from None
    finally:
        for f in futures:
            if not f.done():
                f.cancel()
            f.release()


def split_rows(n_rows: int, n: int) -> list[tuple[int, int]]:
    """``n`` contiguous (offset, rows) ranges covering ``n_rows`` rows, as even as possible."""
    base, extra = divmod(n_rows, n)
    out, offset = [], 0
    for i in range(n):
        rows = base + (1 if i < extra else 0)
        out.append((offset, rows))
        offset += rows
    return out


@dataclass(frozen=True)
class EncodedPartition:
    """One row partition as Arrow IPC bytes (opaque to the head): its row range, its bytes and their SHA-256."""

    offset: int
    rows: int
    data: Any = field(repr=False)  # bytes-like
    sha256: str = ""

    def without_data(self) -> EncodedPartition:
        return replace(self, data=b"")


def encode_partitions(df: pd.DataFrame, n: int) -> list[EncodedPartition]:
    """``df`` split into ``n`` contiguous row ranges, each as Arrow IPC bytes with its digest.

    Run where tenant data may be decoded: the sandboxed ``partition.split`` service (and tests), never the head's
    supervisor, which only places the bytes (:func:`place_frame`).
    """
    from mesatee_notebook.wire.codecs import encode_value

    out = []
    for offset, rows in split_rows(len(df), n):
        part = df.iloc[offset : offset + rows].reset_index(drop=True)
        data = b"".join(encode_value(part).parts)
        out.append(EncodedPartition(offset, rows, data, hashlib.sha256(data).hexdigest()))
    return out


def place_frame(head: ClusterHead, name: str, parts: Sequence[EncodedPartition]) -> list[dict[str, Any]]:
    """Seal each encoded partition on a worker (partition i on worker ``i mod W``); the partition records.

    The bytes are opaque here: the head never decodes them. Each worker checks them against ``sha256`` before it
    seals them, so the records' digests are those of the bytes sealed.
    """
    workers = head._workers()
    if not workers:
        msg = f"the cluster at {head.url} has no workers to hold partitions"
        raise RemoteExecutionError(msg)
    _ensure_secrets(head, workers)
    tag = hashlib.sha256(f"{name}\x00{time.time_ns()}".encode()).hexdigest()[:16]
    records, futures = [], []
    for i, part in enumerate(parts):
        worker = workers[i % len(workers)]
        sealed_as = f"part/{name}/{tag}/{i}"
        [blob] = head.client.scatter([part.data], workers=[worker], direct=True, hash=False)
        futures.append(head.submit_to(worker, seal_partition, sealed_as, blob, part.sha256))
        blob.release()
        records.append(
            {
                "index": i,
                "worker": worker,
                "offset": part.offset,
                "rows": part.rows,
                "sha256": part.sha256,
                "sealed_as": sealed_as,
            }
        )
    try:
        sizes = _result(futures, f"placing the {len(records)} partitions of {name!r}", head=head, workers=workers)
    except RemoteExecutionError:
        _forget(head, records)  # no metadata is written: drop what the live workers did seal
        raise
    for rec, size in zip(records, sizes, strict=True):
        rec["bytes"] = int(size)
    return records


def _forget(head: ClusterHead, records: list[dict[str, Any]]) -> None:
    """Best effort: delete these partitions on the workers still alive (a failed placement)."""
    live = set(head._workers())
    futures = [
        head.submit_to(str(r["worker"]), delete_partition, str(r["sealed_as"]))
        for r in records
        if str(r["worker"]) in live
    ]
    try:
        _result(futures, "dropping the partitions of a failed placement", timeout=30)
    except RemoteExecutionError as exc:
        log.warning("cluster head: %s", exc)


def partitions_digest(records: list[dict[str, Any]]) -> str:
    """SHA-256 over the partitions' digests in order: what the receipt binds besides the whole frame's digest."""
    h = hashlib.sha256()
    for rec in records:
        h.update(bytes.fromhex(str(rec["sha256"])))
    return h.hexdigest()


def partitioned_meta(head: ClusterHead, name: str) -> dict[str, Any]:
    meta = load_meta(_book(head).store, name)
    if "partitions" not in meta:
        msg = f"dataset {name!r} is not partitioned (it lives in the head's store)"
        raise NotFound(msg, dataset=name)
    return meta


def ready_partitions(head: ClusterHead, dataset_id: str) -> dict[str, Any]:
    """The dataset's metadata, once every worker holding a partition is alive, verified and holds its key."""
    meta = partitioned_meta(head, dataset_id)
    workers = sorted({str(p["worker"]) for p in meta["partitions"]})
    live = set(head._workers())
    gone = [w for w in workers if w not in live]
    if gone:
        msg = (
            f"dataset {dataset_id!r}: partitions were on worker(s) {gone}, which left the cluster "
            "(a partition lives as long as its worker); upload it again"
        )
        raise RemoteExecutionError(msg)
    _ensure_secrets(head, workers)
    return meta


def partition_futures(head: ClusterHead, dataset_id: str) -> list[Future]:
    """One future per partition, in row order, each resolving in its worker to that partition as a DataFrame.

    The frame is loaded from the worker's sealed store, its digest checked against the head's metadata.

    The caller must keep the data on the cluster (run tasks on the futures); gathering them to the head is what
    :func:`gather_frame` does, for the head's own evaluators only. Nothing here checks a policy: the engine that
    releases a result does (docs/cluster.md).
    """
    meta = ready_partitions(head, dataset_id)
    return [
        head.submit_to(
            str(p["worker"]),
            load_partition,
            str(p["sealed_as"]),
            str(p["sha256"]),
            key=f"mesatee-part-{dataset_id}-{p['index']}-{time.time_ns()}",
        )
        for p in meta["partitions"]
    ]


def gather_frame(head: ClusterHead, dataset_id: str) -> pd.DataFrame:
    """The whole dataset in the head (over atls://), for plans that do not decompose; row order kept."""
    workers = [str(p["worker"]) for p in partitioned_meta(head, dataset_id)["partitions"]]
    parts = _result(
        partition_futures(head, dataset_id), f"gathering dataset {dataset_id!r}", head=head, workers=workers
    )
    return pd.concat(parts, ignore_index=True) if parts else schema_frame(_book(head).store, dataset_id)


def gather_bytes(head: ClusterHead, dataset_id: str) -> list[bytes]:
    """Every partition's Arrow bytes in row order, gathered to the head (over atls://) as opaque bytes.

    Each is checked against its digest by its worker and again here; nothing is decoded (a sandboxed worker
    joins them: ``cluster/split.join_partitions``).
    """
    meta = ready_partitions(head, dataset_id)
    futures = [
        head.submit_to(str(p["worker"]), read_partition, str(p["sealed_as"]), str(p["sha256"]))
        for p in meta["partitions"]
    ]
    workers = [str(p["worker"]) for p in meta["partitions"]]
    raws = _result(futures, f"gathering dataset {dataset_id!r}", head=head, workers=workers)
    for raw, p in zip(raws, meta["partitions"], strict=True):
        if hashlib.sha256(raw).hexdigest() != p["sha256"]:
            msg = f"dataset {dataset_id!r}: partition {p['index']} came with bytes that do not match its digest"
            raise TamperedData(msg)
    return [bytes(r) for r in raws]


def schema_frame(store: Any, name: str) -> pd.DataFrame:
    """The zero-row frame with the dataset's columns and dtypes (kept in the head's store)."""
    from mesatee_notebook.wire.codecs import decode_value

    df = decode_value("arrow.frame", store.get(schema_name(name)))
    assert isinstance(df, pd.DataFrame)
    return df


def drop_dataset(head: ClusterHead, name: str) -> None:
    """Delete every partition on its worker (those still alive), then the head's metadata."""
    book = _book(head)
    meta = partitioned_meta(head, name)
    live = set(head._workers())
    futures = [
        head.submit_to(str(p["worker"]), delete_partition, str(p["sealed_as"]))
        for p in meta["partitions"]
        if str(p["worker"]) in live
    ]
    _result(futures, f"deleting the partitions of {name!r}")
    book.store.delete(schema_name(name))
    book.store.delete(meta_name(name))


def write_meta(store: Any, name: str, meta: dict[str, Any], schema: bytes) -> None:
    store.put(schema_name(name), schema)
    store.put(meta_name(name), json.dumps(meta).encode())


def is_partitioned(kernel_or_store: Any, dataset_id: str) -> bool:
    """Whether ``dataset_id`` is a partitioned dataset: pass the kernel, the ClusterHead or the head's store."""
    store: Any = kernel_or_store
    book = getattr(kernel_or_store, "partitions", None)
    head = getattr(kernel_or_store, "cluster_head", None)
    if head is not None:
        book = getattr(head, "partitions", None)
    if isinstance(book, PartitionBook):
        store = book.store
    elif hasattr(kernel_or_store, "sealed_store") and callable(kernel_or_store.sealed_store):
        store = kernel_or_store.sealed_store()
    try:
        meta = load_meta(store, dataset_id)
    except (NotFound, ValueError):
        return False
    return "partitions" in meta
