"""Sharded PSI on the cluster (issue 18, "Engines on the cluster").

Every input is a list of chunks on workers: the partitions of a partitioned dataset's column, or items the head
scattered. Per chunk, in its worker, the items are canonicalised and hashed with the job's :class:`PsiKey` (the
same keyed 128-bit hash as single-node PSI, ``ml/psi.py``) and bucketed into S shards by a prefix of the key
(``(high word >> 32) mod S``). Shard s of every party moves to worker ``s mod W`` over ``atls://`` and is
intersected there, exactly, with the single-node engine's intersection. An item always hashes to the same shard,
so the per-shard distinct counts add up and the shards' matched rows are disjoint. The head adds the counts and,
in ``intersection`` mode, orders the items by their first row in the first input, as single-node PSI does.

The key secret is fresh per run and goes to the workers inside their tasks, over ``atls://``.
"""

from __future__ import annotations

import json
import operator
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import pandas as pd

from mesatee_notebook.enclave.cluster.partitions import _result, load_partition, ready_partitions
from mesatee_notebook.enclave.datasets import load_meta
from mesatee_notebook.errors import EncodingError, NotAvailableYet, NotFound, PolicyViolation, RemoteExecutionError

if TYPE_CHECKING:
    from distributed import Future

    from mesatee_notebook.enclave.cluster.head import ClusterHead
    from mesatee_notebook.enclave.supervisor import Kernel

__all__ = ["MODES", "ShardedPsi", "dataset_chunks", "item_chunks", "job_psi", "psi_call", "sharded_psi"]

MODES: Final = ("cardinality", "intersection")


def column_items(sealed_as: str, sha256: str, column: str) -> pd.Series:
    """A task: one partition's item column, in the worker holding it."""
    df = load_partition(sealed_as, sha256)
    if column not in df.columns:
        msg = f"the dataset has no column {column!r}"
        raise EncodingError(msg)
    return df[column].reset_index(drop=True)


def hash_buckets(items: Any, secret: bytes, shards: int, first_row: int, keep_items: bool) -> list[dict[str, Any]]:
    """A task: hash one chunk's items and split (key, global row[, item]) into ``shards`` buckets by key prefix."""
    from mesatee_notebook.ml.psi import PsiKey, hash_items

    series = items if isinstance(items, pd.Series) else pd.Series(items)
    hi, lo = hash_items(series, PsiKey(secret))
    shard = ((hi >> np.uint64(32)) % np.uint64(shards)).astype(np.int64)
    rows = np.arange(first_row, first_row + len(series), dtype=np.int64)
    out = []
    for s in range(shards):
        sel = np.flatnonzero(shard == s)
        bucket: dict[str, Any] = {"hi": hi[sel], "lo": lo[sel], "rows": rows[sel]}
        if keep_items:
            bucket["items"] = series.iloc[sel].reset_index(drop=True)
        out.append(bucket)
    return out


def intersect_shard(*parties: list[dict[str, Any]]) -> dict[str, Any]:
    """A task, on the shard's worker: intersect one shard of every party exactly (the single-node engine)."""
    from mesatee_notebook.ml.psi import _intersect_keys

    keys, first = [], parties[0]
    for pieces in parties:
        keys.append(
            (np.concatenate([p["hi"] for p in pieces]), np.concatenate([p["lo"] for p in pieces]))
            if pieces
            else (np.empty(0, np.uint64), np.empty(0, np.uint64))
        )
    rows_wanted = "items" in first[0] if first else False
    match = _intersect_keys(keys, rows=rows_wanted)
    out: dict[str, Any] = {"count": int(match.count)}
    if rows_wanted:
        rows = np.concatenate([p["rows"] for p in first])
        items = pd.concat([p["items"] for p in first], ignore_index=True)
        out["rows"] = rows[match.first_rows]
        out["items"] = items.iloc[match.first_rows].reset_index(drop=True)
    return out


class ShardedPsi:
    """One sharded PSI run: chunks per party, the shards, and what the head combines."""

    def __init__(self, head: ClusterHead, mode: str = "cardinality", shards: int | None = None) -> None:
        if mode not in MODES:
            msg = f"unknown sharded PSI mode {mode!r}; expected one of {list(MODES)}"
            raise EncodingError(msg)
        self.head = head
        self.mode = mode
        self.workers = head._workers()
        if not self.workers:
            msg = f"the cluster at {head.url} has no workers"
            raise RemoteExecutionError(msg)
        self.shards = shards or len(self.workers)
        self.secret = os.urandom(32)

    def buckets(self, chunks: Sequence[tuple[Future, str, int]], keep_items: bool) -> list[list[Future]]:
        """Per shard, this party's bucket futures (each stays on its chunk's worker until the shard needs it)."""
        per_shard: list[list[Future]] = [[] for _ in range(self.shards)]
        for chunk, worker, first_row in chunks:
            b = self.head.submit_to(worker, hash_buckets, chunk, self.secret, self.shards, first_row, keep_items)
            for s in range(self.shards):
                per_shard[s].append(self.head.submit_to(worker, operator.getitem, b, s))
        return per_shard

    def run(self, parties: Sequence[Sequence[tuple[Future, str, int]]]) -> dict[str, Any]:
        if len(parties) < 2:
            msg = f"a PSI needs at least two parties' inputs, got {len(parties)}"
            raise PolicyViolation(msg)
        rows = self.mode == "intersection"
        per_party = [self.buckets(chunks, keep_items=rows and k == 0) for k, chunks in enumerate(parties)]
        tasks = [
            self.head.submit_to(self.workers[s % len(self.workers)], intersect_shard, *[p[s] for p in per_party])
            for s in range(self.shards)
        ]
        results = _result(tasks, f"sharded PSI over {self.shards} shards", head=self.head, workers=self.workers)
        out: dict[str, Any] = {"mode": self.mode, "cardinality": sum(r["count"] for r in results)}
        out["shards"] = [{"shard": s, "worker": self.workers[s % len(self.workers)], "count": r["count"]}
                         for s, r in enumerate(results)]  # fmt: skip
        if rows:
            found = [r for r in results if len(r["rows"])]
            if found:
                all_rows = np.concatenate([r["rows"] for r in found])
                items = pd.concat([r["items"] for r in found], ignore_index=True)
                out["items"] = items.iloc[np.argsort(all_rows, kind="stable")].reset_index(drop=True).rename("item")
            else:
                out["items"] = pd.Series([], dtype=object, name="item")
        return out


def item_chunks(head: ClusterHead, items: Any) -> list[tuple[Future, str, int]]:
    """Items held by the head, split into one chunk per worker and scattered to them over atls://."""
    series = pd.Series(items).reset_index(drop=True)
    workers = head._workers()
    out, start = [], 0
    for w, part in zip(workers, np.array_split(np.arange(len(series)), len(workers)), strict=False):
        chunk = series.iloc[part].reset_index(drop=True)
        [fut] = head.client.scatter([chunk], workers=[w], direct=True, hash=False)
        out.append((fut, w, start))
        start += len(chunk)
    return out


def dataset_chunks(head: ClusterHead, name: str, column: str) -> list[tuple[Future, str, int]]:
    """A partitioned dataset's column: one chunk per partition, read in the worker that holds it."""
    meta = ready_partitions(head, name)
    return [
        (
            head.submit_to(str(p["worker"]), column_items, str(p["sealed_as"]), str(p["sha256"]), column),
            str(p["worker"]),
            int(p["offset"]),
        )
        for p in meta["partitions"]
    ]


def sharded_psi(
    head: ClusterHead, parties: Sequence[Sequence[tuple[Future, str, int]]], mode: str = "cardinality"
) -> dict[str, Any]:
    """Sharded PSI over the parties' chunks (:func:`item_chunks`, :func:`dataset_chunks`)."""
    return ShardedPsi(head, mode).run(parties)


def _allowed(meta: dict[str, Any], party: str) -> bool:
    return party == meta["owner"] or party in (meta.get("policy") or {}).get("code_access", [])


def psi_call(kernel: Kernel, head: ClusterHead, party: str, header: dict[str, Any]) -> dict[str, Any]:
    """``cluster.psi {mode, inputs: {label: {dataset, column}}}`` over partitioned datasets.

    The caller must own every dataset or hold code access to it (the owners' grant of raw access). Several
    parties' datasets under their approvals (``psi.create``/``submit``/``approve`` on the cluster) are not built
    yet (docs/cluster.md).
    """
    assert head.partitions is not None
    args = header.get("args") or {}
    inputs = args.get("inputs")
    if not isinstance(inputs, dict) or len(inputs) < 2:
        msg = "cluster.psi needs inputs {label: {dataset, column}} for at least two inputs"
        raise EncodingError(msg)
    chunks = []
    for label, src in inputs.items():
        if not isinstance(src, dict):
            msg = f"cluster.psi input {label!r} must be {{dataset, column}}"
            raise EncodingError(msg)
        name = str(src.get("dataset", ""))
        meta = load_meta(head.partitions.store, name)
        if "partitions" not in meta:
            msg = f"dataset {name!r} is not partitioned: use the psi.* services for it"
            raise NotFound(msg, dataset=name)
        if not _allowed(meta, party):
            kernel.audit_log.append(
                "refusal",
                party,
                {"dataset": name, "reason": "cluster.psi without code access"},
                concerns=[meta["owner"]],
            )
            msg = (
                f"cluster.psi over dataset {name!r} needs its owner or code access; PSI between parties under "
                "approvals is not available on the cluster yet (docs/cluster.md)"
            )
            raise PolicyViolation(msg, dataset=name)
        chunks.append(dataset_chunks(head, name, str(src.get("column", ""))))
    out = sharded_psi(head, chunks, str(args.get("mode", "cardinality")))
    owners = sorted({str(load_meta(head.partitions.store, str(v["dataset"]))["owner"]) for v in inputs.values()})
    details = {"event": "cluster.psi", "mode": out["mode"], "cardinality": out["cardinality"],
               "datasets": sorted({str(v["dataset"]) for v in inputs.values()})}  # fmt: skip
    kernel.audit_log.append("query", party, details, concerns=owners)
    items = out.pop("items", None)
    if items is not None:
        out["items"] = [x.item() if hasattr(x, "item") else x for x in items.tolist()]
    return out


def _arrow_items(raw: Any) -> pd.Series:
    import pyarrow as pa

    try:
        table = pa.ipc.open_stream(pa.py_buffer(raw)).read_all()
    except (pa.ArrowInvalid, TypeError):
        msg = "a PSI job's items for the cluster must be an Arrow IPC stream"
        raise EncodingError(msg) from None
    if table.column_names != ["item"]:
        msg = "a PSI job's items stream must have exactly one column, 'item'"
        raise EncodingError(msg)
    series: pd.Series = table.column("item").to_pandas()
    return series


def job_psi(kernel: Kernel, party: str, mode: str, payloads: Sequence[Any]) -> bytes:
    """A ``psi.*`` job's intersection on the cluster, for the jobs worker (``psi.create(..., cluster=True)``).

    The jobs worker keeps the approvals, the sealed inputs, the receipts and the release to the receivers, as on
    one node; it sends the approved inputs' items here (one Arrow stream each) once the job may run. The head
    scatters them to the workers and runs :class:`ShardedPsi`; the JSON reply holds the mode, the cardinality,
    the items (``intersection``) and the workers that took part, with the measurements the head verified.
    """
    from mesatee_notebook.enclave.cluster.admission import lane_of

    head: ClusterHead | None = getattr(kernel, "cluster_head", None)
    if head is None:
        msg = "psi.create(..., cluster=True) needs a cluster: this kernel is not a cluster head (serve --cluster)"
        raise NotAvailableYet(msg)
    if mode not in ("intersection", "cardinality"):
        msg = f"a PSI on the cluster runs mode 'intersection' or 'cardinality', not {mode!r}"
        raise EncodingError(msg)
    if len(payloads) < 2:
        msg = f"a PSI needs at least two parties' inputs, got {len(payloads)}"
        raise EncodingError(msg)
    inputs = [_arrow_items(p) for p in payloads]
    with lane_of(kernel).turn(party):
        out = sharded_psi(head, [item_chunks(head, items) for items in inputs], mode)
        workers = sorted({str(s["worker"]) for s in out.get("shards", [])})
        records = [r.to_dict() for r in head.verify_workers(workers)]
    reply: dict[str, Any] = {"mode": out["mode"], "cardinality": int(out["cardinality"]), "workers": records}
    items = out.get("items")
    if items is not None:
        reply["items"] = [x.item() if hasattr(x, "item") else x for x in items.tolist()]
    return json.dumps(reply).encode()
