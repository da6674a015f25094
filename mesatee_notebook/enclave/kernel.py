"""The supervisor: the TLS server that ends the attested channel, owns the keys and signs receipts.

One thread per connection; each connection is strictly request → (stream frames) → reply,
so a socket is only ever read and written by its own thread. An interrupt for a busy
session arrives on a *second* connection with the session's token.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import secrets
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mesatee_notebook.attestation.levels import Level
from mesatee_notebook.attestation.measurement import build_manifest
from mesatee_notebook.attestation.receipts import build_receipt
from mesatee_notebook.enclave.hardening import harden_process
from mesatee_notebook.enclave.identity import KernelIdentity
from mesatee_notebook.enclave.ipc import unpack_values
from mesatee_notebook.enclave.platform import load_platform
from mesatee_notebook.enclave.sessions import Session
from mesatee_notebook.enclave.shm import SharedAllocator
from mesatee_notebook.errors import (
    MalformedFrame,
    MesateeError,
    NotFound,
    PolicyViolation,
    ProtocolError,
)
from mesatee_notebook.wire.framing import Limits
from mesatee_notebook.wire.messages import REQUEST_TYPES, negotiate, require
from mesatee_notebook.wire.stream import Message, recv_message, send_message

__all__ = ["AVAILABLE_LEVELS", "Kernel", "KernelConfig"]

log = logging.getLogger("mesatee.enclave")
host_log = logging.getLogger("mesatee.host")

AVAILABLE_LEVELS = frozenset({Level.UNPROTECTED, Level.SOFTTEE})
_NONCE_MEMORY = 1 << 20


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mesatee_notebook")
    except PackageNotFoundError:
        return "0+unknown"


@dataclass
class KernelConfig:
    """How a kernel serves."""

    data_dir: Path
    level: Level = Level.SOFTTEE
    host: str = "127.0.0.1"
    port: int = 7443
    limits: Limits = field(default_factory=Limits)
    executor_memory: int = 0
    max_cell_timeout: float = 24 * 3600.0
    idle_timeout: float | None = None
    cert_lifetime: float = 7 * 24 * 3600.0
    refresh_interval: float = 3600.0
    max_connections: int = 256
    body_timeout: float = 120.0
    handshake_timeout: float = 20.0


class _NonceGuard:
    """Refuses a request nonce seen before (bounded memory, oldest forgotten first)."""

    def __init__(self, size: int = _NONCE_MEMORY) -> None:
        self._seen: set[str] = set()
        self._order: collections.deque[str] = collections.deque()
        self._size = size
        self._lock = threading.Lock()

    def claim(self, nonce: Any) -> str:
        if not isinstance(nonce, str) or not 16 <= len(nonce) <= 128:
            msg = "a request needs a fresh random nonce of 16 to 128 characters"
            raise MalformedFrame(msg)
        with self._lock:
            if nonce in self._seen:
                msg = "this request nonce was already used: refusing a replayed request"
                raise PolicyViolation(msg, check="replay")
            self._seen.add(nonce)
            self._order.append(nonce)
            if len(self._order) > self._size:
                self._seen.discard(self._order.popleft())
        return nonce


class _Connection:
    """Server side of one client connection."""

    def __init__(self, kernel: Kernel, sock: ssl.SSLSocket, peer: str) -> None:
        self.kernel = kernel
        self.sock = sock
        self.peer = peer
        self.sessions: dict[str, Session] = {}
        self.hello_done = False

    def reply(self, header: dict[str, Any], payloads: list[Any] | None = None) -> None:
        send_message(self.sock, header, payloads or [])

    def error(self, re: Any, exc: MesateeError) -> None:
        self.reply({"t": "error", "re": re, **exc.to_wire()})

    def serve(self) -> None:
        cfg = self.kernel.config
        while not self.kernel.stopping.is_set():
            alloc = SharedAllocator()
            try:
                msg = recv_message(self.sock, cfg.limits, allocator=alloc, digests=True, body_timeout=cfg.body_timeout)
            except EOFError:
                alloc.close()
                return
            except ProtocolError as exc:
                # The byte stream cannot be trusted past a bad frame: say why, then hang up.
                alloc.close()
                log.warning("closing %s: %s", self.peer, exc)
                self._try_error(None, exc)
                return
            except (OSError, MesateeError) as exc:
                alloc.close()
                log.info("connection %s ended: %s", self.peer, exc)
                return
            try:
                self.dispatch(msg, alloc)
            except MesateeError as exc:
                self._try_error(msg.header.get("id"), exc)
            except Exception as exc:  # a bug must not take the connection down with it
                log.exception("internal error handling %r from %s", msg.type, self.peer)
                self._try_error(
                    msg.header.get("id"),
                    MesateeError(f"internal error in the kernel ({type(exc).__name__}); see the kernel log"),
                )
            finally:
                msg.payloads.clear()  # unmap large inputs now, not when the next request arrives
                del msg
                alloc.close()

    def _try_error(self, re: Any, exc: MesateeError) -> None:
        try:
            self.error(re, exc)
        except (OSError, MesateeError):
            pass

    def dispatch(self, msg: Message, alloc: SharedAllocator) -> None:
        t = msg.type
        rid = msg.header.get("id")
        if t not in REQUEST_TYPES:
            raise ProtocolError(f"unknown message type {t!r}", type=t)  # noqa: EM102
        if not self.hello_done and t != "hello":
            msg_ = "the first message must be 'hello' (protocol version handshake)"
            raise ProtocolError(msg_)
        handler = getattr(self, "on_" + t.replace(".", "_"))
        handler(msg, alloc, rid)

    # -- handlers -------------------------------------------------------------------------------
    def on_hello(self, msg: Message, alloc: SharedAllocator, rid: Any) -> None:
        version = negotiate(
            msg.header.get("versions"), client_version=str(msg.header.get("client", "?")), server_version=_version()
        )
        self.hello_done = True
        k = self.kernel
        self.reply(
            {
                "t": "hello.ok",
                "re": rid,
                "protocol": version,
                "server": _version(),
                "level": k.identity.level.label,
                "measurement": k.identity.measurement,
                "kernel_nonce": secrets.token_hex(16),
            }
        )

    def on_ping(self, msg: Message, alloc: SharedAllocator, rid: Any) -> None:
        self.reply({"t": "pong", "re": rid, "time": time.time()})

    def on_session_open(self, msg: Message, alloc: SharedAllocator, rid: Any) -> None:
        name = msg.header.get("name") or "default"
        if not isinstance(name, str) or len(name) > 128:
            raise MalformedFrame("session name must be a string of at most 128 characters")  # noqa: EM101
        session = self.kernel.open_session(name)
        self.sessions[session.id] = session
        self.reply({"t": "session.ok", "re": rid, "token": session.token, **session.info()})

    def _session(self, msg: Message) -> Session:
        sid = msg.header.get("session")
        session = self.kernel.sessions.get(str(sid))
        if session is None:
            raise NotFound(f"no session {sid!r} on this kernel (it was closed, or the kernel restarted)")  # noqa: EM102
        session.check_token(msg.header.get("token"))
        return session

    def on_session_close(self, msg: Message, alloc: SharedAllocator, rid: Any) -> None:
        session = self._session(msg)
        self.sessions.pop(session.id, None)
        self.kernel.close_session(session)
        self.reply({"t": "session.closed", "re": rid, "session": session.id})

    def on_session_restart(self, msg: Message, alloc: SharedAllocator, rid: Any) -> None:
        session = self._session(msg)
        with session.lock:
            session.restart()
        self.reply({"t": "session.ok", "re": rid, **session.info()})

    def on_session_list(self, msg: Message, alloc: SharedAllocator, rid: Any) -> None:
        self.reply({"t": "session.list", "re": rid, "sessions": [s.info() for s in self.sessions.values()]})

    def on_interrupt(self, msg: Message, alloc: SharedAllocator, rid: Any) -> None:
        session = self._session(msg)
        was_busy = session.busy
        if was_busy and session.executor is not None:
            session.executor.interrupt()
        self.reply({"t": "interrupt.ok", "re": rid, "interrupted": was_busy})

    def on_call(self, msg: Message, alloc: SharedAllocator, rid: Any) -> None:
        msg_ = f"service {msg.header.get('service')!r} is not available in this kernel version"
        raise NotFound(msg_)

    def on_execute(self, msg: Message, alloc: SharedAllocator, rid: Any) -> None:
        k = self.kernel
        session = self._session(msg)
        nonce = k.nonces.claim(msg.header.get("nonce"))
        code = require(msg.header, "code", str)
        outputs = msg.header.get("outputs") or []
        inputs = msg.header.get("inputs") or []
        if not isinstance(outputs, list) or not all(isinstance(o, str) and o.isidentifier() for o in outputs):
            raise MalformedFrame("outputs must be a list of Python identifiers")  # noqa: EM101
        if not isinstance(inputs, list) or len(inputs) != len(msg.payloads):
            raise MalformedFrame("each input needs exactly one payload")  # noqa: EM101
        timeout = msg.header.get("timeout")
        limit = k.config.max_cell_timeout
        timeout = limit if not isinstance(timeout, (int, float)) or timeout <= 0 else min(float(timeout), limit)
        digests = msg.digests or []
        input_digests: dict[str, str] = {}
        specs: list[dict[str, Any]] = []
        payloads: list[Any] = []
        fds: list[int] = []
        for i, (spec, buf) in enumerate(zip(inputs, msg.payloads, strict=True)):
            if not isinstance(spec, dict) or not str(spec.get("name", "")).isidentifier():
                raise MalformedFrame("each input needs a name that is a Python identifier")  # noqa: EM101
            input_digests[str(spec["name"])] = digests[i]
            out = {"name": spec["name"], "kind": spec.get("kind"), "meta": spec.get("meta") or {}}
            fd = alloc.fd_of(buf)
            if fd is not None:
                out["fd"] = len(fds)
                fds.append(os.dup(fd))
            else:
                out["inline"] = len(payloads)
                payloads.append(buf)
            specs.append(out)
        if not session.lock.acquire(blocking=False):
            for fd in fds:
                os.close(fd)
            raise PolicyViolation(f"session {session.name!r} is busy with another cell")  # noqa: EM102
        stdout_h, stderr_h = hashlib.sha256(), hashlib.sha256()
        started = time.time()
        try:
            session.busy = True
            session.calls += 1
            if session.executor is None or not session.executor.alive:
                for fd in fds:
                    os.close(fd)
                raise (session.executor.crashed_error() if session.executor else NotFound("session is closed"))

            def on_message(m: Message) -> bool:
                if m.type == "stream":
                    text = str(m.header.get("text", ""))
                    name = "stderr" if m.header.get("name") == "stderr" else "stdout"
                    (stderr_h if name == "stderr" else stdout_h).update(text.encode())
                    self.reply({"t": "stream", "re": rid, "name": name, "text": text})
                    return False
                if m.type == "log":
                    host_log.info("[session %s] %s", session.name, m.header.get("text"))
                    return False
                if m.type in ("seal.get", "seal.put"):
                    k.handle_seal(session, m)
                    return False
                return True

            executor = session.executor
            result = executor.exchange(
                {
                    "t": "execute",
                    "code": code,
                    "inputs": specs,
                    "outputs": outputs,
                    "allow_pickle": bool(msg.header.get("allow_pickle", False)),
                },
                payloads,
                fds,
                on_message,
                timeout,
            )
        finally:
            session.busy = False
            session.lock.release()
        if result.type == "error":
            details = result.header.get("details") or {}
            from mesatee_notebook.errors import error_from_wire

            raise error_from_wire(
                {"code": result.header.get("code"), "message": result.header.get("message"), "details": details}
            )
        values = unpack_values(result.header.get("values", []), result)
        subjects = {"stdout": stdout_h.hexdigest(), "stderr": stderr_h.hexdigest()}
        value_specs = []
        out_payloads = []
        for spec, buf in values:
            subjects[str(spec["name"])] = hashlib.sha256(memoryview(buf).cast("B")).hexdigest()
            value_specs.append({"name": spec["name"], "kind": spec["kind"], "meta": spec.get("meta") or {}})
            out_payloads.append(buf)
        value_repr = result.header.get("value_repr")
        if isinstance(value_repr, str):
            subjects["value_repr"] = hashlib.sha256(value_repr.encode()).hexdigest()
        predicate = {
            "kind": "execute",
            "measurement": k.identity.measurement,
            "level": k.identity.level.label,
            "session": session.id,
            "nonce": nonce,
            "code": {"sha256": hashlib.sha256(code.encode()).hexdigest()},
            "inputs": input_digests,
            "startedAt": started,
            "finishedAt": time.time(),
        }
        receipt = k.sign_receipt(subjects, predicate)
        self.reply(
            {"t": "result", "re": rid, "values": value_specs, "value_repr": value_repr, "receipt": receipt},
            out_payloads,
        )


class Kernel:
    """The enclave kernel's supervisor."""

    def __init__(self, config: KernelConfig) -> None:
        self.config = config
        config.level.require_available(AVAILABLE_LEVELS)
        self.hardening = harden_process()
        platform_key = None
        self.sealing_secret: bytes | None = None
        self.platform_fingerprint = "none"
        if config.level is Level.SOFTTEE:
            platform = load_platform(config.data_dir)
            platform_key = platform.key
            self.sealing_secret = platform.sealing_secret
            self.platform_fingerprint = platform.fingerprint
        self.identity = KernelIdentity.create(config.level, build_manifest(), platform_key, config.cert_lifetime)
        self.sessions: dict[str, Session] = {}
        self.nonces = _NonceGuard()
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._connections = 0
        self._last_activity = time.monotonic()
        self._listener: socket.socket | None = None
        self.address: tuple[str, int] = (config.host, config.port)
        self._sealed: dict[str, bytes] = {}

    # -- sessions -------------------------------------------------------------------------------
    def open_session(self, name: str) -> Session:
        session = Session(name=name, memory_limit=self.config.executor_memory)
        session.start()
        with self._lock:
            self.sessions[session.id] = session
        log.info("session %s (%s) opened, executor pid %s", session.id, name, session.executor and session.executor.pid)
        return session

    def close_session(self, session: Session) -> None:
        with self._lock:
            self.sessions.pop(session.id, None)
        session.close()

    def handle_seal(self, session: Session, m: Message) -> None:
        from mesatee_notebook.enclave.ipc import ipc_send

        assert session.executor is not None
        name = str(m.header.get("name", ""))
        store = self.sealed_store()
        try:
            if m.type == "seal.put":
                store.put(f"cells/{name}", bytes(m.payloads[0]) if m.payloads else b"")
                ipc_send(session.executor.sock, {"t": "seal.ok"})
            else:
                data = store.get(f"cells/{name}")
                ipc_send(session.executor.sock, {"t": "seal.ok"}, [data])
        except MesateeError as exc:
            ipc_send(session.executor.sock, {"t": "error", **exc.to_wire()})

    def sealed_store(self) -> Any:
        from mesatee_notebook.enclave.sealing import SealedStore

        if self.sealing_secret is None:
            msg = "sealed storage needs a softtee (or hardware) platform; an unprotected kernel has no sealing key"
            raise PolicyViolation(msg)
        return SealedStore(self.config.data_dir / "sealed", self.sealing_secret, self.identity.measurement)

    def sign_receipt(self, subjects: dict[str, str], predicate: dict[str, Any]) -> dict[str, Any]:
        ident = self.identity
        return build_receipt(
            subjects=subjects,
            predicate=predicate,
            certificate_der=ident.certificate_der,
            sign=ident.sign_receipt,
            keyid=hashlib.sha256(ident.receipt_public).hexdigest()[:16],
        )

    # -- serving --------------------------------------------------------------------------------
    def bind(self) -> tuple[str, int]:
        """Bind and listen; record the address in DATA_DIR/kernel.json for local clients."""
        family = socket.AF_INET6 if ":" in self.config.host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.config.host, self.config.port))
        listener.listen(64)
        self._listener = listener
        host, port = listener.getsockname()[:2]
        self.address = (host, port)
        info = {
            "host": host,
            "port": port,
            "pid": os.getpid(),
            "level": self.config.level.label,
            "platform": self.platform_fingerprint,
            "started": time.time(),
            "measurement": self.identity.measurement,
        }
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.config.data_dir / f".kernel.json.{os.getpid()}"
        tmp.write_text(json.dumps(info))
        tmp.replace(self.config.data_dir / "kernel.json")
        return host, port

    def serve_forever(self) -> None:
        if self._listener is None:
            self.bind()
        assert self._listener is not None
        self._listener.settimeout(1.0)
        threading.Thread(target=self._refresher, name="mesatee-refresh", daemon=True).start()
        try:
            while not self.stopping.is_set():
                try:
                    conn, addr = self._listener.accept()
                except TimeoutError:
                    self._check_idle()
                    continue
                except OSError:
                    if self.stopping.is_set():
                        break
                    raise
                with self._lock:
                    if self._connections >= self.config.max_connections:
                        conn.close()
                        log.warning("refused %s: too many connections", addr)
                        continue
                    self._connections += 1
                    self._last_activity = time.monotonic()
                threading.Thread(target=self._handle, args=(conn, f"{addr[0]}:{addr[1]}"), daemon=True).start()
        finally:
            self.shutdown()

    def _check_idle(self) -> None:
        idle = self.config.idle_timeout
        if idle is None:
            return
        with self._lock:
            busy = self._connections > 0 or any(s.busy for s in self.sessions.values())
            if busy:
                self._last_activity = time.monotonic()
            elif time.monotonic() - self._last_activity > idle:
                log.info("idle for %.0f s: shutting down", idle)
                self.stopping.set()

    def _refresher(self) -> None:
        while not self.stopping.wait(self.config.refresh_interval):
            self.identity.refresh()
            log.info("evidence and certificate refreshed")

    def _handle(self, raw: socket.socket, peer: str) -> None:
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            raw.settimeout(self.config.handshake_timeout)
            ctx = self.identity.ssl_context
            assert ctx is not None
            try:
                sock = ctx.wrap_socket(raw, server_side=True)
            except (OSError, ssl.SSLError) as exc:
                log.info("TLS handshake with %s failed: %s", peer, exc)
                raw.close()
                return
            sock.settimeout(None)
            conn = _Connection(self, sock, peer)
            try:
                conn.serve()
            finally:
                for session in list(conn.sessions.values()):
                    self.close_session(session)
                try:
                    sock.close()
                except OSError:
                    pass
        except Exception:
            log.exception("connection %s failed unexpectedly", peer)
        finally:
            with self._lock:
                self._connections -= 1
                self._last_activity = time.monotonic()

    def shutdown(self) -> None:
        self.stopping.set()
        if self._listener is not None:
            try:
                self._listener.close()
            except OSError:
                pass
        for session in list(self.sessions.values()):
            self.close_session(session)
        info = self.config.data_dir / "kernel.json"
        try:
            if json.loads(info.read_text()).get("pid") == os.getpid():
                info.unlink()
        except (OSError, ValueError):
            pass
