"""The test suite's own waiting helpers (tests/waiting.py) can fail: a check built on them is not vacuous."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from tests.waiting import closed_by_peer, wait_dead, wait_until


def test_wait_until_returns_the_value_or_fails_naming_what_never_happened() -> None:
    values = iter([0, None, [], "ready"])
    assert wait_until(lambda: next(values), "the fourth value", interval=0) == "ready"
    with pytest.raises(pytest.fail.Exception, match=r"timed out after 0\.1 s waiting for the impossible"):
        wait_until(lambda: False, "the impossible", timeout=0.1, interval=0.01)


def test_closed_by_peer_is_false_for_a_socket_still_open_and_true_once_closed() -> None:
    a, b = socket.socketpair()
    try:
        assert closed_by_peer(a, time.monotonic() + 0.2) is False  # a timeout is no close
        b.close()
        assert closed_by_peer(a, time.monotonic() + 5) is True
    finally:
        a.close()
        b.close()


def test_wait_dead_waits_for_a_killed_child_and_fails_for_a_live_one() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with pytest.raises(pytest.fail.Exception, match="to die"):
            wait_dead(proc.pid, timeout=0.2)
        proc.kill()
        wait_dead(proc.pid)  # a zombie until reaped: counted as dead
    finally:
        proc.kill()
        proc.wait()
