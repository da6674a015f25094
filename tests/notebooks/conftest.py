"""Run notebooks on a real ipykernel from this venv, with an isolated embedded enclave kernel."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import stop_signal


@pytest.fixture(scope="session")
def notebook_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A ``python3`` kernelspec for ``sys.executable`` first on JUPYTER_PATH, a fresh MESATEE_HOME and config dir.

    The tutorials keep their parties' keys under ``$XDG_CONFIG_HOME/mesatee_notebook`` between runs; the tests
    point it at a temporary directory, so they neither read nor write the user's keys.

    Yields the MESATEE_HOME; at teardown the embedded kernel the notebooks started is stopped.
    """
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / "python3"
    spec.mkdir(parents=True)
    spec.joinpath("kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "Python 3 (mesatee tests)",
                "language": "python",
            }
        )
    )
    home = tmp_path_factory.mktemp("notebooks_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", str(root))
        mp.setenv("MESATEE_HOME", str(home))
        config = tmp_path_factory.mktemp("config")
        mp.setenv("XDG_CONFIG_HOME", str(config))
        yield home
    _stop_embedded_kernel(home)
    _stop_tutorial_cluster(config / "mesatee_notebook" / "tutorials" / "07-cluster" / "cluster")


def _stop_tutorial_cluster(data_dir: Path) -> None:
    """07-cluster stops its cluster in its last cell; after a failed run, stop what it left (no-op otherwise)."""
    if data_dir.exists():
        from mesatee_notebook.enclave.cluster import local

        local.down(data_dir)


def _stop_embedded_kernel(home: Path) -> None:
    try:
        pid = int(json.loads((home / "kernel.json").read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return
    try:
        os.killpg(pid, stop_signal())  # the kernel leads its own process group, executors included
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.killpg(pid, signal.SIGKILL)
