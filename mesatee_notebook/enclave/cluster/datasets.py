"""``cluster.upload`` and the other dataset calls on partitioned datasets, served by the head in the supervisor.

``Session.upload(df, name, partitions=N)`` calls ``cluster.upload``. The head checks the policy as
``dataset.upload`` does, places the partitions (:mod:`.partitions`) and writes the metadata to its own sealed
store. The reply's ``info`` (bound by the receipt) holds the whole frame's digest, one digest per partition, the
digest over those, and the workers that hold them with the measurements the head verified.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

import pandas as pd

from mesatee_notebook.enclave.cluster.partitions import (
    drop_dataset,
    partitioned_meta,
    partitions_digest,
    place_frame,
    write_meta,
)
from mesatee_notebook.enclave.datasets import load_meta, validate_dataset_name
from mesatee_notebook.enclave.services.datasets import upload_policy
from mesatee_notebook.errors import EncodingError, MalformedFrame, NotFound, PolicyViolation
from mesatee_notebook.wire.codecs import decode_value, encode_value

if TYPE_CHECKING:
    from mesatee_notebook.enclave.cluster.head import ClusterHead
    from mesatee_notebook.enclave.supervisor import Kernel

__all__ = ["MAX_PARTITIONS", "cluster_delete", "cluster_upload", "input_frame"]

MAX_PARTITIONS: Final = 1024


def input_frame(header: dict[str, Any], payloads: Sequence[Any], fds: Sequence[int]) -> pd.DataFrame:
    """The call's input ``data`` as a DataFrame (Arrow only: pickle is never decoded in the supervisor)."""
    from mesatee_notebook.enclave.shm import map_fd

    specs = [s for s in header.get("inputs", []) if isinstance(s, dict) and s.get("name") == "data"]
    if len(specs) != 1 or specs[0].get("kind") != "arrow.frame":
        msg = "cluster.upload needs one pandas DataFrame as input 'data'"
        raise EncodingError(msg)
    spec = specs[0]
    try:
        buf = map_fd(fds[int(spec["fd"])]) if "fd" in spec else payloads[int(spec["inline"])]
    except (IndexError, KeyError, ValueError):
        msg = "cluster.upload: the input 'data' refers to a missing payload"
        raise MalformedFrame(msg) from None
    df = decode_value("arrow.frame", buf, meta=spec.get("meta"))
    if not isinstance(df, pd.DataFrame):
        msg = "cluster.upload needs a pandas DataFrame as input 'data'"
        raise EncodingError(msg)
    return df


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


def cluster_upload(
    kernel: Kernel, head: ClusterHead, party: str, header: dict[str, Any], payloads: Sequence[Any], fds: Sequence[int]
) -> dict[str, Any]:
    """Partition the input frame across the workers; the info the receipt binds."""
    args = dict(header.get("args") or {})
    name = validate_dataset_name(str(args.get("name", "")))
    n = _partitions_arg(args)
    df = input_frame(header, payloads, fds).reset_index(drop=True)
    policy = upload_policy(args, df)
    old = _check_replace(kernel, head, party, name, bool(args.get("replace")))
    assert head.partitions is not None
    whole = hashlib.sha256(b"".join(encode_value(df).parts)).hexdigest()
    records = place_frame(head, name, df, n)
    if old is not None:  # the new partitions are sealed: now drop the old ones (or the unpartitioned data)
        _drop_old(kernel, head, name, old)
    meta = {
        "name": name,
        "owner": party,
        "policy": policy.to_dict(),
        "columns": [[str(c), str(t)] for c, t in df.dtypes.items()],
        "rows": len(df),
        "sha256": whole,
        "created": time.time(),
        "partitions": records,
        "partitions_sha256": partitions_digest(records),
    }
    write_meta(head.partitions.store, name, meta, b"".join(encode_value(df.iloc[:0]).parts))
    kernel.audit_log.append(
        "upload", party, {"dataset": name, "rows": len(df), "sha256": whole, "partitions": n}, concerns=[party]
    )
    workers = {r.address: r.to_dict() for r in head.verify_workers(sorted({str(p["worker"]) for p in records}))}
    return {
        "name": name,
        "owner": party,
        "columns": meta["columns"],
        "hidden": [],
        "policy": meta["policy"],
        "rows": len(df),
        "sha256": whole,
        "partitions": [{k: v for k, v in p.items() if k != "sealed_as"} for p in records],
        "partitions_sha256": meta["partitions_sha256"],
        "workers": list(workers.values()),
    }


def _drop_old(kernel: Kernel, head: ClusterHead, name: str, old: dict[str, Any]) -> None:
    from mesatee_notebook.enclave.datasets import data_name

    if "partitions" in old:
        drop_dataset(head, name)
        return
    store = kernel.sealed_store()
    try:
        store.delete(data_name(name))
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
    kernel.audit_log.append("upload", party, {"dataset": name, "deleted": True}, concerns=[party])
    return {"deleted": name}
