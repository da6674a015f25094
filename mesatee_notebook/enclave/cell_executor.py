"""The cell executor: one process per session, running the user's cells in a persistent namespace.

It is started by the supervisor (``python -m mesatee_notebook.enclave.executor FD ...``, see ``executor.py``) and
talks to it through a :class:`~mesatee_notebook.enclave.supervisor_client.SupervisorClient`. It holds no keys:
sealed storage goes through the supervisor. It never imports a trusted service.
"""

from __future__ import annotations

import ast
import errno
import io
import linecache
import os
import signal
import sys
import traceback
from types import FrameType
from typing import Any

from mesatee_notebook.enclave.ipc import unpack_values
from mesatee_notebook.enclave.supervisor_client import SupervisorClient
from mesatee_notebook.errors import EncodingError, MesateeError
from mesatee_notebook.wire.codecs import decode_value, encode_value
from mesatee_notebook.wire.protocol import (
    DataGet,
    ExecutorError,
    LogLine,
    ProtocolMessage,
    Ready,
    RunCell,
    SealGet,
    SealPut,
    Shutdown,
    Stream,
)
from mesatee_notebook.wire.stream import Message

__all__ = ["CellExecutor", "TrustedAPI"]

_STREAM_FLUSH = 4096


class _StreamWriter(io.TextIOBase):
    """stdout/stderr replacement that streams text to the supervisor as it is written."""

    def __init__(self, ex: CellExecutor, name: str) -> None:
        self._ex = ex
        self._name = name
        self._buf: list[str] = []
        self._size = 0

    @property
    def name(self) -> str:
        return f"<mesatee {self._name}>"

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        if not isinstance(s, str):
            msg = f"write() argument must be str, not {type(s).__name__}"
            raise TypeError(msg)
        self._buf.append(s)
        self._size += len(s)
        if "\n" in s or self._size >= _STREAM_FLUSH:
            self.flush()
        return len(s)

    def flush(self) -> None:
        if self._buf:
            text = "".join(self._buf)
            self._buf.clear()
            self._size = 0
            self._ex.client.send(Stream(self._name, text))


class TrustedAPI:
    """The ``mesatee`` object inside enclave cells: trusted calls, and clearly named untrusted ones.

    * ``mesatee.open(name, mode)``: sealed storage, encrypted and bound to the measurement.
    * ``mesatee.untrusted_open(path, mode)``: the host's plain filesystem. The host sees and can change it.
    * ``mesatee.untrusted_log(message)``: a line in the host's log. The host reads it.
    """

    def __init__(self, ex: CellExecutor) -> None:
        self._ex = ex

    def open(self, name: str, mode: str = "rb") -> io.BytesIO | io.TextIOWrapper:
        """Open a sealed object by name (``r``/``rb`` read; ``w``/``wb`` write on close)."""
        if mode not in ("r", "rb", "w", "wb"):
            msg = f"mesatee.open supports modes r, rb, w and wb, not {mode!r}"
            raise ValueError(msg)
        if mode.startswith("r"):
            data = self._ex.client.request(SealGet(name))
            raw = io.BytesIO(data)
            return io.TextIOWrapper(raw, encoding="utf-8") if mode == "r" else raw
        ex = self._ex

        class _SealedWriter(io.BytesIO):
            def close(self) -> None:
                if not self.closed:
                    ex.client.request(SealPut(name), [self.getvalue()])
                super().close()

        writer = _SealedWriter()
        return io.TextIOWrapper(writer, encoding="utf-8", write_through=True) if mode == "w" else writer

    def untrusted_open(self, path: str, mode: str = "r", **kwargs: Any) -> Any:
        """Open a file on the host, in the clear. UNTRUSTED: the host (and other parties' cells) can read and alter it.

        In a sandbox only the directory the operator shares (``serve --untrusted-dir DIR``) is there.
        """
        limits = self._ex.limits
        if limits:
            shared = limits.get("untrusted_dir")
            if not shared:
                msg = (
                    "mesatee.untrusted_open: this kernel shares no host directory with cells (each cell runs in a "
                    "sandbox that sees none of the host's files). The operator can share one: serve --untrusted-dir DIR"
                )
                raise PermissionError(msg)
            real = os.path.realpath(path)
            if not (real == shared or real.startswith(shared.rstrip("/") + "/")):
                msg = f"mesatee.untrusted_open: only files under the shared host directory {shared} are reachable"
                raise PermissionError(msg)
        return open(path, mode, **kwargs)  # noqa: PTH123 - a plain host file by design

    def dataframe(self, name: str) -> Any:
        """A dataset in the enclave, as a pandas DataFrame, if its owner's policy gives this party code access."""
        data = self._ex.client.request(DataGet(name))
        return decode_value("arrow.frame", data)

    def untrusted_log(self, message: str) -> None:
        """Write a line to the host's log. UNTRUSTED: the host operator reads it."""
        self._ex.client.send(LogLine(str(message)))

    @property
    def keys(self) -> Any:
        """The KeyStore, as this session's party: sign/verify/encrypt/decrypt/public_key by name (never the bytes)."""
        from mesatee_notebook.enclave.faas_runtime import CellKeys

        return CellKeys(self._ex.client.request)

    def __repr__(self) -> str:
        return "<mesatee trusted API: open (sealed); untrusted_open, untrusted_log (host-visible)>"


class CellExecutor:
    """Runs cells for one session; talks to the supervisor through ``client``."""

    def __init__(self, client: SupervisorClient, *, limits: dict[str, Any] | None = None) -> None:
        self.client = client
        self.running = False
        self.count = 0
        self.namespace: dict[str, Any] = {"__name__": "__mesatee__", "__builtins__": __builtins__}
        self.namespace["mesatee"] = TrustedAPI(self)
        self.limits: dict[str, Any] = limits or {}

    def request(self, header: dict[str, Any] | ProtocolMessage, payloads: list[Any] | None = None) -> bytes:
        """A request to the supervisor (what a cell can reach of the link: the supervisor decides what it answers)."""
        return self.client.request(header, payloads)

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        del signum, frame
        if self.running:
            raise KeyboardInterrupt

    def serve(self) -> None:
        """Answer the supervisor's orders until it says shutdown or hangs up."""
        signal.signal(signal.SIGINT, self._on_sigint)
        self.client.send(Ready(os.getpid()))
        while True:
            try:
                msg = self.client.receive()
            except EOFError:
                return
            if msg.type == RunCell.T:
                self.execute(RunCell.from_header(msg.header), msg)
            elif msg.type == Shutdown.T:
                return
            else:  # a service call (or anything else) is not for a cell executor
                self.client.send(ExecutorError("protocol", f"executor: unknown request {msg.type!r}"))

    def execute(self, order: RunCell, msg: Message) -> None:
        """Run one cell: bind its inputs, run it with output streamed, answer with its outputs or its error."""
        try:
            for spec, buf in unpack_values(list(order.inputs), msg):
                self.namespace[str(spec["name"])] = decode_value(
                    str(spec["kind"]), buf, allow_pickle=order.allow_pickle, meta=spec.get("meta")
                )
                del buf  # the decoded value keeps what it needs of the mapping
            msg.payloads.clear()
        except MesateeError as exc:
            self.client.error(exc)
            return
        self.count += 1
        filename = f"<cell-{self.count}>"
        out_stream, err_stream = _StreamWriter(self, "stdout"), _StreamWriter(self, "stderr")
        old = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = out_stream, err_stream
        value: Any = None
        failure: ExecutorError | None = None
        try:
            self.running = True
            value = self._run(order.code, filename)
        except KeyboardInterrupt:
            tb = _user_traceback(*sys.exc_info())
            failure = ExecutorError(
                "remote.interrupted",
                "the cell was interrupted",
                {"ename": "KeyboardInterrupt", "traceback": tb},
            )
        except BaseException as exc:
            failure = self._failure(exc)
        finally:
            self.running = False
            sys.stdout, sys.stderr = old
            out_stream.flush()
            err_stream.flush()
        if failure is not None:
            self.client.send(failure)
            return
        self._reply(value, list(order.outputs), order.allow_pickle)

    def _failure(self, exc: BaseException) -> ExecutorError:
        """A cell's exception as a typed error; a kernel refusal raised inside the cell keeps its type."""
        details = {"ename": type(exc).__name__, "traceback": _user_traceback(type(exc), exc, exc.__traceback__)}
        code = exc.code if isinstance(exc, MesateeError) else "remote"
        message = exc.message if isinstance(exc, MesateeError) else f"{type(exc).__name__}: {exc}"
        limit = _limit_message(exc, self.limits)
        if limit is not None:
            code, message, details["limit"] = "remote.limit", limit[1], limit[0]
        return ExecutorError(code, message, details)

    def _run(self, code: str, filename: str) -> Any:
        linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
        tree = ast.parse(code, filename=filename, mode="exec")
        last: ast.expr | None = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last = tree.body.pop().value  # type: ignore[attr-defined]
        exec(compile(tree, filename, "exec"), self.namespace)
        if last is not None:
            expr = ast.Expression(body=last)
            return eval(compile(expr, filename, "eval"), self.namespace)  # noqa: S307 - the user's cell
        return None

    def _reply(self, value: Any, outputs: list[str], allow_pickle: bool) -> None:
        missing = [n for n in outputs if n not in self.namespace]
        if missing:
            message = f"the cell never set the declared output(s) {', '.join(map(repr, missing))}"
            self.client.send(ExecutorError("not-found", message, {"names": missing}))
            return
        values = []
        value_repr = None
        try:
            for name in outputs:
                enc = encode_value(self.namespace[name], allow_pickle=allow_pickle)
                values.append(({"name": f"out/{name}", "kind": enc.kind, "meta": enc.meta}, enc.parts, None))
        except EncodingError as exc:
            self.client.send(ExecutorError(exc.code, f"output {name!r}: {exc.message}"))
            return
        if value is not None:
            try:
                enc = encode_value(value, allow_pickle=allow_pickle)
                values.append(({"name": "value", "kind": enc.kind, "meta": enc.meta}, enc.parts, None))
            except EncodingError:
                value_repr = repr(value)
        try:
            self.client.result(values, value_repr=value_repr)
        except OSError as exc:
            size = sum(memoryview(p).nbytes for _, parts, _ in values for p in parts)
            message = (
                f"the outputs ({size / 2**20:.0f} MiB) do not fit the sandbox's /dev/shm "
                f"({exc.strerror}); return less, or ask the operator to raise it (serve --tmp-size)"
            )
            self.client.send(ExecutorError("remote.limit", message, {"limit": "tmp-space"}))


def _user_traceback(etype: Any, exc: Any, tb: Any) -> str:
    """Format the traceback keeping only frames from the user's cells."""
    te = traceback.TracebackException(etype, exc, tb, capture_locals=False)
    te.stack = traceback.StackSummary.from_list([f for f in te.stack if f.filename.startswith("<cell-")])
    return "".join(te.format())


def _limit_message(exc: BaseException, limits: dict[str, Any]) -> tuple[str, str] | None:
    """(limit, message) when a cell's exception is the sandbox saying no."""
    if not limits:
        return None
    gib = 2**30
    if isinstance(exc, MemoryError):
        allowed = limits.get("RLIMIT_AS")
        size = f" of {allowed / gib:.0f} GiB" if allowed else ""
        return "memory", (
            f"MemoryError: the cell ran out of memory: its sandbox allows an address space{size}. "
            "The session is intact; use less memory or ask the operator to raise it (serve --cell-memory)."
        )
    if isinstance(exc, OSError):
        if exc.errno == errno.EFBIG:
            return "file-size", (
                f"OSError: file too large: the sandbox limits a file to {limits.get('RLIMIT_FSIZE', 0) / gib:.1f} GiB "
                "(serve --max-file-size)."
            )
        if exc.errno == errno.ENOSPC:
            return "tmp-space", (
                "OSError: no space left: the session's private /tmp and /dev/shm are small memory-backed "
                "file systems (serve --tmp-size). Keep large results in memory or in mesatee.open (sealed)."
            )
        if exc.errno == errno.EAGAIN and isinstance(exc, BlockingIOError):
            return "processes", (
                f"BlockingIOError: resource temporarily unavailable: if the cell was starting processes or threads, "
                f"its sandbox allows {limits.get('RLIMIT_NPROC', '?')} per session (serve --max-processes)."
            )
    return None
