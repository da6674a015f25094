"""The executor process: one per session, running the user's cells in a persistent namespace.

It is started by the supervisor with ``python -m mesatee_notebook.enclave.executor FD`` (a
fresh interpreter, never a fork, so it inherits no key material) and talks to it over the
Unix socket FD. It holds no keys: sealed storage goes through the supervisor.
"""

from __future__ import annotations

import ast
import errno
import io
import linecache
import os
import resource
import signal
import socket
import sys
import threading
import traceback
from types import FrameType
from typing import Any

from mesatee_notebook.enclave.hardening import harden_process
from mesatee_notebook.enclave.ipc import ipc_recv, ipc_send, pack_values, unpack_values
from mesatee_notebook.errors import EncodingError, MesateeError
from mesatee_notebook.wire.codecs import decode_value, encode_value

__all__ = ["Executor", "TrustedAPI", "main"]

_STREAM_FLUSH = 4096


class _StreamWriter(io.TextIOBase):
    """stdout/stderr replacement that streams text to the supervisor as it is written."""

    def __init__(self, ex: Executor, name: str) -> None:
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
            self._ex.send({"t": "stream", "name": self._name, "text": text})


class TrustedAPI:
    """The ``mesatee`` object inside enclave cells: trusted calls, and clearly named untrusted ones.

    * ``mesatee.open(name, mode)``: sealed storage, encrypted and bound to the measurement.
    * ``mesatee.untrusted_open(path, mode)``: the host's plain filesystem. The host sees and can change it.
    * ``mesatee.untrusted_log(message)``: a line in the host's log. The host reads it.
    """

    def __init__(self, ex: Executor) -> None:
        self._ex = ex

    def open(self, name: str, mode: str = "rb") -> io.BytesIO | io.TextIOWrapper:
        """Open a sealed object by name (``r``/``rb`` read; ``w``/``wb`` write on close)."""
        if mode not in ("r", "rb", "w", "wb"):
            msg = f"mesatee.open supports modes r, rb, w and wb, not {mode!r}"
            raise ValueError(msg)
        if mode.startswith("r"):
            data = self._ex.request({"t": "seal.get", "name": name})
            raw = io.BytesIO(data)
            return io.TextIOWrapper(raw, encoding="utf-8") if mode == "r" else raw
        ex = self._ex

        class _SealedWriter(io.BytesIO):
            def close(self) -> None:
                if not self.closed:
                    ex.request({"t": "seal.put", "name": name}, [self.getvalue()])
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
        data = self._ex.request({"t": "data.get", "name": name})
        return decode_value("arrow.frame", data)

    def untrusted_log(self, message: str) -> None:
        """Write a line to the host's log. UNTRUSTED: the host operator reads it."""
        self._ex.send({"t": "log", "text": str(message)})

    @property
    def keys(self) -> Any:
        """The KeyStore, as this session's party: sign/verify/encrypt/decrypt/public_key by name (never the bytes)."""
        from mesatee_notebook.enclave.faas_runtime import CellKeys

        return CellKeys(self._ex.request)

    def __repr__(self) -> str:
        return "<mesatee trusted API: open (sealed); untrusted_open, untrusted_log (host-visible)>"


class Executor:
    """Runs cells for one session; talks to the supervisor over ``sock``."""

    def __init__(self, sock: socket.socket, *, service_mode: bool = False) -> None:
        self.sock = sock
        self.service_mode = service_mode
        self.state: dict[str, Any] = {}
        self.lock = threading.RLock()
        self.running = False
        self.count = 0
        self.namespace: dict[str, Any] = {"__name__": "__mesatee__", "__builtins__": __builtins__}
        self.namespace["mesatee"] = TrustedAPI(self)
        self.limits: dict[str, Any] = {}

    def send(self, header: dict[str, Any], payloads: list[Any] | None = None) -> None:
        with self.lock:
            ipc_send(self.sock, header, payloads or [])

    def request(self, header: dict[str, Any], payloads: list[Any] | None = None) -> bytes:
        """A call to the supervisor in the middle of a cell (sealed storage)."""
        with self.lock:
            ipc_send(self.sock, header, payloads or [])
            reply = ipc_recv(self.sock)
        if reply.type == "error":
            from mesatee_notebook.errors import error_from_wire

            raise error_from_wire(reply.header)
        return bytes(reply.payloads[0]) if reply.payloads else b""

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        del signum, frame
        if self.running:
            raise KeyboardInterrupt

    def serve(self) -> None:
        signal.signal(signal.SIGINT, self._on_sigint)
        self.send({"t": "ready", "pid": os.getpid()})
        while True:
            try:
                msg = ipc_recv(self.sock)
            except EOFError:
                return
            if msg.type == "execute" and not self.service_mode:
                self.execute(msg)
            elif msg.type == "call" and self.service_mode:
                self.call(msg)
            elif msg.type == "shutdown":
                return
            else:
                self.send({"t": "error", "code": "protocol", "message": f"executor: unknown request {msg.type!r}"})

    def call(self, msg: Any) -> None:
        """Run a trusted service for the party named by the supervisor (service worker only)."""
        from mesatee_notebook.enclave.services import ServiceContext, dispatch

        header = msg.header
        try:
            inputs = {
                str(spec["name"]): decode_value(str(spec["kind"]), buf, meta=spec.get("meta"))
                for spec, buf in unpack_values(header.get("inputs", []), msg)
            }
            msg.payloads.clear()
            ctx = ServiceContext(self, str(header["party"]), self.state, fresh=bool(header.get("fresh")))
            args = header.get("args") or {}
            if not isinstance(args, dict):
                from mesatee_notebook.errors import MalformedFrame

                raise MalformedFrame("service arguments must be a map")  # noqa: EM101
            result = dispatch(str(header["service"]), ctx, args, inputs)
            values = []
            for name, value in result.values.items():
                enc = encode_value(value)
                values.append(({"name": f"out/{name}", "kind": enc.kind, "meta": enc.meta}, enc.parts, None))
            specs, payloads, fds = pack_values(values)
            self.send_with_fds({"t": "result", "values": specs, "info": result.info}, payloads, fds)
        except MesateeError as exc:
            self.send({"t": "error", **exc.to_wire()})
        except Exception as exc:
            # Only the class and message: a traceback of engine internals could quote data.
            self.send(
                {
                    "t": "error",
                    "code": "remote",
                    "message": f"{type(exc).__name__}: {exc}",
                    "details": {"ename": type(exc).__name__},
                }
            )

    def execute(self, msg: Any) -> None:
        header = msg.header
        allow_pickle = bool(header.get("allow_pickle", False))
        try:
            for spec, buf in unpack_values(header.get("inputs", []), msg):
                self.namespace[str(spec["name"])] = decode_value(
                    str(spec["kind"]), buf, allow_pickle=allow_pickle, meta=spec.get("meta")
                )
                del buf  # the decoded value keeps what it needs of the mapping
            msg.payloads.clear()
        except MesateeError as exc:
            self.send({"t": "error", **exc.to_wire()})
            return
        self.count += 1
        filename = f"<cell-{self.count}>"
        code = str(header.get("code", ""))
        out_stream, err_stream = _StreamWriter(self, "stdout"), _StreamWriter(self, "stderr")
        old = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = out_stream, err_stream
        value: Any = None
        failure: dict[str, Any] | None = None
        try:
            self.running = True
            value = self._run(code, filename)
        except KeyboardInterrupt:
            failure = {
                "code": "remote.interrupted",
                "message": "the cell was interrupted",
                "ename": "KeyboardInterrupt",
                "traceback": _user_traceback(*sys.exc_info()),
            }
        except BaseException as exc:
            # A kernel refusal raised inside the cell (e.g. PolicyViolation) keeps its type.
            failure = {
                "code": exc.code if isinstance(exc, MesateeError) else "remote",
                "message": exc.message if isinstance(exc, MesateeError) else f"{type(exc).__name__}: {exc}",
                "ename": type(exc).__name__,
                "traceback": _user_traceback(type(exc), exc, exc.__traceback__),
            }
            limit = _limit_message(exc, self.limits)
            if limit is not None:
                failure["code"], failure["message"], failure["limit"] = "remote.limit", limit[1], limit[0]
        finally:
            self.running = False
            sys.stdout, sys.stderr = old
            out_stream.flush()
            err_stream.flush()
        if failure is not None:
            code_ = failure.pop("code")
            message = failure.pop("message")
            self.send({"t": "error", "code": code_, "message": message, "details": failure})
            return
        self._reply(value, header.get("outputs", []), allow_pickle)

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

    def _reply(self, value: Any, outputs: list[Any], allow_pickle: bool) -> None:
        values = []
        missing = [str(n) for n in outputs if str(n) not in self.namespace]
        if missing:
            self.send(
                {
                    "t": "error",
                    "code": "not-found",
                    "message": f"the cell never set the declared output(s) {', '.join(map(repr, missing))}",
                    "details": {"names": missing},
                }
            )
            return
        value_repr = None
        try:
            for name in outputs:
                enc = encode_value(self.namespace[str(name)], allow_pickle=allow_pickle)
                values.append(({"name": f"out/{name}", "kind": enc.kind, "meta": enc.meta}, enc.parts, None))
        except EncodingError as exc:
            self.send({"t": "error", "code": exc.code, "message": f"output {name!r}: {exc.message}"})
            return
        if value is not None:
            try:
                enc = encode_value(value, allow_pickle=allow_pickle)
                values.append(({"name": "value", "kind": enc.kind, "meta": enc.meta}, enc.parts, None))
            except EncodingError:
                value_repr = repr(value)
        try:
            specs, payloads, fds = pack_values(values)
        except OSError as exc:
            size = sum(memoryview(p).nbytes for _, parts, _ in values for p in parts)
            self.send(
                {
                    "t": "error",
                    "code": "remote.limit",
                    "message": f"the outputs ({size / 2**20:.0f} MiB) do not fit the sandbox's /dev/shm "
                    f"({exc.strerror}); return less, or ask the operator to raise it (serve --tmp-size)",
                    "details": {"limit": "tmp-space"},
                }
            )
            return
        self.send_with_fds({"t": "result", "values": specs, "value_repr": value_repr}, payloads, fds)

    def send_with_fds(self, header: dict[str, Any], payloads: list[Any], fds: list[int]) -> None:
        with self.lock:
            ipc_send(self.sock, header, payloads, fds)


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


def _set_memory_limit(limit: int) -> None:
    if limit > 0:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``python -m mesatee_notebook.enclave.executor FD MEMORY_LIMIT [--service] [--confine JSON]``."""
    harden_process()  # before any import: not dumpable, no core files
    args = sys.argv[1:] if argv is None else argv
    fd = int(args[0])
    limit = int(args[1]) if len(args) > 1 else 0
    service_mode = "--service" in args[2:]
    confined: dict[str, Any] | None = None
    if "--confine" in args:
        import json

        from mesatee_notebook.enclave.sandbox import confine

        settings = json.loads(args[args.index("--confine") + 1])
        confined = confine(settings, [fd])  # rlimits and Landlock, before the engines load
        limit = 0  # the sandbox's address-space limit is already set, with room for allocators
    import numpy  # noqa: F401 - warm the engines the cells will use
    import pandas  # noqa: F401
    import pyarrow  # noqa: F401

    _set_memory_limit(limit)
    sock = socket.socket(fileno=fd)
    ex = Executor(sock, service_mode=service_mode)
    ex.limits = confined or {}
    try:
        ex.serve()
    except (EOFError, ConnectionError, OSError):
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
