"""The kernel's side of one client connection: read a frame, parse its typed request, run its handler, reply.

Each connection is strictly request → (stream frames) → reply, so a comm is only ever read and written by its own
thread. Handlers are looked up in :attr:`Connection.HANDLERS`, keyed by the request's class from
``wire/protocol.py`` (a test checks that every request class has exactly one handler). An interrupt for a busy
session arrives on a *second* connection with the session's token.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from mesatee_notebook.attestation.measurement import canonical_json
from mesatee_notebook.enclave import receipting
from mesatee_notebook.enclave.result_stream import ChunkRelay, deadline_sender
from mesatee_notebook.enclave.sessions import ExecutorHandle, KernelSession
from mesatee_notebook.enclave.shm import SharedAllocator
from mesatee_notebook.errors import (
    MalformedFrame,
    MesateeError,
    NotFound,
    PolicyViolation,
    ProtocolError,
    QuotaExceeded,
)
from mesatee_notebook.wire.comm import Comm
from mesatee_notebook.wire.digest import payload_digest, payload_hasher
from mesatee_notebook.wire.framing import Limits
from mesatee_notebook.wire.messages import negotiate
from mesatee_notebook.wire.protocol import (
    EXECUTOR_REQUESTS,
    REQUEST_TYPES,
    REQUESTS,
    AuditRequest,
    Auth,
    Call,
    CallCancel,
    Execute,
    Hello,
    Interrupt,
    LogLine,
    Migration,
    Ping,
    ProgressUpdate,
    ProtocolMessage,
    ResultChunk,
    RunCell,
    RunService,
    SessionClose,
    SessionList,
    SessionOpen,
    SessionRestart,
    Stream,
    Whoami,
    parse_request,
)
from mesatee_notebook.wire.stream import Message

if TYPE_CHECKING:
    from mesatee_notebook.enclave.supervisor import Kernel

__all__ = ["Connection", "kernel_version"]

log = logging.getLogger("mesatee.enclave")
host_log = logging.getLogger("mesatee.host")


def kernel_version() -> str:
    """The package version of this install (what hello reports)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mesatee_notebook")
    except PackageNotFoundError:
        return "0+unknown"


def _nothing() -> None:
    return None


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


class Connection:
    """Server side of one client connection."""

    HANDLERS: ClassVar[dict[type[ProtocolMessage], Callable[..., None]]]

    def __init__(self, kernel: Kernel, comm: Comm, cert_der: bytes) -> None:
        self.kernel = kernel
        self.comm = comm
        self.cert_der = cert_der
        self.peer = comm.peer
        self.sessions: dict[str, KernelSession] = {}
        self.hello_done = False
        self.party: str | None = None
        self.slotted = False  # a TCP connection holding one of the kernel's slots (enclave/conn_slots.py)
        self.kernel_nonce = secrets.token_hex(16)

    def reply(self, header: dict[str, Any], payloads: list[Any] | None = None) -> None:
        self.comm.send(header, payloads or [])

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
        return self.comm.peer_open()

    # -- the loop -------------------------------------------------------------------------------
    def serve(self) -> None:
        while not self.kernel.stopping.is_set():
            alloc = SharedAllocator()
            allocator: Any = alloc
            release = _nothing
            if self.party is None:  # unauthenticated: its buffers count against the shared anonymous budget
                allocator, release = self.kernel.anonymous_bytes.allocator(alloc)
            msg = self._next(alloc, allocator, release)
            if msg is None:
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
                release()

    def _next(self, alloc: SharedAllocator, allocator: Any, release: Callable[[], None]) -> Message | None:
        """The next frame, or None when the connection is over (each way it ends is logged, or answered)."""
        cfg = self.kernel.config
        # Waiting for a frame is bounded: a peer that says nothing is closed, not kept forever.
        self.comm.set_timeout(cfg.hello_timeout if not self.hello_done else cfg.idle_connection_timeout)
        try:
            return self.comm.recv(self.limits(), allocator=allocator, digests=True, body_timeout=cfg.body_timeout)
        except EOFError:
            pass
        except (QuotaExceeded, ProtocolError) as exc:
            # Refused before the payload was read, or the byte stream cannot be trusted past a bad frame:
            # say why, then hang up (the rest of the frame is unread).
            log.info("closing %s: %s", self.peer, exc)
            self._try_error(None, exc)
        except TimeoutError:
            log.info("closing %s: it sent nothing within the timeout", self.peer)
        except (OSError, MesateeError) as exc:
            log.info("connection %s ended: %s", self.peer, exc)
        finally:
            self.comm.set_timeout(None)
        alloc.close()
        release()
        return None

    def _try_error(self, re: Any, exc: MesateeError) -> None:
        try:
            self.error(re, exc)
        except (OSError, MesateeError):
            pass

    def dispatch(self, msg: Message, alloc: SharedAllocator) -> None:
        t = msg.type
        if t not in REQUEST_TYPES:
            raise ProtocolError(f"unknown message type {t!r}", type=t)  # noqa: EM102
        if not self.hello_done and t != Hello.T:
            msg_ = "the first message must be 'hello' (protocol version handshake)"
            raise ProtocolError(msg_)
        req = parse_request(msg.header, len(msg.payloads))
        self.HANDLERS[type(req)](self, req, msg, alloc, msg.header.get("id"))

    # -- handlers -------------------------------------------------------------------------------
    def on_hello(self, req: Hello, msg: Message, alloc: SharedAllocator, rid: Any) -> None:
        version = negotiate(list(req.versions), client_version=req.client, server_version=kernel_version())
        self.hello_done = True
        k = self.kernel
        # tpm: this connection's quote and credential activation
        fresh = k.identity.tpm_hello({"tpm_nonce": req.tpm_nonce, "tpm_credential": req.tpm_credential})
        self.reply(
            {
                "t": "hello.ok",
                "re": rid,
                "protocol": version,
                "server": kernel_version(),
                "level": k.identity.level.label,
                **k.identity.tpm_claims,
                "measurement": k.identity.measurement,
                "kernel_nonce": self.kernel_nonce,
                **fresh,
                "idle_timeout": k.config.idle_connection_timeout,
            }
        )

    def on_auth(self, req: Auth, msg: Message, alloc: SharedAllocator, rid: Any) -> None:
        """A party proves its key: a signature over this connection's nonce and the certificate it was shown."""
        from mesatee_notebook.attestation.party_proof import verify_party_proof

        cert_sha = hashlib.sha256(self.cert_der).digest()
        party = verify_party_proof(req.public_key, self.kernel_nonce, cert_sha, req.signature)
        previous, self.party = self.party, party
        if self.slotted and self.kernel.slots.party_full(self):
            self.party = previous
            limit = self.kernel.slots.max_per_party
            text = f"party {party[:16]}… already holds {limit} connections to this kernel; close one first"
            raise QuotaExceeded(text, limit="connections", value=limit)
        log.info("connection %s authenticated as party %s", self.peer, party[:16])
        self.reply({"t": "auth.ok", "re": rid, "party": self.party})

    def on_whoami(self, req: Whoami, msg: Message, alloc: SharedAllocator, rid: Any) -> None:
        self.reply({"t": "whoami", "re": rid, "party": self.party, "quota": self.kernel.quotas.report(self.party)})

    def on_audit(self, req: AuditRequest, msg: Message, alloc: SharedAllocator, rid: Any) -> None:
        party = self._require_party()
        audit = self.kernel.audit_log
        entries = audit.visible_to(party)
        pub = audit.public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.reply({"t": "audit", "re": rid, "entries": entries, "public_key": pub})

    def on_migration(self, req: Migration, msg: Message, alloc: SharedAllocator, rid: Any) -> None:
        """State sealed for other measurements (``op: status``), or an owner's signed grant (``op: approve``)."""
        k = self.kernel
        state = k.sealed_state
        if state is None:
            if req.op == "status":
                self.reply({"t": "migration", "re": rid, "status": None})
                return
            raise PolicyViolation("an unprotected kernel has no sealed state to migrate")  # noqa: EM101
        if req.op == "status":
            self.reply({"t": "migration", "re": rid, "status": state.status(self.party)})
            return
        with k.service_gate.exclusive():  # no service call runs meanwhile; the workers reload what moved in
            result = state.approve(req.grant, req.public_key or b"", req.signature or b"", k.audit_log)
            if result.get("migrated"):
                log.info("restarting the service workers so they load the migrated jobs, models and histories")
                k.restart_service_pools()
        self.reply({"t": "migration", "re": rid, "result": result, "status": state.status(self.party)})

    def _require_party(self) -> str:
        if self.party is None:
            msg = "this request needs a party identity: the client did not prove one on this connection"
            raise PolicyViolation(msg)
        return self.party

    def on_ping(self, req: Ping, msg: Message, alloc: SharedAllocator, rid: Any) -> None:
        self.reply({"t": "pong", "re": rid, "time": time.time()})

    def on_session_open(self, req: SessionOpen, msg: Message, alloc: SharedAllocator, rid: Any) -> None:
        session = self.kernel.open_session(req.name, self.party)
        self.sessions[session.id] = session
        self.reply({"t": "session.ok", "re": rid, "token": session.token, **session.info()})

    def _session(self, req: SessionClose | SessionRestart | Interrupt | Execute) -> KernelSession:
        session = self.kernel.sessions.get(req.session)
        if session is None:
            msg = f"no session {req.session!r} on this kernel (it was closed, or the kernel restarted)"
            raise NotFound(msg)
        session.check_token(req.token)
        return session

    def on_session_close(self, req: SessionClose, msg: Message, alloc: SharedAllocator, rid: Any) -> None:
        session = self._session(req)
        self.sessions.pop(session.id, None)
        self.kernel.close_session(session)
        self.reply({"t": "session.closed", "re": rid, "session": session.id})

    def on_session_restart(self, req: SessionRestart, msg: Message, alloc: SharedAllocator, rid: Any) -> None:
        session = self._session(req)
        with session.lock:
            session.restart()
        self.reply({"t": "session.ok", "re": rid, **session.info()})

    def on_session_list(self, req: SessionList, msg: Message, alloc: SharedAllocator, rid: Any) -> None:
        self.reply({"t": "session.list", "re": rid, "sessions": [s.info() for s in self.sessions.values()]})

    def on_interrupt(self, req: Interrupt, msg: Message, alloc: SharedAllocator, rid: Any) -> None:
        session = self._session(req)
        was_busy = session.busy
        if was_busy and session.executor is not None:
            session.executor.interrupt()
        self.reply({"t": "interrupt.ok", "re": rid, "interrupted": was_busy})

    def on_call_cancel(self, req: CallCancel, msg: Message, alloc: SharedAllocator, rid: Any) -> None:
        """Cancel a queued or running service call; its nonce (known only to its caller) is the capability."""
        cancelled = self.kernel.cancel_service_call(self.party, req.nonce)
        self.reply({"t": "call.cancelled", "re": rid, "cancelled": cancelled})

    # -- a trusted service ----------------------------------------------------------------------
    def on_call(self, req: Call, msg: Message, alloc: SharedAllocator, rid: Any) -> None:
        """Run a trusted service in the service worker for the proven party; sign a receipt."""
        k = self.kernel
        party = self._require_party()
        nonce = k.nonces.claim(req.nonce)
        try:
            args_digest = hashlib.sha256(canonical_json({"service": req.service, "args": req.args})).hexdigest()
        except (TypeError, ValueError) as exc:
            msg_ = (
                "service arguments must be JSON values (maps, lists, strings, numbers, booleans, null); "
                f"send bytes and arrays as inputs instead ({exc})"
            )
            raise MalformedFrame(msg_) from None
        input_digests, specs, payloads, fds = receipting.forward_inputs(req.inputs, msg, alloc)
        msg.payloads.clear()  # digested and handed on (the worker has its own descriptors): unmap them here now,
        alloc.close()  # so the inputs' memory goes as soon as the service lets go of them (P8), not after the call
        started = time.time()
        relay = ChunkRelay(deadline_sender(self.comm, k.config.result_send_timeout), rid)  # large results, in chunks

        def on_message(worker: ExecutorHandle, m: Message) -> bool:
            if m.type == ResultChunk.T:
                relay.on_chunk(m)
                return False
            if m.type == ProgressUpdate.T:
                self.reply({"t": "progress", "re": rid, "data": ProgressUpdate.from_header(m.header).data})
                return False
            if m.type in EXECUTOR_REQUESTS:
                k.handle_executor_request(worker, m, prefix="svc", party=party, service=True)
                return False
            return m.type != LogLine.T

        order = RunService(req.service, party, req.args, tuple(specs), chunked=req.chunked)
        try:
            k.quotas.take(party, concurrent_calls=1, executors=1)
        except MesateeError:
            _close_fds(fds)
            raise
        try:
            result = k.run_service(party, nonce, order, payloads, fds, on_message, req.timeout)
        finally:
            k.quotas.give_back(party, concurrent_calls=1, executors=1)
        receipting.raise_if_error(result)
        streamed, streamed_specs = relay.finish(result)
        subjects, value_specs, out_payloads = receipting.result_values(result)
        subjects.update(streamed)
        value_specs += streamed_specs
        info = result.header.get("info") or {}
        subjects["info"] = payload_digest(canonical_json(info))
        predicate = receipting.predicate(
            "call",
            k.identity,
            service=req.service,
            party=party,
            session=None,
            nonce=nonce,
            code_sha256=args_digest,
            inputs=input_digests,
            started=started,
        )
        receipt = k.sign_receipt(subjects, predicate)
        self.reply({"t": "result", "re": rid, "values": value_specs, "info": info, "receipt": receipt}, out_payloads)

    # -- a cell ---------------------------------------------------------------------------------
    def on_execute(self, req: Execute, msg: Message, alloc: SharedAllocator, rid: Any) -> None:
        k = self.kernel
        session = self._session(req)
        nonce = k.nonces.claim(req.nonce)
        timeout = receipting.clamp_timeout(req.timeout, k.config.max_cell_timeout)
        input_digests, specs, payloads, fds = receipting.forward_inputs(req.inputs, msg, alloc)
        if not session.lock.acquire(blocking=False):
            _close_fds(fds)
            raise PolicyViolation(f"session {session.name!r} is busy with another cell")  # noqa: EM102
        holder = k.quotas.holder(session.party)
        try:
            k.quotas.take(holder, concurrent_calls=1)
        except MesateeError:
            session.lock.release()
            _close_fds(fds)
            raise
        started = time.time()
        order = RunCell(req.code, tuple(specs), req.outputs, req.allow_pickle)
        try:
            session.busy = True
            session.calls += 1
            result, stdout_h, stderr_h = self._run_cell(session, order, payloads, fds, rid, timeout)
        finally:
            session.busy = False
            session.lock.release()
            k.quotas.give_back(holder, concurrent_calls=1)
        receipting.raise_if_error(result)
        subjects, value_specs, out_payloads = receipting.result_values(result)
        subjects.update({"stdout": stdout_h.hexdigest(), "stderr": stderr_h.hexdigest()})
        value_repr = result.header.get("value_repr")
        if isinstance(value_repr, str):
            subjects["value_repr"] = payload_digest(value_repr.encode())
        predicate = receipting.predicate(
            "execute",
            k.identity,
            party=session.party,
            session=session.id,
            nonce=nonce,
            code_sha256=hashlib.sha256(req.code.encode()).hexdigest(),
            inputs=input_digests,
            started=started,
        )
        receipt = k.sign_receipt(subjects, predicate)
        self.reply(
            {"t": "result", "re": rid, "values": value_specs, "value_repr": value_repr, "receipt": receipt},
            out_payloads,
        )

    def _run_cell(
        self, session: KernelSession, order: RunCell, payloads: list[Any], fds: list[int], rid: Any, timeout: float
    ) -> tuple[Message, Any, Any]:
        """Run the cell in the session's executor, streaming its output; (result, stdout hash, stderr hash)."""
        k = self.kernel
        executor = session.executor
        if executor is None or not executor.alive:
            _close_fds(fds)
            raise (executor.crashed_error() if executor else NotFound("session is closed"))
        stdout_h, stderr_h = payload_hasher(), payload_hasher()
        gone = False  # a write to the client failed: nobody reads this cell's output any more

        def on_message(m: Message) -> bool:
            nonlocal gone
            if m.type == Stream.T:
                out = Stream.from_header(m.header)
                (stderr_h if out.name == "stderr" else stdout_h).update(out.text.encode())
                if not gone:
                    try:
                        self.reply({"t": "stream", "re": rid, "name": out.name, "text": out.text})
                    except OSError:  # the exchange sees it through client_alive and stops the cell
                        gone = True
                return False
            if m.type == LogLine.T:
                host_log.info("[session %s] %s", session.name, m.header.get("text"))
                return False
            if m.type in EXECUTOR_REQUESTS:
                k.handle_executor_request(executor, m, prefix=session.sealed_prefix, party=session.party)
                return False
            return True

        result = executor.exchange(
            order,
            payloads,
            fds,
            on_message,
            timeout,
            cell_cpu=k.sandbox.limits.cell_cpu if k.sandbox is not None else None,
            client_alive=lambda: not gone and self.peer_open(),
        )
        return result, stdout_h, stderr_h

    HANDLERS = {  # noqa: RUF012 - filled once, here
        Hello: on_hello,
        Auth: on_auth,
        Whoami: on_whoami,
        AuditRequest: on_audit,
        Migration: on_migration,
        Ping: on_ping,
        SessionOpen: on_session_open,
        SessionClose: on_session_close,
        SessionRestart: on_session_restart,
        SessionList: on_session_list,
        Interrupt: on_interrupt,
        Call: on_call,
        CallCancel: on_call_cancel,
        Execute: on_execute,
    }


if set(Connection.HANDLERS) != set(REQUESTS.values()):  # a new request class needs its handler here
    _missing = sorted(c.__name__ for c in set(REQUESTS.values()) - set(Connection.HANDLERS))
    raise ImportError(f"requests without a handler in Connection.HANDLERS: {_missing}")  # noqa: EM102
