"""The service worker: a process that runs trusted services for proven parties, and never user code.

It is started by the supervisor (``python -m mesatee_notebook.enclave.executor FD ... --service``, see
``executor.py``) and talks to it through a :class:`~mesatee_notebook.enclave.supervisor_client.SupervisorClient`,
which it hands to each service as :class:`~mesatee_notebook.enclave.services.ServiceContext`. It holds no keys.
"""

from __future__ import annotations

from typing import Any

from mesatee_notebook.enclave.ipc import pack_values, unpack_values
from mesatee_notebook.enclave.result_stream import encode_results
from mesatee_notebook.enclave.services import ServiceContext, dispatch
from mesatee_notebook.enclave.supervisor_client import SupervisorClient
from mesatee_notebook.errors import MesateeError
from mesatee_notebook.wire.codecs import decode_value
from mesatee_notebook.wire.protocol import ExecutorError, Ready, Result, RunService, Shutdown
from mesatee_notebook.wire.stream import Message

__all__ = ["ServiceWorker"]


class ServiceWorker:
    """Runs the services the supervisor orders; keeps per-worker state (caches) between calls."""

    def __init__(self, client: SupervisorClient, memory_limit: int = 0) -> None:
        self.client = client
        self.state: dict[str, Any] = {}
        if memory_limit > 0:  # decoded datasets kept between calls: at most a quarter of the worker's memory
            self.state["dataset_cache_bytes"] = memory_limit // 4

    def serve(self) -> None:
        """Answer the supervisor's orders until it says shutdown or hangs up."""
        import os
        import signal

        # A service is never interrupted midway: on a timeout the supervisor's SIGINT is ignored and, after the
        # grace period, the worker is killed (its caller gets RemoteTimeout; sealed state stays consistent).
        signal.signal(signal.SIGINT, lambda signum, frame: None)
        self.client.send(Ready(os.getpid()))
        while True:
            try:
                msg = self.client.receive()
            except EOFError:
                return
            if msg.type == RunService.T:
                self.call(msg)
            elif msg.type == Shutdown.T:
                return
            else:  # a cell (or anything else) is not for a service worker
                self.client.send(ExecutorError("protocol", f"executor: unknown request {msg.type!r}"))

    def call(self, msg: Message) -> None:
        """Run one trusted service for the party named by the supervisor."""
        try:
            order = RunService.from_header(msg.header)
            inputs = {
                str(spec["name"]): decode_value(str(spec["kind"]), buf, meta=spec.get("meta"), scope=order.party)
                for spec, buf in unpack_values(list(order.inputs), msg)
            }
            msg.payloads.clear()
            ctx = ServiceContext(self.client, order.party, self.state, fresh=order.fresh)
            result = dispatch(order.service, ctx, order.args, inputs)
            # The whole result exists (and passed its policy) before any chunk of it is sent.
            values, streamed = encode_results(self.client.send, result.values, order.chunked, scope=order.party)
            specs, payloads, fds = pack_values(values)
            self.client.send(Result((*specs, *streamed), info=result.info), payloads, fds)
        except MesateeError as exc:
            self.client.error(exc)
        except Exception as exc:
            # Only the class and message: a traceback of engine internals could quote data.
            ename = type(exc).__name__
            self.client.send(ExecutorError("remote", f"{ename}: {exc}", {"ename": ename}))
