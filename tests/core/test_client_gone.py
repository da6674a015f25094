"""A cell whose client dies is stopped: the kernel notices the closed connection, interrupts, then kills it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

import mesatee_notebook as mn
from tests.conftest import KernelProc

pytestmark = pytest.mark.process

_CLIENT = textwrap.dedent(
    """
    import sys
    import mesatee_notebook as mn

    url, root, measurement = sys.argv[1:4]
    s = mn.connect(url, policy=mn.Policy(platform_roots=[root], measurements=[measurement]), session="runaway",
                   identity=False)
    print("running", flush=True)
    s.run("while True:\\n    pass")
    """
)


def _cpu_by_pid(kernel: KernelProc) -> dict[int, float]:
    """CPU seconds used so far by each process below the kernel (its executors and workers)."""
    out: dict[int, float] = {}
    for p in psutil.Process(kernel.proc.pid).children(recursive=True):
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        out[p.pid] = t.user + t.system
    return out


def _find_spinner(kernel: KernelProc, *, cpu_s: float = 0.5, limit_s: float = 90.0) -> int:
    """The pid of the process below the kernel that has burnt ``cpu_s`` CPU-seconds since this call (the runaway cell).

    Counted in CPU time, not in share of a core, so a loaded machine only makes it slower to find, never missed."""
    start = _cpu_by_pid(kernel)
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        time.sleep(0.2)
        for pid, used in _cpu_by_pid(kernel).items():
            if used - start.get(pid, 0.0) >= cpu_s:
                return pid
    raise AssertionError("the runaway cell never started burning CPU")


def _stopped(pid: int, *, window_s: float = 2.0) -> bool:
    """True once ``pid`` is gone or used (almost) no CPU over ``window_s`` (a spinner gets some even at load 15)."""
    try:
        proc = psutil.Process(pid)
        before = sum(proc.cpu_times()[:2])
        time.sleep(window_s)
        return sum(proc.cpu_times()[:2]) - before < 0.02 or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.serial  # timing-sensitive: runs alone under pytest-xdist (tests/conftest.py)
def test_runaway_cell_stops_when_its_client_is_killed(kernel: KernelProc) -> None:
    client = subprocess.Popen(
        [sys.executable, "-c", _CLIENT, kernel.url, kernel.fingerprint, kernel.measurement],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        assert client.stdout is not None
        assert client.stdout.readline().strip() == b"running", client.stderr.read() if client.stderr else b""
        spinner = _find_spinner(kernel)  # the cell is spinning (on a core shared with whatever else runs)
    finally:
        client.send_signal(signal.SIGKILL)
        client.wait()
        if client.stdout is not None:
            client.stdout.close()
        if client.stderr is not None:
            client.stderr.close()
    killed_at = time.monotonic()
    # interrupt after at most 0.5 s, kill after a 3 s grace: within a few seconds nothing spins any more
    while not _stopped(spinner):
        # did not hang (generous: at load 15 the few seconds it needs can stretch)
        assert time.monotonic() - killed_at < 30, "the executor kept burning CPU after its client died"
    # the kernel still serves others
    with mn.connect(kernel.url, policy=kernel.policy(), session="after-runaway", identity=False) as other:
        assert other.run("6 * 7").value == 42
    log = (kernel.data_dir / "serve.log").read_text()
    assert "the client went away during the cell; interrupting it" in log
