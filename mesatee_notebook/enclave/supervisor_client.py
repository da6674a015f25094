"""An executor's end of its link to the supervisor: the one way a cell executor or a service worker talks to it.

Both kinds of worker hold one :class:`SupervisorClient` over a :class:`~mesatee_notebook.wire.comm.Comm` (the Unix
socket the supervisor passed). It sends the worker's messages (ready, stream, log, progress, results, errors) and
makes its requests in the middle of a call (sealed storage, datasets, audit, registered functions, keys), under one
lock so that a request and its answer are never interleaved with another thread's message.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from mesatee_notebook.enclave.ipc import ValueOut, ipc_recv, ipc_send, pack_values
from mesatee_notebook.errors import MesateeError, error_from_wire
from mesatee_notebook.wire.comm import Comm
from mesatee_notebook.wire.protocol import ExecutorError, ProtocolMessage, Result
from mesatee_notebook.wire.stream import Message

__all__ = ["SupervisorClient"]


class SupervisorClient:
    """Messages and mid-call requests to the supervisor, over one comm."""

    def __init__(self, comm: Comm) -> None:
        self.comm = comm
        self.lock = threading.RLock()

    def send(
        self, header: dict[str, Any] | ProtocolMessage, payloads: Sequence[Any] = (), fds: Sequence[int] = ()
    ) -> None:
        """Send one message (fds are closed once sent: they belong to the supervisor then)."""
        body = header.to_header() if isinstance(header, ProtocolMessage) else header
        with self.lock:
            ipc_send(self.comm, body, list(payloads), fds)

    def request(self, header: dict[str, Any] | ProtocolMessage, payloads: list[Any] | None = None) -> bytes:
        """A call to the supervisor in the middle of a cell or service (sealed storage ...); its bytes, if any."""
        body = header.to_header() if isinstance(header, ProtocolMessage) else header
        with self.lock:
            ipc_send(self.comm, body, payloads or [])
            reply = ipc_recv(self.comm)
        if reply.type == ExecutorError.T:
            raise error_from_wire(reply.header)
        return bytes(reply.payloads[0]) if reply.payloads else b""

    def receive(self) -> Message:
        """The supervisor's next order (EOFError once it hung up)."""
        return ipc_recv(self.comm)

    def error(self, exc: MesateeError) -> None:
        """Answer the current order with a typed error."""
        self.send({"t": ExecutorError.T, **exc.to_wire()})

    def result(self, values: Sequence[ValueOut], **fields: Any) -> None:
        """Answer the current order with values (small ones inline, large ones as memfds) and ``fields``."""
        specs, payloads, fds = pack_values(values)
        self.send(Result(tuple(specs), **fields), payloads, fds)
