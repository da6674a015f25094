"""The enclave kernel, as the CLI and other modules import it (``Kernel``, ``KernelConfig``).

The kernel lives in rooms of its own: ``config.py`` (``KernelConfig``), ``supervisor.py`` (lifecycle, listener,
spares, pools, idle),
``connection.py`` (one client connection: the handler table keyed by request class), ``broker.py`` (answers to
executors' mid-call requests), ``receipting.py`` (receipt predicates, the timeout clamp) and ``sessions.py``
(a session's executor process).
"""

from __future__ import annotations

from mesatee_notebook.enclave.config import ANONYMOUS_LIMITS, AVAILABLE_LEVELS, HELLO_LIMITS, KernelConfig
from mesatee_notebook.enclave.supervisor import Kernel

__all__ = ["ANONYMOUS_LIMITS", "AVAILABLE_LEVELS", "HELLO_LIMITS", "Kernel", "KernelConfig"]
