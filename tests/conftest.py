"""Shared fixtures: real kernel processes on loopback, isolated data directories."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class KernelProc:
    """A real `mesatee-enclave serve` process."""

    url: str
    host: str
    port: int
    data_dir: Path
    fingerprint: str
    proc: subprocess.Popen[bytes]
    measurement: str
    untrusted_dir: Path | None = None

    def policy(self, **kw: object) -> object:
        """Pin this kernel's platform and the measurement it published in kernel.json."""
        import mesatee_notebook as mn

        kw.setdefault("measurements", [self.measurement])
        return mn.Policy(platform_roots=[self.fingerprint], **kw)  # type: ignore[arg-type]


def _enclave(*args: str) -> list[str]:
    return [sys.executable, "-m", "mesatee_notebook.cli", "enclave", *args]


def start_kernel(data_dir: Path, *extra: str, level: str = "softtee") -> KernelProc:
    """Start a kernel on an ephemeral port and wait until it listens."""
    data_dir.mkdir(parents=True, exist_ok=True)
    if level != "unprotected":
        # What `mesatee-enclave init-platform` does (it only calls this and prints), without a Python start-up
        # per kernel; the command itself is tested in tests/magics/test_cli.py and by the red-team fixture.
        from mesatee_notebook.enclave.platform import init_platform

        init_platform(data_dir)
    log = (data_dir / "serve.log").open("ab")
    proc = subprocess.Popen(
        _enclave("serve", "--port", "0", "--level", level, "--data-dir", str(data_dir), *extra),
        stdout=log,
        stderr=log,
        stdin=subprocess.DEVNULL,
    )
    log.close()
    info_path = data_dir / "kernel.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"kernel exited: {(data_dir / 'serve.log').read_text()}")
        if info_path.exists():
            info = json.loads(info_path.read_text())
            if info["pid"] == proc.pid:
                fp = (data_dir / "platform" / "fingerprint").read_text().strip() if level != "unprotected" else ""
                return KernelProc(
                    f"mesatee://127.0.0.1:{info['port']}",
                    "127.0.0.1",
                    int(info["port"]),
                    data_dir,
                    fp,
                    proc,
                    str(info["measurement"]),
                )
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("kernel did not start")


def stop_signal() -> signal.Signals:
    """Ctrl-C (SIGINT) for a kernel we started; SIGTERM when this process ignores SIGINT.

    A child inherits an ignored SIGINT (a run started in the background by a non-interactive shell, ``nohup``, some
    CI runners), and Python then never turns it into KeyboardInterrupt: every stop would wait out its timeout. The
    kernel handles SIGTERM itself (a clean stop, like Ctrl-C, noticed within a second).
    """
    return signal.SIGTERM if signal.getsignal(signal.SIGINT) is signal.SIG_IGN else signal.SIGINT


def stop_kernel(k: KernelProc) -> None:
    if k.proc.poll() is None:
        k.proc.send_signal(stop_signal())
        try:
            k.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            k.proc.kill()
            k.proc.wait()


@pytest.fixture(scope="session")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KernelProc]:
    shared = tmp_path_factory.mktemp("untrusted")
    shared.chmod(0o1777)  # a root kernel's sandboxes run as other uids
    k = start_kernel(tmp_path_factory.mktemp("kernel"), "--untrusted-dir", str(shared))
    k.untrusted_dir = shared
    yield k
    stop_kernel(k)


@pytest.fixture(autouse=True, scope="session")
def _isolated_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Never touch the user's embedded kernel: every test run gets its own MESATEE_HOME."""
    home = tmp_path_factory.mktemp("mesatee_home")
    old = os.environ.get("MESATEE_HOME")
    os.environ["MESATEE_HOME"] = str(home)
    # party identities are created under XDG_CONFIG_HOME: keep them out of the user's home too
    os.environ["XDG_CONFIG_HOME"] = str(tmp_path_factory.mktemp("xdg_config"))
    yield
    info = home / "kernel.json"
    if info.exists():
        try:
            os.kill(int(json.loads(info.read_text())["pid"]), stop_signal())
        except (OSError, ValueError, KeyError):
            pass
    if old is None:
        os.environ.pop("MESATEE_HOME", None)
    else:
        os.environ["MESATEE_HOME"] = old
