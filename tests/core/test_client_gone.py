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


def _executor_cpu(kernel: KernelProc) -> float:
    """CPU seconds used so far by the kernel's executors (every process below the kernel)."""
    total = 0.0
    for p in psutil.Process(kernel.proc.pid).children(recursive=True):
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system
    return total


def _cpu_over(kernel: KernelProc, seconds: float) -> float:
    before = _executor_cpu(kernel)
    time.sleep(seconds)
    return _executor_cpu(kernel) - before


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
        deadline = time.monotonic() + 30
        while _cpu_over(kernel, 0.5) < 0.3:  # the cell is spinning (a core, shared with whatever else runs)
            assert time.monotonic() < deadline, "the runaway cell never started burning CPU"
    finally:
        client.send_signal(signal.SIGKILL)
        client.wait()
        if client.stdout is not None:
            client.stdout.close()
        if client.stderr is not None:
            client.stderr.close()
    killed_at = time.monotonic()
    # interrupt after at most 0.5 s, kill after a 3 s grace: within a few seconds nothing spins any more
    while _cpu_over(kernel, 1.0) > 0.2:
        assert time.monotonic() - killed_at < 10, "the executor kept burning CPU after its client died"
    # the kernel still serves others
    with mn.connect(kernel.url, policy=kernel.policy(), session="after-runaway", identity=False) as other:
        assert other.run("6 * 7").value == 42
    log = (kernel.data_dir / "serve.log").read_text()
    assert "the client went away during the cell; interrupting it" in log
