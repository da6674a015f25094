"""The embedded local kernel: started on first use, reused while it runs, pinned by its own platform key.

Its home (``$MESATEE_HOME``, by default one per account) can be shared by several installs. A kernel that runs other
code than this install (another measurement) is stopped and replaced, with a warning that says so; one started by
another install of the same code is reused, and that reuse is said too (:class:`SharedKernelWarning`, and
:func:`describe_embedded` in ``%mesatee connect``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

from mesatee_notebook.errors import KernelConnectionError

__all__ = [
    "SealedStateWarning",
    "SharedKernelWarning",
    "describe_embedded",
    "embedded_home",
    "ensure_embedded_kernel",
    "local_platform_fingerprint",
]


class SealedStateWarning(UserWarning):
    """State sealed for another measurement: readable again only after its owners approve a migration."""


class SharedKernelWarning(UserWarning):
    """The embedded kernel in use was started by another install (another Python or checkout) of the same code."""


_ORIGIN = "launcher.json"  # who started the running kernel: {"pid", "python", "package"}


def _this_install() -> dict[str, str]:
    return {"python": sys.executable, "package": str(Path(__file__).resolve().parents[1])}


def _origin(home: Path) -> dict[str, object] | None:
    """Who started the kernel that ``home/kernel.json`` names (None if unknown or stale)."""
    try:
        origin = json.loads((home / _ORIGIN).read_text())
        kernel_pid = int(json.loads((home / "kernel.json").read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return origin if isinstance(origin, dict) and origin.get("pid") == kernel_pid else None


def _started_by(origin: dict[str, object] | None) -> str:
    if origin is None:
        return "an unknown install"
    return f"{origin.get('python')} (package {origin.get('package')})"


def describe_embedded(home: Path | None = None) -> str:
    """``pid N, home H`` and, when another install started it, by whom: for the connect line."""
    home = home or embedded_home()
    origin = _origin(home)
    pid = f"pid {origin['pid']}, " if origin else ""
    text = f"{pid}home {home}"
    if origin is not None and {k: origin.get(k) for k in ("python", "package")} != _this_install():
        text += f"; started by another install: {_started_by(origin)}"
    return text


_START_TIMEOUT = 120.0
IDLE_TIMEOUT = 1800


def embedded_home() -> Path:
    """``$MESATEE_HOME``, or ``~/.local/share/mesatee_notebook/embedded``."""
    env = os.environ.get("MESATEE_HOME")
    if env:
        return Path(env).expanduser()
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "mesatee_notebook" / "embedded"


def local_platform_fingerprint(home: Path | None = None) -> str | None:
    """The fingerprint of the embedded platform, if one was created here."""
    path = (home or embedded_home()) / "platform" / "fingerprint"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def _locked(home: Path) -> Iterator[None]:
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    with (home / ".lock").open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _running(home: Path) -> tuple[str, int] | None:
    try:
        info = json.loads((home / "kernel.json").read_text())
        pid, host, port = int(info["pid"]), str(info["host"]), int(info["port"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    from mesatee_notebook.attestation.measurement import expected_measurement

    here = expected_measurement()
    if info.get("measurement") != here:
        # It runs other code than this install (an upgrade or an edit): replace it, never reuse it.
        who = _started_by(_origin(home))
        _stop(pid)  # before a new kernel moves the old store aside, the old kernel must have stopped writing to it
        old = str(info.get("measurement"))
        warnings.warn(
            f"stopped the embedded kernel (pid {pid}, started by {who}) in {home}: it ran measurement {old[:16]}…, "
            f"this install is {here[:16]}…, so a new kernel starts for this install. "
            f"The old kernel's datasets, jobs and models stay sealed for {old[:16]}… (moved aside, untouched, in "
            f"{home / 'sealed-parked'}); the new kernel lists them as pending in Session.datasets(), and each owner "
            f"moves theirs with Session.approve_migration('*', from_='{old}').",
            SealedStateWarning,
            stacklevel=3,
        )
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    try:
        with socket.create_connection((host, port), timeout=2):
            return host, port
    except OSError:
        return None


def _stop(pid: int, timeout: float = 15.0) -> None:
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGINT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        except PermissionError:
            return
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.05)
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGKILL)


def _say_if_shared(home: Path) -> None:
    origin = _origin(home)  # (None: started by hand, `mesatee-enclave serve --data-dir`; nothing to compare)
    if origin is None or {k: origin.get(k) for k in ("python", "package")} == _this_install():
        return
    warnings.warn(
        f"reusing the embedded kernel (pid {origin['pid']}) in {home}, started by "
        f"{_started_by(origin)}: it runs the same code as this install (same measurement), with that install's "
        "Python packages. To give this install a kernel of its own, set MESATEE_HOME to another directory.",
        SharedKernelWarning,
        stacklevel=3,
    )


def _enclave_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "mesatee_notebook.cli", "enclave", *args]


def ensure_embedded_kernel(home: Path | None = None) -> tuple[str, int, str]:
    """Start (or reuse) the local softtee kernel; return (host, port, platform fingerprint)."""
    home = home or embedded_home()
    with _locked(home):
        if local_platform_fingerprint(home) is None:
            subprocess.run(
                _enclave_cmd("init-platform", "--data-dir", str(home)), check=True, stdout=subprocess.DEVNULL
            )
        fp = local_platform_fingerprint(home)
        assert fp is not None
        found = _running(home)
        if found is not None:
            _say_if_shared(home)
            return (*found, fp)
        with contextlib.suppress(FileNotFoundError):
            (home / "kernel.json").unlink()
        # posix_spawn, not Popen: the kernel outlives this handle on purpose (it idles out by itself).
        log = str(home / "kernel.log")
        cmd = _enclave_cmd(
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--level",
            "softtee",
            "--data-dir",
            str(home),
            "--idle-timeout",
            str(IDLE_TIMEOUT),
        )
        pid = os.posix_spawn(
            cmd[0],
            cmd,
            dict(os.environ),
            setsid=True,
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_OPEN, 1, log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600),
                (os.POSIX_SPAWN_DUP2, 1, 2),
            ],
        )
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                msg = f"the embedded kernel exited at start (status {status}); see {home / 'kernel.log'}"
                raise KernelConnectionError(msg)
            found = _running(home)
            if found is not None:
                (home / _ORIGIN).write_text(json.dumps({"pid": pid, **_this_install()}))
                return (*found, fp)
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)
        msg = f"the embedded kernel did not start within {_START_TIMEOUT:.0f} s; see {home / 'kernel.log'}"
        raise KernelConnectionError(msg)
