"""Large results of a service call, streamed in chunks: service worker → supervisor → client.

A service returns its whole result first: the evaluator (and for an analyst the policy and the differencing
guard) has seen every row before this module sees a byte. Then, when the caller asked for it (``Call.chunked``),
a value whose encoding (``wire/codecs.py``: a DataFrame is one Arrow record batch, zero-copy) has at least
``CHUNKED_MIN`` bytes leaves the service worker as ``ResultChunk`` messages of about 8 MiB over the executor link
(``wire/arrow_chunks.py``), with no spool file. The supervisor passes each chunk on to the client while the worker
sends the next, hashing the bytes it sends (one BLAKE3 over the chunks back to back, on a helper thread while they
go out). The Result that follows names the value with ``chunks: n``; the receipt signed after it binds that
digest, and the client returns nothing before it has verified the receipt against its own digest of the bytes it
received.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mesatee_notebook.enclave.ipc import ValueOut
from mesatee_notebook.errors import KernelConnectionError, MalformedFrame, MesateeError
from mesatee_notebook.wire.arrow_chunks import CHUNKED_MIN, split_parts
from mesatee_notebook.wire.codecs import encode_value
from mesatee_notebook.wire.comm import Comm
from mesatee_notebook.wire.digest import Hasher, payload_hasher
from mesatee_notebook.wire.protocol import ResultChunk
from mesatee_notebook.wire.stream import Message

__all__ = ["ChunkRelay", "deadline_sender", "encode_results"]

log = logging.getLogger("mesatee.enclave")


def encode_results(
    send: Callable[[ResultChunk, list[Any]], None],
    values: Mapping[str, Any],
    chunked: bool,
    *,
    scope: str | None = None,
) -> tuple[list[ValueOut], list[dict[str, Any]]]:
    """In the service worker: (values to send in the Result, specs of the values already sent in chunks).

    ``scope``: the party the values go to (its small-frame layouts, ``wire/frame_layouts.py``).
    """
    out: list[ValueOut] = []
    streamed: list[dict[str, Any]] = []
    for name, value in values.items():
        enc = encode_value(value, scope=scope)
        out_name = f"out/{name}"
        spec: dict[str, Any] = {"name": out_name, "kind": enc.kind, "meta": enc.meta}
        size = enc.nbytes
        if not chunked or size < CHUNKED_MIN:
            out.append((spec, enc.parts, None))
            continue
        n = 0
        for n, piece in enumerate(split_parts(enc.parts), start=1):
            send(ResultChunk(out_name, n - 1, size), [piece])
        streamed.append({**spec, "chunks": n})
    return out, streamed


@dataclass
class _Stream:
    hasher: Hasher = field(default_factory=payload_hasher)
    chunks: int = 0
    size: int = 0
    announced: int = 0


class ChunkRelay:
    """In the supervisor: passes a call's result chunks on to its client and keeps their digests.

    ``send(header, payloads, hasher)`` writes one frame to the client, its payload bytes also going into
    ``hasher``. If the client has gone (a write failed) the remaining chunks are read and dropped, so the worker
    finishes its answer; :meth:`finish` then raises that error.
    """

    def __init__(self, send: Callable[[dict[str, Any], list[Any], Hasher], object], rid: Any) -> None:
        self._send = send
        self._rid = rid
        self._streams: dict[str, _Stream] = {}
        self._gone: MesateeError | None = None

    def on_chunk(self, msg: Message) -> None:
        """One ``ResultChunk`` from the worker: hash it and send it to the client as a ``result.chunk`` frame."""
        chunk = ResultChunk.from_header(msg.header)
        if len(msg.payloads) != 1:
            m = "a result chunk carries exactly one payload"
            raise MalformedFrame(m)
        stream = self._streams.setdefault(chunk.name, _Stream(announced=chunk.size))
        buf = msg.payloads.pop()
        stream.size += memoryview(buf).nbytes
        if chunk.index != stream.chunks or chunk.size != stream.announced or stream.size > stream.announced:
            m = f"result chunk {chunk.index} of {chunk.name!r} is out of order or over its value's size"
            raise MalformedFrame(m)
        stream.chunks += 1
        if self._gone is not None:
            return
        header = {"t": "result.chunk", "re": self._rid, "name": chunk.name, "index": chunk.index, "size": chunk.size}
        try:
            self._send(header, [buf], stream.hasher)
        except MesateeError as exc:  # the client hung up: drain the worker, report after its Result
            self._gone = exc

    def finish(self, result: Message) -> tuple[dict[str, str], list[dict[str, Any]]]:
        """Take the streamed values out of the worker's Result: (receipt subjects, value specs for the client)."""
        if self._gone is not None:
            raise self._gone
        values = result.header.get("values")
        if not isinstance(values, list):
            return {}, []
        subjects: dict[str, str] = {}
        specs: list[dict[str, Any]] = []
        kept = []
        for spec in values:
            if not (isinstance(spec, dict) and "chunks" in spec):
                kept.append(spec)
                continue
            name = str(spec.get("name"))
            stream = self._streams.pop(name, None)
            if stream is None or spec["chunks"] != stream.chunks or stream.size != stream.announced:
                m = f"the result names {spec['chunks']!r} chunks of {name!r}, and {stream.chunks if stream else 0} came"
                raise MalformedFrame(m)
            subjects[name] = stream.hasher.hexdigest()
            specs.append(
                {"name": name, "kind": spec.get("kind"), "meta": spec.get("meta") or {}, "chunks": stream.chunks}
            )
        if self._streams:
            m = f"result chunks of values the result does not name: {sorted(self._streams)}"
            raise MalformedFrame(m)
        result.header["values"] = kept
        return subjects, specs


Send = Callable[[dict[str, Any], list[Any], Hasher], object]


def deadline_sender(comm: Comm, seconds: float | None) -> Send:
    """The relay's write to the client: a chunk the client does not take within ``seconds`` cuts it off.

    The relay writes a chunk to the client before it reads the next from the service worker, so a client that asks
    for a large result and stops reading holds that worker; a few identities would hold the whole pool and stall
    every other party (red team, session 7: ``tests/security/test_redteam_stream.py``). A timer thread shuts the
    connection down when a chunk's write outlasts ``seconds`` (:func:`_cut_off`: the blocked write fails at once);
    the relay then drains the worker's remaining chunks, the worker is free, and the client's connection is gone.
    """

    def send(header: dict[str, Any], payloads: list[Any], hasher: Hasher) -> object:
        if seconds is None:
            return comm.send(header, payloads, hasher=hasher)
        timer = threading.Timer(seconds, _cut_off, (comm, seconds))
        timer.daemon = True
        timer.start()
        try:
            return comm.send(header, payloads, hasher=hasher)
        except OSError as exc:  # the socket's own timeout (a TimeoutError is passed on unwrapped)
            msg = f"the client did not take a result chunk within {seconds:g} s"
            raise KernelConnectionError(msg) from exc
        finally:
            timer.cancel()

    return send


def _cut_off(comm: Comm, seconds: float) -> None:
    """Shut the client's connection down through a duplicate of its descriptor, from the timer's thread.

    The socket object (a TLS socket's state) stays as the blocked writer left it, and that write fails at once
    (EPIPE); closing the socket under the writer instead could let it reuse a descriptor number.
    """
    log.info("a client took longer than %g s to read a result chunk: its connection is closed", seconds)
    try:
        dup = socket.socket(fileno=os.dup(comm.fileno()))
    except (OSError, ValueError):  # no descriptor (an in-process comm without one), or already closed
        comm.close()
        return
    try:
        dup.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        dup.close()
