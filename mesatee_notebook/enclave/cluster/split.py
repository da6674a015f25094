"""The head's side of a partitioned upload's split: tenant bytes go to a sandboxed worker, opaque bytes come back.

The cluster head's supervisor holds the platform key, the sealing secret and the Dask client, and has no sandbox,
so it never decodes an upload. :func:`split_upload` hands the payload (its memfd, or the inline bytes) to a worker
of the head's own service pool (:func:`split_pool`: the same bubblewrap + seccomp + Landlock sandbox, limits and
watch as every service worker), which runs ``partition.split`` (``enclave/services/partition.py``). What comes
back is checked for shape only (row ranges, sizes, digests as hex): the partitions' Arrow bytes stay opaque and go
to the cluster's workers as they are. A worker that fails, dies, overruns its memory or stalls past the call's
timeout (it is then killed) is a typed error for that party alone; nothing is placed and no quota is taken.
"""

from __future__ import annotations

import mmap
import os
import re
import secrets
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from mesatee_notebook.enclave.cluster.partitions import EncodedPartition
from mesatee_notebook.errors import EncodingError, MalformedFrame, MesateeError, RemoteTimeout

if TYPE_CHECKING:
    from collections.abc import Sequence

    from mesatee_notebook.enclave.cluster.head import ClusterHead
    from mesatee_notebook.enclave.service_pool import ServicePool
    from mesatee_notebook.enclave.sessions import ExecutorHandle
    from mesatee_notebook.enclave.supervisor import Kernel
    from mesatee_notebook.wire.stream import Message

__all__ = ["SplitUpload", "close_split_pool", "gathered_collect", "join_partitions", "split_pool", "split_upload"]

#: Workers in the head's split pool: as many as cluster calls run at once (admission.CLUSTER_SLOTS).
SPLIT_WORKERS: Final = 2
_HEX64 = re.compile(r"[0-9a-f]{64}")
_POOL_LOCK = threading.Lock()
_STARTS = threading.local()  # whether this thread's worker start failed (the payload's fds were then not sent)


@dataclass
class SplitUpload:
    """What the split worker returned: the public facts of the frame and its partitions as opaque bytes."""

    sha256: str
    rows: int
    columns: list[list[str]]
    schema: bytes
    partitions: list[EncodedPartition] = field(repr=False)
    buffer: Any = field(default=None, repr=False)

    @property
    def size(self) -> int:
        return sum(memoryview(p.data).nbytes for p in self.partitions)

    def release(self) -> None:
        """Let go of the partitions' bytes (after placement, or on a failure)."""
        self.partitions = [p.without_data() for p in self.partitions]
        buf, self.buffer = self.buffer, None
        if isinstance(buf, mmap.mmap):
            try:
                buf.close()
            except BufferError:  # a view is still held (Dask's send): the mapping goes with it
                pass


def split_pool(kernel: Kernel, head: ClusterHead) -> ServicePool:
    """The head's pool of sandboxed split workers (started on first use, stopped with the head)."""
    from mesatee_notebook.enclave.service_pool import ServicePool
    from mesatee_notebook.enclave.sessions import ExecutorHandle

    def start() -> ExecutorHandle:
        _STARTS.failed = True
        handle = ExecutorHandle(kernel.config.executor_memory, service=True, sandbox=kernel.sandbox)
        _STARTS.failed = False
        return handle

    with _POOL_LOCK:
        pool: ServicePool | None = getattr(head, "split_pool", None)
        if pool is None:
            pool = ServicePool(
                "cluster-split",
                SPLIT_WORKERS,
                start,
                lambda details: kernel.audit_log.append("recovery", None, details, concerns=["*"]),
            )
            head.split_pool = pool
        return pool


def close_split_pool(head: ClusterHead) -> None:
    """Stop the head's split workers (at the head's close)."""
    with _POOL_LOCK:
        pool, head.split_pool = getattr(head, "split_pool", None), None
    if pool is not None:
        pool.shutdown()


class _Landing:
    """The worker's messages during a split: the partitions' chunks land here; any request is refused."""

    def __init__(self, limit: int, value: str = "out/partitions", answer: Any = None) -> None:
        self.limit = limit
        self.value = value
        self.answer = answer  # (kernel, party): answer a trusted service's sealed-storage and audit requests
        self.buffer: Any = None
        self.filled = 0

    def on_message(self, worker: ExecutorHandle, m: Message) -> bool:
        from mesatee_notebook.wire.protocol import EXECUTOR_REQUESTS, LogLine, ProgressUpdate, ResultChunk

        if m.type == ResultChunk.T:
            self._chunk(worker, ResultChunk.from_header(m.header), m.payloads)
            return False
        if m.type in (ProgressUpdate.T, LogLine.T):
            return False
        if m.type in ("result", "error"):
            return True
        if self.answer is not None and m.type in EXECUTOR_REQUESTS:
            kernel, party = self.answer
            kernel.handle_executor_request(worker, m, prefix="svc", party=party, service=True)
            return False
        worker.kill()  # it asked for something (sealed storage, the audit log ...) a split never needs
        msg = f"the upload's split worker sent an unexpected {m.type!r} message; it was stopped"
        raise MalformedFrame(msg)

    def _chunk(self, worker: ExecutorHandle, chunk: Any, payloads: list[Any]) -> None:
        if chunk.name != self.value or len(payloads) != 1:
            worker.kill()
            msg = "the upload's split worker sent a chunk of an unknown value; it was stopped"
            raise MalformedFrame(msg)
        if self.buffer is None:
            if not 0 < chunk.size <= self.limit:
                worker.kill()
                msg = f"the split worker's answer ({chunk.size} bytes) exceeds {self.limit} bytes"
                raise EncodingError(msg)
            self.buffer = mmap.mmap(-1, chunk.size, flags=mmap.MAP_PRIVATE | getattr(mmap, "MAP_ANONYMOUS", 0x20))
        view = memoryview(payloads[0]).cast("B")
        if chunk.size != len(self.buffer) or self.filled + view.nbytes > len(self.buffer):
            worker.kill()
            msg = "the upload's split worker sent chunks past their announced size; it was stopped"
            raise MalformedFrame(msg)
        self.buffer[self.filled : self.filled + view.nbytes] = view
        self.filled += view.nbytes
        payloads.clear()

    def close(self) -> None:
        """Unmap the landed bytes now (an error, or once copied out)."""
        buf, self.buffer = self.buffer, None
        if buf is not None:
            try:
                buf.close()
            except BufferError:
                pass


def split_upload(
    kernel: Kernel,
    head: ClusterHead,
    party: str,
    spec: dict[str, Any],
    payloads: Sequence[Any],
    fds: list[int],
    args: dict[str, Any],
    timeout: float,
) -> SplitUpload:
    """Have a sandboxed worker decode, check, split, encode and digest the upload ``spec`` (the ``data`` input).

    ``fds`` are taken over (closed here, or by the worker's link once sent). ``args``: the upload's policy and the
    partition count. Raises what the worker raised (the same errors as ``dataset.upload``), or a typed error if it
    died, overran its memory or stalled past ``timeout``.
    """
    from mesatee_notebook.enclave.services.partition import SPLIT, max_output
    from mesatee_notebook.wire.protocol import RunService

    size = _payload_size(spec, payloads, fds)
    landing = _Landing(max_output(size))
    work = {
        "policy": args.get("policy"),
        "partitions": args["partitions"],
        "upload_bytes": size,
        "max_output": landing.limit,
    }
    order = RunService(SPLIT, party, work, (spec,), chunked=True)
    taken, fds[:] = list(fds), []
    result = _run(
        kernel, head, order, list(payloads), taken, landing, timeout, "splitting the upload", "placed or counted"
    )
    return _checked(result, landing, int(args["partitions"]))


def join_partitions(kernel: Kernel, head: ClusterHead, party: str, parts: list[Any], timeout: float) -> bytes:
    """The Arrow stream of the partitions' rows in order (``parts``: their gathered, digest-checked bytes).

    Decoded, concatenated and encoded by a sandboxed split worker (``partition.join``), for a code cell's read of a
    partitioned dataset; the supervisor passes the bytes on.
    """
    from mesatee_notebook.enclave.ipc import pack_values
    from mesatee_notebook.enclave.services.partition import JOIN, max_output
    from mesatee_notebook.wire.protocol import RunService

    specs, payloads, fds = pack_values(
        [({"name": f"p{i}", "kind": "arrow.frame", "meta": {}}, [p], None) for i, p in enumerate(parts)]
    )
    landing = _Landing(max_output(sum(memoryview(p).nbytes for p in parts)), "out/data")
    order = RunService(JOIN, party, {"parts": len(parts)}, tuple(specs), chunked=True)
    result = _run(kernel, head, order, payloads, fds, landing, timeout, "joining the partitions", "released")
    try:
        return bytes(_value(result, landing, "out/data"))
    finally:
        for fd in result.fds:
            os.close(fd)
        result.fds.clear()
        landing.close()


def gathered_collect(
    kernel: Kernel, head: ClusterHead, party: str, args: dict[str, Any], partitioned: list[str], timeout: float
) -> Message:
    """``frame.collect`` of a plan that does not decompose, evaluated by a sandboxed split worker.

    The partitions of each dataset in ``partitioned`` are gathered as opaque, digest-checked bytes and handed to
    the worker (``partition.frames``), which decodes them, runs the stock evaluator and the release rules, and
    reads and writes the sealed guard history and DP ledger through the supervisor as the frame service does. Its
    result message is passed on as it is: the supervisor never decodes the data or the released value.
    """
    from mesatee_notebook.enclave.cluster.partitions import gather_bytes
    from mesatee_notebook.enclave.ipc import pack_values
    from mesatee_notebook.enclave.services.partition import GATHERED
    from mesatee_notebook.wire.protocol import RunService

    values: list[Any] = []
    names: dict[str, list[str]] = {}
    for j, name in enumerate(partitioned):
        keys = names[name] = []
        for i, raw in enumerate(gather_bytes(head, name)):
            keys.append(f"d{j}p{i}")
            values.append(({"name": keys[-1], "kind": "arrow.frame", "meta": {}}, [raw], None))
    specs, payloads, fds = pack_values(values)
    del values
    work = {k: args.get(k) for k in ("plan", "epsilon", "delta")} | {"partitioned": names}
    order = RunService(GATHERED, party, work, tuple(specs))
    landing = _Landing(0, "", answer=(kernel, party))
    result = _run(kernel, head, order, payloads, fds, landing, timeout, "evaluating the gathered plan", "released")
    info = result.header.get("info")
    result.header["info"] = {**(info if isinstance(info, dict) else {}), "cluster": {"evaluation": "gathered"}}
    return result


def _run(
    kernel: Kernel,
    head: ClusterHead,
    order: Any,
    payloads: list[Any],
    fds: list[int],
    landing: _Landing,
    timeout: float,
    what: str,
    outcome: str,
) -> Message:
    """Run one internal service call in the head's split pool; ``fds`` are taken over; an error reply raised."""
    from mesatee_notebook.enclave.receipting import raise_if_error

    _STARTS.failed = False
    try:
        result = split_pool(kernel, head).run(
            order.party,
            secrets.token_hex(16),
            order.service,
            order.to_header(),
            payloads,
            fds,
            landing.on_message,
            timeout,
        )
    except RemoteTimeout:
        landing.close()
        msg = f"{what} took longer than {timeout:g} s: its sandboxed worker was stopped, and nothing was {outcome}"
        raise RemoteTimeout(msg) from None
    except MesateeError:
        landing.close()
        if getattr(_STARTS, "failed", False):  # its worker never started, so the fds were not sent: still ours
            for fd in fds:
                os.close(fd)
        raise
    try:
        raise_if_error(result)
    except MesateeError:
        landing.close()
        for fd in result.fds:
            os.close(fd)
        raise
    return result


def _payload_size(spec: dict[str, Any], payloads: Sequence[Any], fds: Sequence[int]) -> int:
    try:
        if "fd" in spec:
            return os.fstat(fds[int(spec["fd"])]).st_size
        return memoryview(payloads[int(spec["inline"])]).nbytes
    except (IndexError, KeyError, ValueError, TypeError, OSError):
        msg = "cluster.upload: the input 'data' refers to a missing payload"
        raise MalformedFrame(msg) from None


def _value(result: Message, landing: _Landing, name: str) -> Any:
    """The bytes of the result value ``name``: landed chunks, an inline payload or a spooled file (mapped)."""
    specs = result.header.get("values")
    found = [s for s in specs if isinstance(s, dict) and s.get("name") == name] if isinstance(specs, list) else []
    if len(found) != 1:
        msg = f"the upload's split worker did not return {name!r}"
        raise MalformedFrame(msg)
    spec = found[0]
    try:
        if "chunks" in spec:
            if landing.buffer is None or landing.filled != len(landing.buffer):
                msg = "the upload's partitions came incomplete"
                raise MalformedFrame(msg)
            return landing.buffer
        if "fd" in spec:
            fd = result.fds[int(spec["fd"])]
            return mmap.mmap(fd, os.fstat(fd).st_size, access=mmap.ACCESS_READ) if os.fstat(fd).st_size else b""
        return result.payloads[int(spec["inline"])]
    except (IndexError, KeyError, ValueError, TypeError, OSError) as exc:
        msg = f"the upload's split worker returned a malformed {name!r}: {exc}"
        raise MalformedFrame(msg) from None


def _checked(result: Message, landing: _Landing, n: int) -> SplitUpload:
    """The worker's answer, its shape checked (the bytes are never decoded here)."""
    try:
        info = result.header.get("info") or {}
        buffer = _value(result, landing, "out/partitions")
        schema = bytes(_value(result, landing, "out/schema"))
        whole = memoryview(buffer).cast("B") if len(buffer) else memoryview(b"")
        parts, pos, row = [], 0, 0
        for rec in info["partitions"]:
            offset, rows, size, digest = int(rec["offset"]), int(rec["rows"]), int(rec["size"]), str(rec["sha256"])
            if offset != row or rows < 0 or size <= 0 or pos + size > whole.nbytes or not _HEX64.fullmatch(digest):
                msg = "the upload's split worker returned partitions that do not tile the frame"
                raise MalformedFrame(msg)
            parts.append(EncodedPartition(offset, rows, whole[pos : pos + size], digest))
            pos, row = pos + size, row + rows
        columns = [[str(c), str(t)] for c, t in info["columns"]]
        rows_total, sha = int(info["rows"]), str(info["sha256"])
        if len(parts) != n or row != rows_total or pos != whole.nbytes or not _HEX64.fullmatch(sha):
            msg = "the upload's split worker returned an inconsistent answer"
            raise MalformedFrame(msg)
    except (KeyError, TypeError, ValueError) as exc:
        msg = f"the upload's split worker returned a malformed answer: {type(exc).__name__}"
        raise MalformedFrame(msg) from None
    finally:
        for fd in result.fds:
            os.close(fd)
        result.fds.clear()
    return SplitUpload(sha, rows_total, columns, schema, parts, buffer)
