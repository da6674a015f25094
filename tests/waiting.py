"""Waiting in tests: on a condition, with a generous deadline and a sentence saying what never happened.

A test never synchronises with a fixed sleep: on a loaded machine (two xdist workers and other jobs on 2 cores, load
4-8) "after 0.2 s the thread has queued" or "after 3 s both streams run" stops being true, and the test fails while the
code is right. It waits for the state it needs instead. The deadline only decides how long a real hang takes to
fail: it is generous (60 s by default), never part of what is checked.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import psutil
import pytest

T = TypeVar("T")

#: how long a test waits for something that should happen "at once" before it calls it a hang
PATIENCE = 60.0


def wait_until(cond: Callable[[], T], what: str, timeout: float = PATIENCE, interval: float = 0.05) -> T:
    """Poll ``cond`` until it returns something true and return that; fail the test after ``timeout`` seconds.

    ``what`` names the awaited state ("both hostile results streaming"), for the failure message.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def closed_by_peer(sock: socket.socket, deadline: float) -> bool:
    """Wait until the other end closes ``sock`` (EOF or a reset): True; False if it is still open at ``deadline``.

    A read that times out is a socket still open, never a close (counting it as one made such checks unfailable).
    """
    sock.settimeout(max(0.01, deadline - time.monotonic()))
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except (OSError, ssl.SSLError):
        return True


def wait_dead(pid: int, timeout: float = PATIENCE) -> None:
    """Wait until process ``pid`` has died: gone, or a zombie its parent has not reaped yet (after a SIGKILL)."""

    def dead() -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    wait_until(dead, f"process {pid} to die", timeout=timeout)


def cell_waits_for(sign: Path, what: str, timeout: float = PATIENCE) -> str:
    """Cell code that waits until the test creates ``sign`` (a file in the kernel's ``--untrusted-dir``).

    So a test holds a cell at a point (running, output shown) for exactly as long as it needs, with no sleep; the
    cell raises, naming ``what``, if the sign never comes.
    """
    return (
        f"import time as _t\n_end = _t.monotonic() + {timeout!r}\nwhile True:\n"
        f"    try:\n        mesatee.untrusted_open({str(sign)!r}).close(); break\n"
        "    except FileNotFoundError:\n"
        "        if _t.monotonic() > _end:\n"
        f"            raise RuntimeError({f'timed out waiting for {what}'!r}) from None\n"
        "        _t.sleep(0.02)\n"
    )
