"""Entry point of every executor process: ``python -m mesatee_notebook.enclave.executor FD MEMORY [--service]``.

The supervisor starts it (a fresh interpreter, never a fork, so it inherits no key material) with the Unix socket
FD. It hardens and confines itself before any import, then runs a
:class:`~mesatee_notebook.enclave.cell_executor.CellExecutor` (a session's cells) or, with ``--service``, a
:class:`~mesatee_notebook.enclave.service_worker.ServiceWorker` (trusted services, never user code). Both talk to
the supervisor through one :class:`~mesatee_notebook.enclave.supervisor_client.SupervisorClient`.
"""

from __future__ import annotations

import resource
import socket
import sys
from typing import TYPE_CHECKING, Any

from mesatee_notebook.enclave.cell_executor import CellExecutor, TrustedAPI
from mesatee_notebook.enclave.hardening import harden_process
from mesatee_notebook.enclave.supervisor_client import SupervisorClient
from mesatee_notebook.wire.comm import UnixComm

if TYPE_CHECKING:
    from mesatee_notebook.enclave.service_worker import ServiceWorker

__all__ = ["CellExecutor", "TrustedAPI", "main"]


def _set_memory_limit(limit: int) -> None:
    if limit > 0:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``python -m mesatee_notebook.enclave.executor FD MEMORY_LIMIT [--service] [--confine JSON]``."""
    harden_process()  # before any import: not dumpable, no core files
    args = sys.argv[1:] if argv is None else argv
    fd = int(args[0])
    limit = int(args[1]) if len(args) > 1 else 0
    confined: dict[str, Any] | None = None
    confined_memory = 0
    if "--confine" in args:
        import json

        from mesatee_notebook.enclave.sandbox import confine

        settings = json.loads(args[args.index("--confine") + 1])
        confined_memory = int(settings.get("memory") or 0)
        confined = confine(settings, [fd])  # rlimits and Landlock, before the engines load
        limit = 0  # the sandbox's address-space limit is already set, with room for allocators
    import numpy  # noqa: F401 - warm the engines the cells will use
    import pandas  # noqa: F401
    import pyarrow  # noqa: F401

    _set_memory_limit(limit)
    client = SupervisorClient(UnixComm(socket.socket(fileno=fd), url="unix://supervisor", peer="supervisor"))
    worker: ServiceWorker | CellExecutor
    if "--service" in args[2:]:
        from mesatee_notebook.enclave.service_worker import ServiceWorker

        worker = ServiceWorker(client, int(confined_memory or limit))
    else:
        worker = CellExecutor(client, limits=confined)
    try:
        worker.serve()
    except (EOFError, ConnectionError, OSError):
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
