"""``cluster.upload`` and the other dataset calls on partitioned datasets, served by the head in the supervisor.

``Session.upload(df, name, partitions=N)`` calls ``cluster.upload``. The supervisor reads only the call's header:
a sandboxed split worker (:mod:`.split`) decodes the frame, checks it as ``dataset.upload`` does, splits, encodes and
digests it; the head then checks ownership and ``replace``, places the opaque partition bytes (:mod:`.partitions`)
and writes the metadata to its own sealed store. The reply's ``info`` (bound by the receipt) holds the whole frame's
digest, one digest per partition, the digest over those, and the workers that hold them with the measurements the
head verified.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final, NoReturn

from mesatee_notebook.enclave.cluster.admission import ledger_name
from mesatee_notebook.enclave.cluster.partitions import (
    drop_dataset,
    partitioned_meta,
    partitions_digest,
    place_frame,
    write_meta,
)
from mesatee_notebook.enclave.datasets import load_meta, validate_dataset_name
from mesatee_notebook.errors import EncodingError, NotAvailableYet, NotFound, PolicyViolation
from mesatee_notebook.wire.datapolicy import DataPolicy

if TYPE_CHECKING:
    from mesatee_notebook.enclave.cluster.head import ClusterHead
    from mesatee_notebook.enclave.supervisor import Kernel

__all__ = [
    "AUTO_PARTITION_BYTES",
    "MAX_PARTITIONS",
    "auto_partition_header",
    "cell_dataset",
    "cluster_delete",
    "cluster_upload",
    "input_spec",
]

MAX_PARTITIONS: Final = 1024
#: A plain ``upload`` whose Arrow data is at least this big is partitioned across the workers (``serve --cluster
#: URL --auto-partition-mb M``; 0 turns it off).
AUTO_PARTITION_BYTES: Final = 1 << 30
#: Seconds the sandboxed split of an upload may take when the call names no timeout.
UPLOAD_TIMEOUT: Final = 600.0


def input_spec(header: dict[str, Any]) -> dict[str, Any]:
    """The spec of the call's input ``data``, from the header only (Arrow only: pickle is never sent on).

    The bytes are not read here: the head's supervisor never decodes tenant data (:mod:`.split` does, sandboxed).
    """
    specs = [s for s in header.get("inputs", []) if isinstance(s, dict) and s.get("name") == "data"]
    if len(specs) != 1 or specs[0].get("kind") != "arrow.frame":
        msg = "cluster.upload needs one pandas DataFrame as input 'data'"
        raise EncodingError(msg)
    return dict(specs[0])


def _data_bytes(header: dict[str, Any], payloads: Sequence[Any], fds: Sequence[int]) -> int | None:
    """Bytes of the call's Arrow input ``data`` as received (None: no such input, or it is not Arrow)."""
    import os

    specs = [s for s in header.get("inputs", []) if isinstance(s, dict) and s.get("name") == "data"]
    if len(specs) != 1 or specs[0].get("kind") != "arrow.frame":
        return None
    spec = specs[0]
    try:
        if "fd" in spec:
            return os.fstat(fds[int(spec["fd"])]).st_size
        return len(payloads[int(spec["inline"])])
    except (IndexError, KeyError, ValueError, TypeError, OSError):
        return None  # the upload itself reports the malformed reference


def auto_partition_header(
    head: ClusterHead, header: dict[str, Any], payloads: Sequence[Any], fds: Sequence[int]
) -> dict[str, Any] | None:
    """A ``dataset.upload`` big enough to partition, as the ``cluster.upload`` header to serve it; None: not one.

    At least ``head.auto_partition_bytes`` of Arrow data becomes ``max(workers, ceil(bytes / threshold))``
    partitions (at most :data:`MAX_PARTITIONS`): every worker holds a share and none more than the threshold. The
    policy, quota, replace and ownership checks are those of ``cluster.upload``; the receipt's info names the
    partitions, so the owner sees where the data went.
    """
    threshold = head.auto_partition_bytes
    args = header.get("args")
    if threshold <= 0 or head.partitions is None or not isinstance(args, dict) or "partitions" in args:
        return None
    size = _data_bytes(header, payloads, fds)
    if size is None or size < threshold:
        return None
    workers = head._workers()
    if not workers:
        return None  # nothing to spread over: the upload stays on the head, as on one node
    n = min(MAX_PARTITIONS, max(len(workers), -(-size // threshold)))
    return {**header, "service": "cluster.upload", "args": {**args, "partitions": n}}


def _partitions_arg(args: dict[str, Any]) -> int:
    n = args.get("partitions")
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_PARTITIONS:
        msg = f"partitions must be an integer in [1, {MAX_PARTITIONS}], not {n!r}"
        raise EncodingError(msg)
    return n


def _check_replace(kernel: Kernel, head: ClusterHead, party: str, name: str, replace: bool) -> dict[str, Any] | None:
    assert head.partitions is not None
    try:
        old = load_meta(head.partitions.store, name)
    except NotFound:
        return None
    if old["owner"] != party:
        kernel.audit_log.append(
            "refusal", party, {"dataset": name, "reason": "name owned by another party"}, concerns=[old["owner"]]
        )
        msg = f"dataset {name!r} belongs to another party; choose another name"
        raise PolicyViolation(msg, dataset=name)
    if not replace:
        msg = f"dataset {name!r} already exists; pass replace=True to overwrite it"
        raise PolicyViolation(msg, dataset=name)
    return old


def refuse_plain_upload(kernel: Kernel, head: ClusterHead, party: str, name: str) -> NoReturn:
    """``dataset.upload`` (one node) over a partitioned dataset's name: refused, so no partitions are orphaned.

    The single-node store cannot see the partitions, so replacing them there would leave the old rows sealed on
    the workers; the owner re-uploads with ``partitions=N`` (and ``replace=True``) or deletes the dataset first.
    """
    _check_replace(kernel, head, party, name, replace=True)  # another party's name: refused as on one node
    msg = (
        f"dataset {name!r} is partitioned on the cluster; upload it again with partitions=N and replace=True, "
        "or delete it first"
    )
    raise PolicyViolation(msg, dataset=name)


def cluster_upload(
    kernel: Kernel,
    head: ClusterHead,
    party: str,
    header: dict[str, Any],
    payloads: Sequence[Any],
    fds: list[int],
    timeout: float = UPLOAD_TIMEOUT,
) -> dict[str, Any]:
    """Partition the input frame across the workers; the info the receipt binds.

    The frame is decoded, checked, split, encoded and digested in a sandboxed worker (:func:`.split.split_upload`,
    which takes over ``fds``); the supervisor only places the bytes it returns. The partitions' bytes count in the
    owner's ``sealed_bytes`` quota (under the dataset's data name, as a single-node dataset's Arrow data does): the
    quota is checked, and the bytes reserved, before any partition is placed, so a party over its quota moves
    nothing to the workers (``QuotaExceeded``, ``limit="sealed_bytes"``).
    """
    from mesatee_notebook.enclave.cluster.split import split_upload

    args = dict(header.get("args") or {})
    name = validate_dataset_name(str(args.get("name", "")))
    n = _partitions_arg(args)
    spec = input_spec(header)
    split = split_upload(kernel, head, party, spec, payloads, fds, {**args, "partitions": n}, timeout)
    try:
        policy = DataPolicy.from_dict(dict(args.get("policy") or {}))  # JSON only; the worker checked it on the frame
        old = _check_replace(kernel, head, party, name, bool(args.get("replace")))
        assert head.partitions is not None
        size = split.size
        placed: list[list[dict[str, Any]]] = []

        def place() -> None:
            records = place_frame(head, name, split.partitions)
            if old is not None:  # the new partitions are sealed: now drop the old ones (or the unpartitioned data)
                _drop_old(head, name, old)
            placed.append(records)

        kernel.quotas.seal(kernel.quotas.holder(party), ledger_name(name), size, place)
    finally:
        split.release()
    records = placed[0]
    meta = {
        "name": name,
        "owner": party,
        "policy": policy.to_dict(),
        "columns": split.columns,
        "rows": split.rows,
        "sha256": split.sha256,
        "created": time.time(),
        "partitions": records,
        "partitions_sha256": partitions_digest(records),
    }
    write_meta(head.partitions.store, name, meta, split.schema)
    kernel.audit_log.append(
        "upload",
        party,
        {"dataset": name, "rows": split.rows, "sha256": split.sha256, "partitions": n},
        concerns=[party],
    )
    workers = {r.address: r.to_dict() for r in head.verify_workers(sorted({str(p["worker"]) for p in records}))}
    return {
        "name": name,
        "owner": party,
        "columns": meta["columns"],
        "hidden": [],
        "policy": meta["policy"],
        "rows": split.rows,
        "sha256": split.sha256,
        "bytes": size,
        "partitions": [{k: v for k, v in p.items() if k != "sealed_as"} for p in records],
        "partitions_sha256": meta["partitions_sha256"],
        "workers": list(workers.values()),
    }


def _drop_old(head: ClusterHead, name: str, old: dict[str, Any]) -> None:
    """Drop the dataset being replaced: its partitions, or its unpartitioned data in the head's store.

    Its quota entry (the same ledger name) is taken over by the new upload's reservation.
    """
    if "partitions" in old:
        drop_dataset(head, name)
        return
    assert head.partitions is not None
    try:
        head.partitions.store.delete(ledger_name(name))
    except NotFound:
        pass


def cluster_delete(kernel: Kernel, head: ClusterHead, party: str, name: str) -> dict[str, Any]:
    """``dataset.delete`` of a partitioned dataset (owner only): partitions on the workers, then the metadata."""
    meta = partitioned_meta(head, name)
    if meta["owner"] != party:
        kernel.audit_log.append(
            "refusal", party, {"dataset": name, "reason": "delete by non-owner"}, concerns=[meta["owner"]]
        )
        msg = f"only the owner may delete dataset {name!r}"
        raise PolicyViolation(msg, dataset=name)
    drop_dataset(head, name)
    kernel.quotas.unseal(ledger_name(name), lambda: None)  # after the slow part: unseal holds the quota lock
    kernel.audit_log.append("upload", party, {"dataset": name, "deleted": True}, concerns=[party])
    return {"deleted": name}


def cell_dataset(kernel: Kernel, name: str, party: str) -> bytes:
    """A partitioned dataset's Arrow bytes for a code cell, after ``broker.dataset_for_cell``'s policy check.

    The partitions' bytes are gathered to the head over ``atls://`` (each checked against its digest in the head's
    metadata), in the party's fair turn on the cluster, and joined into one Arrow stream by a sandboxed split worker
    (:func:`.split.join_partitions`): the supervisor never decodes them. The cell's sandbox gets what a single-node
    dataset's bytes would be. The whole dataset must fit in the head's and the cell's memory. On a kernel that is not
    (or no longer) a cluster head, the cell gets a typed refusal saying so.
    """
    from mesatee_notebook.enclave.cluster.admission import lane_of
    from mesatee_notebook.enclave.cluster.partitions import gather_bytes, schema_name
    from mesatee_notebook.enclave.cluster.split import join_partitions

    head: ClusterHead | None = getattr(kernel, "cluster_head", None)
    if head is None or head.partitions is None:
        msg = (
            f"dataset {name!r} is partitioned on a cluster, and this kernel is not its cluster head "
            "(serve it with --cluster atls://HOST:PORT)"
        )
        raise NotAvailableYet(msg)
    with lane_of(kernel).turn(party):
        parts = gather_bytes(head, name)
        if not parts:  # no partition: the zero-row schema frame the head keeps (opaque bytes too)
            return bytes(head.partitions.store.get(schema_name(name)))
        return join_partitions(kernel, head, party, parts, UPLOAD_TIMEOUT)
