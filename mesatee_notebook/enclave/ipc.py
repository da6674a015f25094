"""Supervisor ↔ executor messages over a Unix socket: small payloads inline, large ones as memfds.

The same framing as the TLS channel (``wire/framing.py``), with larger limits (both ends are the kernel's own
processes) and fds passed as SCM_RIGHTS; the value specs are the channel's (``name``/``kind``/``meta``) plus where
the bytes are: ``inline: i`` (the i-th payload) or ``fd: j`` (the j-th passed memfd).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Sequence
from typing import Any

from mesatee_notebook.enclave.shm import SHARED_THRESHOLD, map_fd, memfd_from_parts
from mesatee_notebook.errors import MalformedFrame
from mesatee_notebook.wire.comm import Comm
from mesatee_notebook.wire.framing import Limits
from mesatee_notebook.wire.stream import Allocator, Message, recv_message, send_message

__all__ = ["IPC_LIMITS", "ValueOut", "ipc_recv", "ipc_send", "pack_values", "unpack_values"]

IPC_LIMITS = Limits(max_header=64 << 20, max_payload=1 << 40, max_payloads=1 << 16)

ValueOut = tuple[dict[str, Any], list[Any], int | None]
"""(spec, parts, fd): a value to send; exactly one of parts/fd carries the bytes."""


def pack_values(values: Sequence[ValueOut]) -> tuple[list[dict[str, Any]], list[Any], list[int]]:
    """Lay values out as specs + inline payloads + fds (large values travel as memfds)."""
    specs: list[dict[str, Any]] = []
    payloads: list[Any] = []
    fds: list[int] = []
    for spec, parts, given_fd in values:
        out = dict(spec)
        size = sum(memoryview(p).nbytes for p in parts)
        fd = given_fd
        if fd is None and size >= SHARED_THRESHOLD:
            fd = memfd_from_parts(parts)
        if fd is not None:
            out["fd"] = len(fds)
            fds.append(fd)
        else:
            out["inline"] = len(payloads)
            payloads.append(list(parts))
        specs.append(out)
    return specs, payloads, fds


def unpack_values(specs: Any, msg: Message) -> list[tuple[dict[str, Any], Any]]:
    """Pair each spec with its buffer; memfds are mapped and their descriptors closed."""
    if not isinstance(specs, list):
        msg_ = "value specs must be a list"
        raise MalformedFrame(msg_)
    out: list[tuple[dict[str, Any], Any]] = []
    try:
        for spec in specs:
            if not isinstance(spec, dict):
                m = "value spec must be a map"
                raise MalformedFrame(m)
            if "fd" in spec:
                buf = map_fd(msg.fds[int(spec["fd"])])
            else:
                buf = msg.payloads[int(spec["inline"])]
            out.append((spec, buf))
    except (IndexError, KeyError, ValueError) as exc:
        m = f"value spec refers to a missing payload: {exc}"
        raise MalformedFrame(m) from exc
    finally:
        for fd in msg.fds:
            os.close(fd)
    return out


def ipc_send(
    link: Comm | socket.socket, header: dict[str, Any], payloads: Sequence[Any] = (), fds: Sequence[int] = ()
) -> None:
    """Send one IPC message (fds are closed after sending: ownership moves to the peer)."""
    try:
        if isinstance(link, Comm):
            link.send(header, payloads, fds=fds)
        else:
            send_message(link, header, payloads, fds=fds)
    finally:
        for fd in fds:
            os.close(fd)


def ipc_recv(
    link: Comm | socket.socket, *, allocator_for: Callable[[dict[str, Any]], Allocator | None] | None = None
) -> Message:
    """Receive one IPC message, with any passed fds.

    ``allocator_for(header)`` may pick where a frame's payloads land (the supervisor's reused buffer for result
    chunks, ``wire/arrow_chunks.ChunkLanding``); by default each payload gets a fresh ``bytearray``.
    """
    if isinstance(link, Comm):
        return link.recv(IPC_LIMITS, want_fds=True, allocator_for=allocator_for)
    return recv_message(link, IPC_LIMITS, want_fds=True, allocator_for=allocator_for)
