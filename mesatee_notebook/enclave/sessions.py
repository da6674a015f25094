"""Sessions: one executor process each, with interrupt, timeout, crash detection and restart."""

from __future__ import annotations

import json
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
from typing import TYPE_CHECKING, Any

from mesatee_notebook.enclave.ipc import ipc_recv, ipc_send
from mesatee_notebook.errors import (
    ExecutorCrashed,
    MesateeError,
    PolicyViolation,
    RemoteInterrupted,
    RemoteTimeout,
    ResourceLimitExceeded,
)
from mesatee_notebook.wire.arrow_chunks import ChunkLanding
from mesatee_notebook.wire.comm import UnixComm
from mesatee_notebook.wire.protocol import ProtocolMessage, Ready, Shutdown
from mesatee_notebook.wire.stream import Message

__all__ = ["ExecutorHandle", "KernelSession"]

log = logging.getLogger("mesatee.enclave")
_START_TIMEOUT = 120.0
_INTERRUPT_GRACE = 3.0
_WATCH_INTERVAL = 0.5
#: The executor's first statements: not dumpable (prctl PR_SET_DUMPABLE=0) before the package,
#: numpy or anything else is imported; then the executor module runs as ``__main__``.
_BOOT = (
    "import ctypes,runpy,sys\n"
    "if ctypes.CDLL(None,use_errno=True).prctl(4,0,0,0,0)!=0: sys.exit(70)\n"
    "runpy.run_module('mesatee_notebook.enclave.executor',run_name='__main__',alter_sys=True)"
)
_FRAME_TIMEOUT = 120.0
_CLK_TCK = os.sysconf("SC_CLK_TCK")

if TYPE_CHECKING:
    from mesatee_notebook.enclave.sandbox import Sandbox


def _signal_name(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


_LINK_BUFFER = 4 << 20
"""Send buffer of each end of an executor link (the kernel caps it at net.core.wmem_max, 4 MiB here)."""


class ExecutorHandle:
    """A running executor process and the supervisor's end of its Unix socket.

    With a :class:`~mesatee_notebook.enclave.sandbox.Sandbox` the process starts inside it
    (its own namespaces, uid, seccomp filter, Landlock and limits); ``sandbox=None`` is the
    ``--no-sandbox`` escape, which the kernel reports loudly.
    """

    def __init__(self, memory_limit: int, *, service: bool = False, sandbox: Sandbox | None = None) -> None:
        self.memory_limit = memory_limit
        self.service = service
        self.sandbox = sandbox
        self.uid: int | None = None
        self.limit_hit: ResourceLimitExceeded | None = None
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for end in (parent, child):  # room for a whole result chunk in flight, so the relay and the worker overlap
            end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _LINK_BUFFER)
        self.sock = parent
        #: The supervisor's end of the executor's link (the executor holds the other, in a SupervisorClient).
        self.comm = UnixComm(parent, url="unix://executor", peer="executor")
        argv = [sys.executable, "-c", _BOOT, str(child.fileno()), str(memory_limit)]
        if service:
            argv.append("--service")
        if sandbox is not None:
            argv += ["--confine", json.dumps(sandbox.confinement(service))]
            self.memory_limit = sandbox.limits.memory_for(service) or 0
            self.proc, self.uid = sandbox.spawn(argv, pass_fds=[child.fileno()], service=service)
        else:
            env = {k: v for k, v in os.environ.items() if not k.startswith("MESATEE_SECRET")}
            self.proc = subprocess.Popen(
                argv, pass_fds=[child.fileno()], stdin=subprocess.DEVNULL, env=env, close_fds=True
            )
        child.close()
        self.sock.settimeout(_START_TIMEOUT)
        try:
            ready = ipc_recv(self.comm)
        except (EOFError, OSError, MesateeError) as exc:
            self.kill()
            msg = f"the executor process failed to start ({self._status()})"
            raise ExecutorCrashed(msg) from exc
        finally:
            self.sock.settimeout(None)
        if ready.type != Ready.T:
            self.kill()
            msg = "the executor process sent an unexpected first message"
            raise ExecutorCrashed(msg)
        self.executor_pid = self._host_pid(Ready.from_header(ready.header).pid)
        self._cpu_base = 0.0

    def _host_pid(self, ns_pid: Any) -> int:
        """The executor's pid as the host sees it (inside its sandbox it has a PID namespace of its own)."""
        if self.sandbox is None or not isinstance(ns_pid, int):
            return self.proc.pid
        for pid in self._tree_pids()[1:]:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("NSpid:") and line.split()[-1] == str(ns_pid) and len(line.split()) > 2:
                    return pid
        msg = "the sandboxed executor could not be found among its sandbox's processes"
        raise ExecutorCrashed(msg)

    # -- the supervisor's watch over the sandbox -----------------------------------------------
    def _tree_pids(self) -> list[int]:
        """The sandbox's processes, from bubblewrap down, read from ``/proc/PID/task/*/children`` (no host scan)."""
        out, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            out.append(pid)
            try:
                for task in os.scandir(f"/proc/{pid}/task"):
                    with open(f"{task.path}/children") as fh:  # noqa: PTH123 - a /proc read on the hot path
                        todo.extend(int(c) for c in fh.read().split())
            except (OSError, ValueError):
                continue
        return out

    def cpu_seconds(self) -> float:
        """CPU time of the whole sandbox: each process's own, plus what its reaped children used."""
        total = 0
        for pid in self._tree_pids():
            try:
                with open(f"/proc/{pid}/stat", "rb") as fh:  # noqa: PTH123
                    fields = fh.read().rsplit(b")", 1)[1].split()
            except (OSError, IndexError):
                continue
            # after the ")" of comm: state is field 3, utime..cstime are fields 14..17
            total += sum(int(f) for f in fields[11:15])
        return total / _CLK_TCK

    def pss_bytes(self) -> int:
        """Proportional resident memory of the sandbox (pages shared by forked children count once)."""
        total = 0
        for pid in self._tree_pids():
            try:
                with open(f"/proc/{pid}/smaps_rollup", "rb") as fh:  # noqa: PTH123
                    for line in fh:
                        if line.startswith(b"Pss:"):
                            total += int(line.split()[1]) * 1024
                            break
            except (OSError, ValueError):
                continue
        # (memfds, which no page table counts until mapped, are refused inside a sandbox: see attestation/sandbox.py)
        return total

    def usage(self) -> tuple[int, float]:
        """(proportional resident bytes, CPU seconds) of every process in this executor's sandbox."""
        return self.pss_bytes(), self.cpu_seconds()

    def check_usage(self, cell_cpu: float | None = None) -> ResourceLimitExceeded | None:
        """Kill the sandbox if it is over its memory, or the running cell over its CPU time; say which."""
        if self.sandbox is None or not self.alive:
            return None
        rss, cpu = self.usage()
        hit: ResourceLimitExceeded | None = None
        mem = self.memory_limit
        if mem and rss > mem:
            what = "service worker" if self.service else "session"
            msg = (
                f"the {what}'s sandbox used {rss / 2**30:.1f} GiB of memory, over its limit of {mem / 2**30:.1f} GiB, "
                "and was stopped; nothing else was affected. Use less memory, or ask the operator to raise the "
                f"limit (serve --{'service' if self.service else 'cell'}-memory)."
            )
            hit = ResourceLimitExceeded(msg, limit="memory", used=rss, allowed=mem)
        elif cell_cpu is not None and cpu - self._cpu_base > cell_cpu:
            msg = (
                f"the cell used {cpu - self._cpu_base:.0f} s of CPU time, over the sandbox's limit of {cell_cpu:g} s "
                "per cell, and was stopped. Ask the operator to raise it (serve --cell-cpu)."
            )
            hit = ResourceLimitExceeded(msg, limit="cpu", used=cpu - self._cpu_base, allowed=cell_cpu)
        if hit is not None:
            log.warning("executor %s over its limit: %s", self.proc.pid, hit.details.get("limit"))
            self.limit_hit = hit
            self.proc.kill()
        return hit

    @property
    def pid(self) -> int:
        """The executor process's host pid (inside a sandbox, not bubblewrap's)."""
        return self.executor_pid

    def _status(self) -> str:
        code = self.proc.poll()
        # bubblewrap exits with 128 + N when the executor was killed by signal N.
        if self.sandbox is not None and code is not None and code > 128:
            code = -(code - 128)
        return _signal_name(code)

    @property
    def alive(self) -> bool:
        """Whether the executor can take a request: its process runs and its socket has not reached EOF.

        ``poll()`` alone is not enough: a killed multi-threaded worker shows as a zombie (and cannot take a
        request) before ``waitpid`` reports it, and its socket closes only when its last thread is gone. So the
        process state in /proc and EOF on the socket are checked too.
        """
        return self.proc.poll() is None and not self._zombie() and self._socket_open()

    def _zombie(self) -> bool:
        try:
            stat = Path(f"/proc/{self.proc.pid}/stat").read_bytes()
            return stat.rsplit(b")", 1)[1].split()[0] in (b"Z", b"X")
        except (OSError, IndexError):
            return False  # no /proc (or the process is already reaped): poll() and the socket decide

    def _socket_open(self) -> bool:
        try:
            if self.sock.fileno() < 0:
                return False
            readable, _, _ = select.select([self.sock], [], [], 0)
            return not (readable and self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"")
        except BlockingIOError:
            return True
        except (OSError, ValueError):
            return False

    def crashed_error(self) -> ExecutorCrashed | ResourceLimitExceeded:
        if self.limit_hit is not None:
            return self.limit_hit
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pass
        status = self._status()
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
            try:
                os.kill(self.executor_pid, signal.SIGINT)
            except ProcessLookupError:
                pass

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
                ipc_send(self.comm, Shutdown().to_header())
                self.proc.wait(timeout=5)
            except (OSError, MesateeError, subprocess.TimeoutExpired):
                pass
        self.kill()

    def exchange(
        self,
        header: dict[str, Any] | ProtocolMessage,
        payloads: list[Any],
        fds: list[int],
        on_message: Callable[[Message], bool],
        timeout: float | None,
        cell_cpu: float | None = None,
        client_alive: Callable[[], bool] | None = None,
    ) -> Message:
        """Send a request and pump executor messages until ``on_message`` returns True.

        On timeout the cell is interrupted; if it does not stop within a grace period
        the executor is killed. Raises ExecutorCrashed if the process dies. ``client_alive``
        (checked every half second) says whether anyone still waits for the answer: once it
        returns False the cell is interrupted, then killed the same way, and
        :class:`RemoteInterrupted` is raised (nobody is left to read the result).
        """
        if isinstance(header, ProtocolMessage):
            header = header.to_header()
        try:
            ipc_send(self.comm, header, payloads, fds)
        except (OSError, MesateeError) as exc:
            raise self.crashed_error() from exc
        watch = self.sandbox is not None
        if watch and cell_cpu is not None:  # only a cell's CPU is limited (a /proc walk of the sandbox per call)
            self._cpu_base = self.cpu_seconds()
        st = _Watch(timeout, None if timeout is None else time.monotonic() + timeout)
        landing = ChunkLanding() if self.service else None  # a service's result chunks, relayed one by one
        while True:
            if self._client_gone(st, client_alive):
                continue
            try:
                # Wait for the next message's first byte, then read it whole: a timeout never cuts a frame.
                readable = bool(select.select([self.sock], [], [], st.wait(watch or client_alive is not None))[0])
            except (OSError, ValueError) as exc:
                raise self.crashed_error() from exc
            if not readable:
                self._on_silence(st, watch, cell_cpu)
                continue
            msg = self._read(landing)
            if on_message(msg):
                return st.finish(msg)

    def _client_gone(self, st: _Watch, client_alive: Callable[[], bool] | None) -> bool:
        """Every half second: is anyone still waiting? If not, interrupt the cell (True: look again)."""
        if client_alive is None or st.interrupted_at is not None or time.monotonic() - st.checked < _WATCH_INTERVAL:
            return False
        st.checked = time.monotonic()
        if client_alive():
            return False
        log.warning("executor %s: the client went away during the cell; interrupting it", self.proc.pid)
        st.orphaned, st.interrupted_at = True, st.checked
        self.interrupt()
        return True

    def _on_silence(self, st: _Watch, watch: bool, cell_cpu: float | None) -> None:
        """Nothing arrived: check the sandbox's limits, interrupt at the deadline, kill after the grace period."""
        if watch:
            hit = self.check_usage(cell_cpu)
            if hit is not None:
                raise hit
        now = time.monotonic()
        if st.interrupted_at is None:
            if st.deadline is not None and now >= st.deadline:
                st.interrupted_at = now
                self.interrupt()
            return
        if now < st.interrupted_at + _INTERRUPT_GRACE:
            return
        self.kill()
        raise st.killed_error()

    def _read(self, landing: ChunkLanding | None = None) -> Message:
        """One whole message from the executor (it has started sending); its crash if it cannot."""
        try:
            self.sock.settimeout(_FRAME_TIMEOUT)  # OSError if another thread killed the worker meanwhile
            return ipc_recv(self.comm, allocator_for=landing.allocator_for if landing is not None else None)
        except (EOFError, OSError, MesateeError) as exc:
            if isinstance(exc, TimeoutError):
                self.kill()  # a frame started and stalled: the executor is not behaving
            raise self.crashed_error() from exc
        finally:
            if self.sock.fileno() >= 0:
                self.sock.settimeout(None)


@dataclass
class _Watch:
    """One exchange's clock: its deadline, and whether (and why) the cell was interrupted."""

    timeout: float | None
    deadline: float | None
    interrupted_at: float | None = None
    orphaned: bool = False  # the client went away: the cell is being stopped for nobody
    checked: float = field(default_factory=time.monotonic)

    def wait(self, watching: bool) -> float | None:
        """How long to wait for the executor's next message."""
        wait: float | None = None
        if self.interrupted_at is not None:
            wait = max(0.01, self.interrupted_at + _INTERRUPT_GRACE - time.monotonic())
        elif self.deadline is not None:
            wait = max(0.01, self.deadline - time.monotonic())
        if watching:
            wait = _WATCH_INTERVAL if wait is None else min(wait, _WATCH_INTERVAL)
        return wait

    def killed_error(self) -> RemoteInterrupted | RemoteTimeout:
        """Why the executor was killed: its client went away, or the cell ran past its timeout."""
        if self.orphaned:
            msg = "the client went away during the cell, which did not stop when interrupted: executor killed"
            return RemoteInterrupted(msg, killed=True)
        msg = (
            f"the cell ran past its timeout of {self.timeout:g} s and did not stop when interrupted; "
            "the executor was killed and the session must be restarted"
        )
        return RemoteTimeout(msg, killed=True)

    def finish(self, msg: Message) -> Message:
        """The final message, unless the cell was interrupted on the way (then why, as an error)."""
        if self.orphaned:
            text = "the client went away during the cell; it was interrupted and the session is intact"
            raise RemoteInterrupted(text, killed=False)
        if self.interrupted_at is not None and msg.type == "error":
            text = f"the cell ran past its timeout of {self.timeout:g} s and was interrupted; the session is intact"
            raise RemoteTimeout(text, killed=False, traceback=msg.header.get("details", {}).get("traceback", ""))
        return msg


@dataclass
class KernelSession:
    """The kernel's record of one client session: its executor, its owner's token, its state.

    (The client's handle on it is :class:`mesatee_notebook.remote.session.Session`.)
    """

    name: str
    memory_limit: int
    party: str | None = None
    sandbox: Sandbox | None = None
    id: str = field(default_factory=lambda: secrets.token_hex(8))
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    created: float = field(default_factory=time.time)
    executor: ExecutorHandle | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    busy: bool = False
    calls: int = 0

    def start(self, executor: ExecutorHandle | None = None) -> None:
        """Start a fresh executor, or adopt a pre-started one that has never run code."""
        self.executor = executor if executor is not None else ExecutorHandle(self.memory_limit, sandbox=self.sandbox)

    @property
    def sealed_prefix(self) -> str:
        """The sealed namespace of this session: the party's, or one per anonymous session."""
        return f"cells/{self.party}" if self.party else f"cells/anon-{self.id}"

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
