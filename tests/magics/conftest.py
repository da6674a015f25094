"""A real IPython shell that raises on cell errors, and an isolated embedded kernel for it."""

from __future__ import annotations

import json
import os
import signal
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from IPython.core.interactiveshell import ExecutionResult, InteractiveShell

from tests.conftest import stop_signal


class TestingShell(InteractiveShell):
    """``run_cell`` raises the cell's error, like jupysql's TestingShell."""

    def run_cell(self, raw_cell: str, *args: Any, **kwargs: Any) -> ExecutionResult:
        result = super().run_cell(raw_cell, *args, **kwargs)
        result.raise_error()
        return result


def stop_embedded_kernel(home: Path, sig: signal.Signals | None = None) -> None:
    """Stop the embedded kernel recorded in ``home/kernel.json`` and wait until it is gone.

    ``sig`` defaults to Ctrl-C, or SIGTERM where SIGINT is ignored (``tests.conftest.stop_signal``).
    """
    sig = stop_signal() if sig is None else sig
    try:
        pid = int(json.loads((home / "kernel.json").read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return
    try:
        os.killpg(pid, sig)  # the kernel leads its own process group, executors included
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:  # our child (we started it): reap it
                return
        except ChildProcessError:  # not our child: poll for it to go away
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
        time.sleep(0.05)
    os.killpg(pid, signal.SIGKILL)


@pytest.fixture
def stop_kernel() -> Callable[[Path, signal.Signals], None]:
    """Stop the embedded kernel of a ``$MESATEE_HOME``."""
    return stop_embedded_kernel


@pytest.fixture
def start_kernel() -> Callable[[], None]:
    """Start the embedded kernel of the current ``$MESATEE_HOME``."""
    return start_embedded_kernel


@pytest.fixture(scope="module")
def mesatee_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Its own ``$MESATEE_HOME``, so the module starts (and stops) its own embedded kernel."""
    home = tmp_path_factory.mktemp("magics_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MESATEE_HOME", str(home))
        start_embedded_kernel()
        yield home
    stop_embedded_kernel(home)


def start_embedded_kernel() -> None:
    """Start the embedded kernel of the current ``$MESATEE_HOME``.

    ``ensure_embedded_kernel`` drops its ``Popen`` while the kernel runs on purpose, and
    ``Popen.__del__`` then warns ``ResourceWarning: subprocess N is still running``; with
    warnings as errors that would fail whichever test happens to start the kernel.
    """
    from mesatee_notebook.remote.embedded import ensure_embedded_kernel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        ensure_embedded_kernel()


@pytest.fixture(scope="module")
def shell(mesatee_home: Path) -> Iterator[TestingShell]:
    """One real InteractiveShell for the module."""
    del mesatee_home
    sh = TestingShell.instance()
    yield sh
    TestingShell.clear_instance()


@pytest.fixture
def ip(shell: TestingShell) -> Iterator[TestingShell]:
    """The shell with a freshly loaded extension: no session yet."""
    from mesatee_notebook.magics import load_ipython_extension, unload_ipython_extension

    load_ipython_extension(shell)  # what %load_ext does, without the once-per-process guard
    yield shell
    unload_ipython_extension(shell)
