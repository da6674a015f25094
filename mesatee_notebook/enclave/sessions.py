"""Sessions: one executor process each, with interrupt, timeout, crash detection and restart."""

from __future__ import annotations

import logging
import os
import secrets
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mesatee_notebook.enclave.ipc import ipc_recv, ipc_send
from mesatee_notebook.errors import ExecutorCrashed, MesateeError, PolicyViolation, RemoteTimeout
from mesatee_notebook.wire.stream import Message

__all__ = ["ExecutorHandle", "Session"]

log = logging.getLogger("mesatee.enclave")
_START_TIMEOUT = 120.0
_INTERRUPT_GRACE = 3.0


def _signal_name(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


class ExecutorHandle:
    """A running executor process and the supervisor's end of its Unix socket."""

    def __init__(self, memory_limit: int, *, service: bool = False) -> None:
        self.memory_limit = memory_limit
        self.service = service
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock = parent
        env = {k: v for k, v in os.environ.items() if not k.startswith("MESATEE_SECRET")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mesatee_notebook.enclave.executor", str(child.fileno()), str(memory_limit)]
            + (["--service"] if service else []),
            pass_fds=[child.fileno()],
            stdin=subprocess.DEVNULL,
            env=env,
            close_fds=True,
        )
        child.close()
        self.sock.settimeout(_START_TIMEOUT)
        try:
            ready = ipc_recv(self.sock)
        except (EOFError, OSError, MesateeError) as exc:
            self.kill()
            msg = f"the executor process failed to start ({_signal_name(self.proc.poll())})"
            raise ExecutorCrashed(msg) from exc
        finally:
            self.sock.settimeout(None)
        if ready.type != "ready":
            self.kill()
            msg = "the executor process sent an unexpected first message"
            raise ExecutorCrashed(msg)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        """Whether the executor can take a request: its process runs and its socket has not reached EOF.

        ``poll()`` alone is not enough: a killed multi-threaded worker shows as a zombie (and cannot take a
        request) before ``waitpid`` reports it, and its socket closes only when its last thread is gone. So the
        process state in /proc and EOF on the socket are checked too.
        """
        if self.proc.poll() is not None:
            return False
        try:
            stat = Path(f"/proc/{self.proc.pid}/stat").read_bytes()
            state = stat.rsplit(b")", 1)[1].split()[0]
            if state in (b"Z", b"X"):
                return False
        except (OSError, IndexError):
            pass  # no /proc (or the process is already reaped): poll() above and the socket below decide
        try:
            if self.sock.fileno() < 0:
                return False
            readable, _, _ = select.select([self.sock], [], [], 0)
            if readable and self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                return False
        except BlockingIOError:
            return True
        except (OSError, ValueError):
            return False
        return True

    def crashed_error(self) -> ExecutorCrashed:
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pass
        status = _signal_name(self.proc.poll())
        if self.service:
            msg = (
                f"the kernel's service worker died ({status}) during this call; nothing was released. "
                "The next call starts a new worker, which reloads state from sealed storage."
            )
            return ExecutorCrashed(msg, status=status)
        msg = (
            f"the session's executor process died ({status}); its namespace is lost. "
            "Restart the session to go on (Session.restart() or %mesatee restart)."
        )
        return ExecutorCrashed(msg, status=status)

    def interrupt(self) -> None:
        if self.alive:
            os.kill(self.proc.pid, signal.SIGINT)

    def kill(self) -> None:
        if self.alive:
            self.proc.kill()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            log.warning("executor %s did not exit after SIGKILL", self.proc.pid)
        self.sock.close()

    def shutdown(self) -> None:
        if self.alive:
            try:
                ipc_send(self.sock, {"t": "shutdown"})
                self.proc.wait(timeout=5)
            except (OSError, MesateeError, subprocess.TimeoutExpired):
                pass
        self.kill()

    def exchange(
        self,
        header: dict[str, Any],
        payloads: list[Any],
        fds: list[int],
        on_message: Callable[[Message], bool],
        timeout: float | None,
    ) -> Message:
        """Send a request and pump executor messages until ``on_message`` returns True.

        On timeout the cell is interrupted; if it does not stop within a grace period
        the executor is killed. Raises ExecutorCrashed if the process dies.
        """
        try:
            ipc_send(self.sock, header, payloads, fds)
        except (OSError, MesateeError) as exc:
            raise self.crashed_error() from exc
        deadline = None if timeout is None else time.monotonic() + timeout
        interrupted_at: float | None = None
        while True:
            wait: float | None = None
            if interrupted_at is not None:
                wait = max(0.01, interrupted_at + _INTERRUPT_GRACE - time.monotonic())
            elif deadline is not None:
                wait = max(0.01, deadline - time.monotonic())
            self.sock.settimeout(wait)
            try:
                msg = ipc_recv(self.sock)
            except TimeoutError:
                if interrupted_at is None:
                    interrupted_at = time.monotonic()
                    self.interrupt()
                    continue
                self.kill()
                msg_ = (
                    f"the cell ran past its timeout of {timeout:g} s and did not stop when interrupted; "
                    "the executor was killed and the session must be restarted"
                )
                raise RemoteTimeout(msg_, killed=True) from None
            except (EOFError, OSError, MesateeError) as exc:
                raise self.crashed_error() from exc
            finally:
                if self.sock.fileno() >= 0:
                    self.sock.settimeout(None)
            if on_message(msg):
                if interrupted_at is not None and msg.type == "error":
                    msg_ = f"the cell ran past its timeout of {timeout:g} s and was interrupted; the session is intact"
                    raise RemoteTimeout(
                        msg_, killed=False, traceback=msg.header.get("details", {}).get("traceback", "")
                    )
                return msg


@dataclass
class Session:
    """A named session: an executor, its owner connection, its state."""

    name: str
    memory_limit: int
    party: str | None = None
    id: str = field(default_factory=lambda: secrets.token_hex(8))
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    created: float = field(default_factory=time.time)
    executor: ExecutorHandle | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    busy: bool = False
    calls: int = 0

    def start(self, executor: ExecutorHandle | None = None) -> None:
        """Start a fresh executor, or adopt a pre-started one that has never run code."""
        self.executor = executor if executor is not None else ExecutorHandle(self.memory_limit)

    def check_token(self, token: Any) -> None:
        if not isinstance(token, str) or not secrets.compare_digest(token, self.token):
            msg = f"wrong token for session {self.name!r}: only the client that opened it may use it"
            raise PolicyViolation(msg)

    @property
    def state(self) -> str:
        if self.executor is None or not self.executor.alive:
            return "dead"
        return "busy" if self.busy else "idle"

    def restart(self) -> None:
        if self.executor is not None:
            self.executor.kill()
        self.start()

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown()
            self.executor = None

    def info(self) -> dict[str, Any]:
        return {
            "session": self.id,
            "name": self.name,
            "state": self.state,
            "created": self.created,
            "calls": self.calls,
            "pid": self.executor.pid if self.executor else None,
        }
