"""The supervisor: the TLS server that ends the attested channel, owns the keys and signs receipts.

One thread per connection; each connection is strictly request → (stream frames) → reply,
so a socket is only ever read and written by its own thread. An interrupt for a busy
session arrives on a *second* connection with the session's token.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import os
import secrets
import select
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from mesatee_notebook.attestation.levels import Level
from mesatee_notebook.attestation.measurement import build_manifest, canonical_json
from mesatee_notebook.attestation.receipts import build_receipt
from mesatee_notebook.enclave.hardening import harden_process
from mesatee_notebook.enclave.identity import KernelIdentity
from mesatee_notebook.enclave.ipc import unpack_values
from mesatee_notebook.enclave.platform import load_platform
from mesatee_notebook.enclave.quotas import ANONYMOUS_QUOTA, PARTY_QUOTA, ByteBudget, Quota, QuotaBook
from mesatee_notebook.enclave.sandbox import Sandbox, SandboxLimits
from mesatee_notebook.enclave.service_pool import ServicePool, default_pool_size
from mesatee_notebook.enclave.sessions import ExecutorHandle, Session
from mesatee_notebook.enclave.shm import SharedAllocator
from mesatee_notebook.enclave.tpm import open_tpm
from mesatee_notebook.errors import (
    KernelConnectionError,
    MalformedFrame,
    MesateeError,
    NotFound,
    PolicyViolation,
    ProtocolError,
    QuotaExceeded,
)
from mesatee_notebook.wire.framing import Limits
from mesatee_notebook.wire.messages import REQUEST_TYPES, negotiate, require
from mesatee_notebook.wire.stream import Message, recv_message, send_message

__all__ = ["AVAILABLE_LEVELS", "Kernel", "KernelConfig"]

log = logging.getLogger("mesatee.enclave")
host_log = logging.getLogger("mesatee.host")

AVAILABLE_LEVELS = frozenset({Level.UNPROTECTED, Level.SOFTTEE})
_NONCE_MEMORY = 1 << 20
HELLO_LIMITS = Limits(max_header=32 << 10, max_payload=32 << 10, max_payloads=4, scope="before 'hello'")
ANONYMOUS_LIMITS = Limits(
    max_header=1 << 20,
    max_payload=64 << 20,
    max_payloads=256,
    scope="until the client proves a party identity (connect with an identity for the full limit)",
)


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
    tcti: str | None = None
    tpm_app_pcr: int = 23
    tpm_boot_pcrs: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 7)
    tpm_ek: str = "auto"  # the certified EK to activate with: rsa, ecc, or auto (RSA if certified, else ECC)
    sandbox: bool = True
    untrusted_dir: Path | None = None
    sandbox_limits: SandboxLimits = field(default_factory=SandboxLimits)
    #: Frames before ``hello``: small, so an unauthenticated peer cannot make the kernel hold memory.
    hello_limits: Limits = field(default_factory=lambda: HELLO_LIMITS)
    #: Frames after ``hello`` until a party is proven (anonymous cells): moderate.
    anonymous_limits: Limits = field(default_factory=lambda: ANONYMOUS_LIMITS)
    #: Seconds a connection may take to say ``hello`` once TLS is up (the client verifies evidence first).
    hello_timeout: float = 60.0
    #: Close a connection that sends no frame for this long (None: never); clients send keepalive pings.
    idle_connection_timeout: float | None = 300.0
    #: Per proven party, and one shared quota for all anonymous clients (see enclave/quotas.py).
    party_quota: Quota = PARTY_QUOTA
    anonymous_quota: Quota = ANONYMOUS_QUOTA
    #: Payload bytes all unauthenticated connections together may hold in flight.
    anonymous_inflight_bytes: int = 256 << 20
    #: Service workers in the general pool (job.*/psi.* services have their own single worker); 0: one serial worker.
    service_workers: int = field(default_factory=default_pool_size)


class _Gate:
    """Many service calls at once (shared), or one migration alone (exclusive)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._exclusive)
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._exclusive)
            self._exclusive = True
            self._cond.wait_for(lambda: self._shared == 0)
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


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


def _nothing() -> None:
    return None


class _Connection:
    """Server side of one client connection."""

    def __init__(self, kernel: Kernel, sock: ssl.SSLSocket, peer: str, cert_der: bytes) -> None:
        self.kernel = kernel
        self.sock = sock
        self.cert_der = cert_der
        self.peer = peer
        self.sessions: dict[str, Session] = {}
        self.hello_done = False
        self.party: str | None = None
        self.kernel_nonce = secrets.token_hex(16)

    def reply(self, header: dict[str, Any], payloads: list[Any] | None = None) -> None:
        send_message(self.sock, header, payloads or [])

    def error(self, re: Any, exc: MesateeError) -> None:
        self.reply({"t": "error", "re": re, **exc.to_wire()})

    def limits(self) -> Limits:
        """Frame limits for the next frame: small before hello, moderate until a party is proven."""
        cfg = self.kernel.config
        if not self.hello_done:
            return cfg.hello_limits
        return cfg.limits if self.party is not None else cfg.anonymous_limits

    def peer_open(self) -> bool:
        """False once the client has hung up (FIN, reset), seen without reading a byte of what it sent."""
        try:
            poller = select.poll()
            poller.register(self.sock.fileno(), select.POLLRDHUP | select.POLLHUP | select.POLLERR)
            return not poller.poll(0)
        except (OSError, ValueError):  # closed under us
            return False

    def serve(self) -> None:
        cfg = self.kernel.config
        while not self.kernel.stopping.is_set():
            alloc = SharedAllocator()
            allocator: Any = alloc
            release = _nothing
            if self.party is None:  # unauthenticated: its buffers count against the shared anonymous budget
                allocator, release = self.kernel.anonymous_bytes.allocator(alloc)
            # Waiting for a frame is bounded: a peer that says nothing is closed, not kept forever.
            self.sock.settimeout(cfg.hello_timeout if not self.hello_done else cfg.idle_connection_timeout)
            try:
                msg = recv_message(
                    self.sock, self.limits(), allocator=allocator, digests=True, body_timeout=cfg.body_timeout
                )
            except EOFError:
                alloc.close()
                release()
                return
            except QuotaExceeded as exc:
                # Refused before the payload was read: say why, then hang up (the rest of the frame is unread).
                alloc.close()
                release()
                log.info("closing %s: %s", self.peer, exc)
                self._try_error(None, exc)
                return
            except ProtocolError as exc:
                # The byte stream cannot be trusted past a bad frame: say why, then hang up.
                alloc.close()
                release()
                log.info("closing %s: %s", self.peer, exc)
                self._try_error(None, exc)
                return
            except TimeoutError:
                alloc.close()
                release()
                log.info("closing %s: it sent nothing within the timeout", self.peer)
                return
            except (OSError, MesateeError) as exc:
                alloc.close()
                release()
                log.info("connection %s ended: %s", self.peer, exc)
                return
            finally:
                if self.sock.fileno() >= 0:
                    self.sock.settimeout(None)
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
                release()

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
        fresh = k.identity.tpm_hello(msg.header)  # tpm: this connection's quote and credential activation
        self.reply(
            {
                "t": "hello.ok",
                "re": rid,
                "protocol": version,
                "server": _version(),
                "level": k.identity.level.label,
                **k.identity.tpm_claims,
                "measurement": k.identity.measurement,
                "kernel_nonce": self.kernel_nonce,
                **fresh,
                "idle_timeout": k.config.idle_connection_timeout,
            }
        )

    def on_auth(self, msg: Message, alloc: SharedAllocator, rid: Any) -> None:
        """A party proves its key: a signature over this connection's nonce and the certificate it was shown."""
        from mesatee_notebook.attestation.identity import verify_party_proof

        pub = require(msg.header, "public_key", bytes)
        sig = require(msg.header, "signature", bytes)
        cert_sha = hashlib.sha256(self.cert_der).digest()
        self.party = verify_party_proof(pub, self.kernel_nonce, cert_sha, sig)
        log.info("connection %s authenticated as party %s", self.peer, self.party[:16])
        self.reply({"t": "auth.ok", "re": rid, "party": self.party})

    def on_whoami(self, msg: Message, alloc: SharedAllocator, rid: Any) -> None:
        self.reply({"t": "whoami", "re": rid, "party": self.party, "quota": self.kernel.quotas.report(self.party)})

    def on_audit(self, msg: Message, alloc: SharedAllocator, rid: Any) -> None:
        party = self._require_party()
        audit = self.kernel.audit_log
        entries = audit.visible_to(party)
        pub = audit.public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.reply({"t": "audit", "re": rid, "entries": entries, "public_key": pub})

    def on_migration(self, msg: Message, alloc: SharedAllocator, rid: Any) -> None:
        """State sealed for other measurements (``op: status``), or an owner's signed grant (``op: approve``)."""
        state = self.kernel.sealed_state
        op = msg.header.get("op")
        if state is None:
            if op == "status":
                self.reply({"t": "migration", "re": rid, "status": None})
                return
            raise PolicyViolation("an unprotected kernel has no sealed state to migrate")  # noqa: EM101
        if op == "approve":
            k = self.kernel
            with k._service_gate.exclusive():  # no service call runs meanwhile; the workers reload what moved in
                result = state.approve(
                    msg.header.get("grant"),
                    require(msg.header, "public_key", bytes),
                    require(msg.header, "signature", bytes),
                    k.audit_log,
                )
                if result.get("migrated"):
                    log.info("restarting the service workers so they load the migrated jobs, models and histories")
                    k.restart_service_pools()
            self.reply({"t": "migration", "re": rid, "result": result, "status": state.status(self.party)})
        elif op == "status":
            self.reply({"t": "migration", "re": rid, "status": state.status(self.party)})
        else:
            raise MalformedFrame("migration requests need op 'status' or 'approve'")  # noqa: EM101

    def _require_party(self) -> str:
        if self.party is None:
            msg = "this request needs a party identity: the client did not prove one on this connection"
            raise PolicyViolation(msg)
        return self.party

    def on_ping(self, msg: Message, alloc: SharedAllocator, rid: Any) -> None:
        self.reply({"t": "pong", "re": rid, "time": time.time()})

    def on_session_open(self, msg: Message, alloc: SharedAllocator, rid: Any) -> None:
        name = msg.header.get("name") or "default"
        if not isinstance(name, str) or len(name) > 128:
            raise MalformedFrame("session name must be a string of at most 128 characters")  # noqa: EM101
        session = self.kernel.open_session(name, self.party)
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
        """Run a trusted service in the service worker for the proven party; sign a receipt."""
        k = self.kernel
        party = self._require_party()
        nonce = k.nonces.claim(msg.header.get("nonce"))
        name = require(msg.header, "service", str)
        args = msg.header.get("args") or {}
        if not isinstance(args, dict):
            raise MalformedFrame("service arguments must be a map")  # noqa: EM101
        try:
            args_digest = hashlib.sha256(canonical_json({"service": name, "args": args})).hexdigest()
        except (TypeError, ValueError) as exc:
            msg_ = (
                "service arguments must be JSON values (maps, lists, strings, numbers, booleans, null); "
                f"send bytes and arrays as inputs instead ({exc})"
            )
            raise MalformedFrame(msg_) from None
        input_digests, specs, payloads, fds = _forward_inputs(msg, alloc)
        started = time.time()

        def on_message(worker: ExecutorHandle, m: Message) -> bool:
            if m.type == "progress":
                self.reply({"t": "progress", "re": rid, "data": m.header.get("data") or {}})
                return False
            if m.type in _EXECUTOR_REQUESTS:
                k.handle_executor_request(worker, m, prefix="svc", party=party, service=True)
                return False
            return m.type != "log"

        header = {"t": "call", "service": name, "args": args, "party": party, "inputs": specs}
        try:
            k.quotas.take(party, concurrent_calls=1, executors=1)
        except MesateeError:
            for fd in fds:
                os.close(fd)
            raise
        try:
            result = k.run_service(party, nonce, header, payloads, fds, on_message, msg.header.get("timeout"))
        finally:
            k.quotas.give_back(party, concurrent_calls=1, executors=1)
        _raise_if_error(result)
        subjects, value_specs, out_payloads = _result_values(result)
        info = result.header.get("info") or {}
        subjects["info"] = hashlib.sha256(canonical_json(info)).hexdigest()
        predicate = {
            "kind": "call",
            "service": name,
            "party": party,
            "measurement": k.identity.measurement,
            "level": k.identity.level.label,
            **k.identity.tpm_claims,
            "session": None,
            "nonce": nonce,
            "code": {"sha256": args_digest},
            "inputs": input_digests,
            "startedAt": started,
            "finishedAt": time.time(),
        }
        receipt = k.sign_receipt(subjects, predicate)
        self.reply({"t": "result", "re": rid, "values": value_specs, "info": info, "receipt": receipt}, out_payloads)

    def on_call_cancel(self, msg: Message, alloc: SharedAllocator, rid: Any) -> None:
        """Cancel a queued or running service call; its nonce (known only to its caller) is the capability."""
        nonce = require(msg.header, "nonce", str)
        cancelled = self.kernel.cancel_service_call(self.party, nonce)
        self.reply({"t": "call.cancelled", "re": rid, "cancelled": cancelled})

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
        input_digests, specs, payloads, fds = _forward_inputs(msg, alloc)
        if not session.lock.acquire(blocking=False):
            for fd in fds:
                os.close(fd)
            raise PolicyViolation(f"session {session.name!r} is busy with another cell")  # noqa: EM102
        holder = k.quotas.holder(session.party)
        try:
            k.quotas.take(holder, concurrent_calls=1)
        except MesateeError:
            session.lock.release()
            for fd in fds:
                os.close(fd)
            raise
        stdout_h, stderr_h = hashlib.sha256(), hashlib.sha256()
        started = time.time()
        try:
            session.busy = True
            session.calls += 1
            if session.executor is None or not session.executor.alive:
                for fd in fds:
                    os.close(fd)
                raise (session.executor.crashed_error() if session.executor else NotFound("session is closed"))

            gone = False  # a write to the client failed: nobody reads this cell's output any more

            def on_message(m: Message) -> bool:
                nonlocal gone
                if m.type == "stream":
                    text = str(m.header.get("text", ""))
                    name = "stderr" if m.header.get("name") == "stderr" else "stdout"
                    (stderr_h if name == "stderr" else stdout_h).update(text.encode())
                    if not gone:
                        try:
                            self.reply({"t": "stream", "re": rid, "name": name, "text": text})
                        except OSError:  # the exchange sees it through client_alive and stops the cell
                            gone = True
                    return False
                if m.type == "log":
                    host_log.info("[session %s] %s", session.name, m.header.get("text"))
                    return False
                if m.type in _EXECUTOR_REQUESTS:
                    assert session.executor is not None
                    k.handle_executor_request(session.executor, m, prefix=session.sealed_prefix, party=session.party)
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
                cell_cpu=k.sandbox.limits.cell_cpu if k.sandbox is not None else None,
                client_alive=lambda: not gone and self.peer_open(),
            )
        finally:
            session.busy = False
            session.lock.release()
            k.quotas.give_back(holder, concurrent_calls=1)
        _raise_if_error(result)
        subjects, value_specs, out_payloads = _result_values(result)
        subjects.update({"stdout": stdout_h.hexdigest(), "stderr": stderr_h.hexdigest()})
        value_repr = result.header.get("value_repr")
        if isinstance(value_repr, str):
            subjects["value_repr"] = hashlib.sha256(value_repr.encode()).hexdigest()
        predicate = {
            "kind": "execute",
            "party": session.party,
            "measurement": k.identity.measurement,
            "level": k.identity.level.label,
            **k.identity.tpm_claims,
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


_EXECUTOR_REQUESTS = frozenset(
    {"seal.get", "seal.put", "seal.list", "seal.delete", "data.get", "audit", "faas.run", "key.call"}
)


def _raise_if_error(result: Message) -> None:
    if result.type == "error":
        from mesatee_notebook.errors import error_from_wire

        raise error_from_wire(
            {
                "code": result.header.get("code"),
                "message": result.header.get("message"),
                "details": result.header.get("details") or {},
            }
        )


def _forward_inputs(
    msg: Message, alloc: SharedAllocator
) -> tuple[dict[str, str], list[dict[str, Any]], list[Any], list[int]]:
    """Input digests, and specs/payloads/fds to hand the inputs on to an executor without copying."""
    inputs = msg.header.get("inputs") or []
    if not isinstance(inputs, list) or len(inputs) != len(msg.payloads):
        raise MalformedFrame("each input needs exactly one payload")  # noqa: EM101
    digests = msg.digests or []
    input_digests: dict[str, str] = {}
    specs: list[dict[str, Any]] = []
    payloads: list[Any] = []
    fds: list[int] = []
    for i, (spec, buf) in enumerate(zip(inputs, msg.payloads, strict=True)):
        if not isinstance(spec, dict) or not str(spec.get("name", "")).isidentifier():
            for passed in fds:
                os.close(passed)
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
    return input_digests, specs, payloads, fds


def _result_values(result: Message) -> tuple[dict[str, str], list[dict[str, Any]], list[Any]]:
    """Digests (receipt subjects), specs and buffers of an executor's result values."""
    subjects: dict[str, str] = {}
    specs: list[dict[str, Any]] = []
    buffers: list[Any] = []
    for spec, buf in unpack_values(result.header.get("values", []), result):
        subjects[str(spec["name"])] = hashlib.sha256(memoryview(buf).cast("B")).hexdigest()
        specs.append({"name": spec["name"], "kind": spec["kind"], "meta": spec.get("meta") or {}})
        buffers.append(buf)
    return subjects, specs, buffers


class Kernel:
    """The enclave kernel's supervisor."""

    def __init__(self, config: KernelConfig) -> None:
        self.config = config
        # tpm: available only when --tcti names a TPM that answers (open_tpm refuses clearly otherwise).
        self.tpm = (
            open_tpm(config.tcti, app_pcr=config.tpm_app_pcr, boot_pcrs=config.tpm_boot_pcrs, ek=config.tpm_ek)
            if config.level is Level.TPM
            else None
        )
        if config.level in (Level.SEV, Level.SGX):
            from mesatee_notebook.enclave.hw_providers import hardware_level_error

            raise hardware_level_error(config.level.label)
        config.level.require_available(AVAILABLE_LEVELS | ({Level.TPM} if self.tpm else set()))
        self.hardening = harden_process()
        self.sandbox: Sandbox | None = None
        if config.sandbox:
            # Refuses (SandboxUnavailable, naming what is missing) rather than serve cells unisolated.
            self.sandbox = Sandbox.create(
                config.sandbox_limits, hidden=[config.data_dir], untrusted_dir=config.untrusted_dir
            )
        else:
            log.warning(
                "SANDBOX OFF (--no-sandbox): every cell runs with the kernel's uid and can read its keys; "
                "the evidence and the measurement say so, and clients that require a sandbox refuse this kernel"
            )
        platform_key = None
        self.sealing_secret: bytes | None = None
        self.platform_fingerprint = "none"
        if config.level in (Level.SOFTTEE, Level.TPM):  # tpm: the platform key signs the audit log, roots sealing
            platform = load_platform(config.data_dir, secret_in_tpm_ok=self.tpm is not None)
            platform_key = platform.key
            self.sealing_secret = platform.sealing_secret
            self.platform_fingerprint = platform.fingerprint
        self.identity = KernelIdentity.create(
            config.level,
            build_manifest(sandboxed=self.sandbox is not None),
            platform_key,
            config.cert_lifetime,
            sandbox=self.sandbox.report() if self.sandbox is not None else None,
            tpm=self.tpm,
        )
        if self.tpm is not None:  # after the measured launch: the TPM unseals only to this measurement
            from mesatee_notebook.enclave.tpm_secret import tpm_sealing_secret

            try:
                self.sealing_secret = tpm_sealing_secret(self.tpm, config.data_dir, self.identity.measurement)
            except BaseException:
                self.tpm.close()  # swtpm without a resource manager would keep the AK and EK otherwise
                raise
        self.sessions: dict[str, Session] = {}
        self.nonces = _NonceGuard()
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._connections = 0
        self._last_activity = time.monotonic()
        self._last_watch = time.monotonic()
        self._listener: socket.socket | None = None
        self.address: tuple[str, int] = (config.host, config.port)
        self.service_pools: dict[str, ServicePool] = {}
        self._spare: ExecutorHandle | None = None
        self._pools_lock = threading.Lock()
        # Service calls share this gate; a migration takes it alone, so no service call runs meanwhile.
        self._service_gate = _Gate()
        from mesatee_notebook.enclave.migration import SealedState

        # Before anything opens the live store: stores of other measurements are moved aside and reported.
        self.sealed_state = SealedState.at_start(config.data_dir, self.sealing_secret, self.identity.measurement)
        self.audit_log = self._open_audit_log(platform_key)
        if self.sealed_state is not None:
            self.sealed_state.announce(self.audit_log)
        self.quotas = QuotaBook(
            config.party_quota, config.anonymous_quota, self.sealed_store if self.sealing_secret is not None else None
        )
        self.anonymous_bytes = ByteBudget(config.anonymous_inflight_bytes)

    def _open_audit_log(self, platform_key: Any) -> Any:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        from mesatee_notebook.enclave.audit import AuditLog

        # softtee: the platform key signs the log, so parties check it against the root they pinned.
        key = platform_key if platform_key is not None else Ed25519PrivateKey.generate()
        head_store = self.sealed_store() if self.sealing_secret is not None else None
        name = "audit.log" if platform_key is not None else f"audit-unprotected-{os.getpid()}.log"
        return AuditLog(self.config.data_dir / name, key, head_store=head_store)

    # -- sessions -------------------------------------------------------------------------------
    def open_session(self, name: str, party: str | None = None) -> Session:
        holder = self.quotas.holder(party)
        self.quotas.take(holder, sessions=1, executors=1)
        session = Session(name=name, memory_limit=self.config.executor_memory, party=party, sandbox=self.sandbox)
        with self._lock:
            spare, self._spare = self._spare, None
        try:
            session.start(spare if spare is not None and spare.alive else None)
        except BaseException:
            self.quotas.give_back(holder, sessions=1, executors=1)
            raise
        with self._lock:
            self.sessions[session.id] = session
        self._refill_spare()
        log.info("session %s (%s) opened, executor pid %s", session.id, name, session.executor and session.executor.pid)
        return session

    def _refill_spare(self) -> None:
        """Start one executor ahead of time (it has never run code), so the next session opens at once."""

        def fill() -> None:
            try:
                handle = ExecutorHandle(self.config.executor_memory, sandbox=self.sandbox)
            except MesateeError as exc:
                log.warning("could not pre-start an executor: %s", exc)
                return
            with self._lock:
                if self._spare is None and not self.stopping.is_set():
                    self._spare = handle
                    return
            handle.shutdown()

        threading.Thread(target=fill, name="mesatee-spare", daemon=True).start()

    def close_session(self, session: Session) -> None:
        with self._lock:
            was_open = self.sessions.pop(session.id, None) is not None
        session.close()
        if was_open:
            self.quotas.give_back(self.quotas.holder(session.party), sessions=1, executors=1)

    def handle_executor_request(
        self, executor: ExecutorHandle, m: Message, *, prefix: str, party: str | None, service: bool = False
    ) -> None:
        """Answer an executor's mid-call request: sealed storage, a dataset for a cell, an audit entry."""
        try:
            self._answer_executor(executor, m, prefix=prefix, party=party, service=service)
        except (OSError, KernelConnectionError) as exc:
            # The executor died while we answered it: that is its crash, not the client's connection.
            raise executor.crashed_error() from exc

    def _answer_executor(
        self, executor: ExecutorHandle, m: Message, *, prefix: str, party: str | None, service: bool
    ) -> None:
        from mesatee_notebook.enclave.ipc import ipc_send

        try:
            name = str(m.header.get("name", ""))
            if m.type == "audit":
                if not service:
                    raise PolicyViolation("only trusted services write the audit log")  # noqa: EM101
                concerns = [str(c) for c in m.header.get("concerns") or []]
                self.audit_log.append(
                    str(m.header.get("kind")), party, m.header.get("details") or {}, concerns=concerns
                )
                ipc_send(executor.sock, {"t": "ok"})
                return
            if m.type == "faas.run":  # issue 17: a registered function, in a fresh sandboxed executor
                if not service:
                    raise PolicyViolation("only trusted services run registered functions")  # noqa: EM101
                from mesatee_notebook.enclave.faas_exec import run_function

                out = run_function(self, bytes(m.payloads[0]) if m.payloads else b"", m.header.get("timeout"))
                ipc_send(executor.sock, {"t": "ok"}, [out])
                return
            if m.type == "key.call":  # issue 17: a cell's mesatee.keys, served by the KeyStore as its party
                from mesatee_notebook.enclave.faas_exec import cell_key_call

                ipc_send(executor.sock, {"t": "ok"}, [cell_key_call(self, m, party)])
                return
            if m.type == "data.get":
                data = self.dataset_for_cell(name, party)
                ipc_send(executor.sock, {"t": "ok"}, [data])
                return
            store = self.sealed_store()
            full = f"{prefix}/{name}"
            if m.type == "seal.put":
                data = m.payloads[0] if m.payloads else b""
                size = memoryview(data).nbytes
                self.quotas.seal(self.quotas.holder(party), full, size, lambda: store.put(full, data))
                ipc_send(executor.sock, {"t": "ok"})
            elif m.type == "seal.get":
                ipc_send(executor.sock, {"t": "ok"}, [store.get_buffer(full)])
            elif m.type == "seal.delete":
                self.quotas.unseal(full, lambda: store.delete(full))
                ipc_send(executor.sock, {"t": "ok"})
            else:
                names = [n[len(prefix) + 1 :] for n in store.list(f"{prefix}/{name}".rstrip("/"))]
                ipc_send(executor.sock, {"t": "ok"}, [json.dumps(names).encode()])
        except MesateeError as exc:
            ipc_send(executor.sock, {"t": "error", **exc.to_wire()})

    def dataset_for_cell(self, name: str, party: str | None) -> bytes:
        """Arrow bytes of a dataset, for a cell whose party the owner's policy gives code access."""
        from mesatee_notebook.enclave.datasets import data_name, load_meta

        store = self.sealed_store()
        meta = load_meta(store, name)
        allowed = party is not None and (party == meta["owner"] or party in meta["policy"].get("code_access", []))
        if not allowed:
            self.audit_log.append(
                "refusal", party, {"dataset": name, "reason": "no code access"}, concerns=[str(meta["owner"])]
            )
            msg = (
                f"dataset {name!r} is not available to code cells of this party: its owner's policy gives code "
                "access only to the parties in code_access. Use the SecureDataFrame API (policy-checked queries)."
            )
            raise PolicyViolation(msg, dataset=name)
        self.audit_log.append("release", party, {"dataset": name, "to": "code cell"}, concerns=[str(meta["owner"])])
        return bytes(store.get(data_name(name)))

    # -- the service workers --------------------------------------------------------------------
    def service_pool(self, service: str) -> ServicePool:
        """The pool ``service`` runs in (started on first use).

        ``job.*``/``psi.*`` run in the one jobs worker (the sealed job store has a single writer); everything
        else runs in the general pool.
        """
        if self.config.service_workers <= 0:
            lane = "serial"  # one worker for every service, in arrival order (the design before the pools)
        else:
            lane = "jobs" if service.startswith(("job.", "psi.")) else "general"
        with self._pools_lock:
            pool = self.service_pools.get(lane)
            if pool is None:
                size = self.config.service_workers if lane == "general" else 1
                pool = ServicePool(
                    lane,
                    size,
                    lambda: ExecutorHandle(self.config.executor_memory, service=True, sandbox=self.sandbox),
                    lambda details: self.audit_log.append("recovery", None, details, concerns=["*"]),
                )
                self.service_pools[lane] = pool
            return pool

    def run_service(
        self,
        party: str,
        nonce: str,
        header: dict[str, Any],
        payloads: list[Any],
        fds: list[int],
        on_message: Any,
        timeout: Any,
    ) -> Message:
        """Run a service call in its pool, fairly scheduled among the parties waiting there."""
        limit = self.config.max_cell_timeout
        t = limit if not isinstance(timeout, (int, float)) or timeout <= 0 else min(float(timeout), limit)
        service = str(header["service"])
        with self._service_gate.shared():
            return self.service_pool(service).run(party, nonce, service, header, payloads, fds, on_message, t)

    def restart_service_pools(self) -> None:
        """Stop every service worker; the next calls start fresh ones (which re-read sealed state)."""
        with self._pools_lock:
            pools, self.service_pools = list(self.service_pools.values()), {}
        for pool in pools:
            pool.shutdown()

    def cancel_service_call(self, party: str | None, nonce: str) -> bool:
        """Cancel the call with ``nonce`` (made by ``party``, if the canceller proved one) in any pool."""
        with self._pools_lock:
            pools = list(self.service_pools.values())
        return any(pool.cancel(party, nonce) for pool in pools)

    def sealed_store(self) -> Any:
        from mesatee_notebook.enclave.migration import live_store

        if self.sealing_secret is None:
            msg = "sealed storage needs a softtee (or hardware) platform; an unprotected kernel has no sealing key"
            raise PolicyViolation(msg)
        return live_store(self.config.data_dir, self.sealing_secret, self.identity.measurement)

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
        self._refill_spare()
        try:
            while not self.stopping.is_set():
                if time.monotonic() - self._last_watch > 1.0:
                    self._watch_sandboxes()
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

    def _watch_sandboxes(self) -> None:
        """Between cells too, a sandbox over its memory limit is stopped (its next call says why)."""
        self._last_watch = time.monotonic()
        if self.sandbox is None:
            return
        with self._lock:
            handles = [s.executor for s in self.sessions.values() if s.executor is not None and not s.busy]
        for handle in handles:
            handle.check_usage()

    def _refresher(self) -> None:
        while not self.stopping.wait(self.config.refresh_interval):
            try:
                self.identity.refresh()
            except MesateeError as exc:  # e.g. the TPM stopped answering: keep the current certificate
                log.warning("could not refresh the evidence: %s", exc)
                continue
            log.info("evidence and certificate refreshed")

    def _handle(self, raw: socket.socket, peer: str) -> None:
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            raw.settimeout(self.config.handshake_timeout)
            ctx = self.identity.ssl_context
            cert_der = self.identity.certificate_der
            assert ctx is not None
            try:
                sock = ctx.wrap_socket(raw, server_side=True)
            except (OSError, ssl.SSLError) as exc:
                log.info("TLS handshake with %s failed: %s", peer, exc)
                raw.close()
                return
            sock.settimeout(None)
            conn = _Connection(self, sock, peer, cert_der)
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
        with self._pools_lock:
            pools = list(self.service_pools.values())
        for pool in pools:
            pool.shutdown()
        with self._lock:
            spare, self._spare = self._spare, None
        if spare is not None:
            spare.shutdown()
        if self.tpm is not None:
            self.tpm.close()
        info = self.config.data_dir / "kernel.json"
        try:
            if json.loads(info.read_text()).get("pid") == os.getpid():
                info.unlink()
        except (OSError, ValueError):
            pass
