"""Process hardening that software alone can do (it is not isolation from the host)."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import resource

__all__ = ["harden_process", "is_dumpable"]

_PR_SET_DUMPABLE = 4
_PR_GET_DUMPABLE = 3
log = logging.getLogger("mesatee.enclave")


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def harden_process() -> list[str]:
    """No core dumps, not dumpable (no ptrace by peers, no /proc/PID/mem). Returns what was applied."""
    applied = []
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    applied.append("RLIMIT_CORE=0")
    if _libc().prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        msg = f"prctl(PR_SET_DUMPABLE, 0) failed with errno {err}"
        raise OSError(err, msg)
    applied.append("PR_SET_DUMPABLE=0")
    return applied


def is_dumpable() -> bool:
    """Whether this process is dumpable (False after :func:`harden_process`)."""
    return bool(_libc().prctl(_PR_GET_DUMPABLE, 0, 0, 0, 0))
