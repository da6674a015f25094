"""The supervisor: lifecycle, the listener, spare executors, service pools, idle shutdown; it owns the keys.

It accepts connections (TCP + TLS, or in-process comms for tests) and hands each to a
:class:`~mesatee_notebook.enclave.connection.Connection` on its own thread. Executors' mid-call requests are
answered by ``enclave/broker.py``; receipts are built by ``enclave/receipting.py``.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from typing import Any

from mesatee_notebook.attestation.levels import Level
from mesatee_notebook.attestation.measurement import build_manifest, prefetch
from mesatee_notebook.enclave import receipting
from mesatee_notebook.enclave.broker import answer_executor, dataset_for_cell
from mesatee_notebook.enclave.config import AVAILABLE_LEVELS, KernelConfig
from mesatee_notebook.enclave.conn_slots import ConnectionSlots
from mesatee_notebook.enclave.connection import Connection
from mesatee_notebook.enclave.hardening import harden_process
from mesatee_notebook.enclave.hw_providers import open_level_hardware
from mesatee_notebook.enclave.kernel_keys import KernelIdentity
from mesatee_notebook.enclave.party_turns import GUARDED_SERVICES, PartyTurns
from mesatee_notebook.enclave.platform import load_platform
from mesatee_notebook.enclave.quotas import ByteBudget, QuotaBook
from mesatee_notebook.enclave.sandbox import Sandbox
from mesatee_notebook.enclave.service_pool import ServicePool
from mesatee_notebook.enclave.services import INTERNAL
from mesatee_notebook.enclave.sessions import ExecutorHandle, KernelSession
from mesatee_notebook.enclave.tpm import open_tpm
from mesatee_notebook.errors import MalformedFrame, MesateeError, PolicyViolation
from mesatee_notebook.transports import listen_inproc, stop_inproc
from mesatee_notebook.wire.comm import Comm, TLSComm
from mesatee_notebook.wire.protocol import RunService
from mesatee_notebook.wire.stream import Message

__all__ = ["Kernel"]

log = logging.getLogger("mesatee.enclave")
_NONCE_MEMORY = 1 << 20


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


class Kernel:
    """The enclave kernel's supervisor."""

    def __init__(self, config: KernelConfig) -> None:
        self.config = config
        prefetch()  # hash the native libraries while the TPM opens and the sandbox self-tests (build_manifest waits)
        # tpm: available only when --tcti names a TPM that answers (open_tpm refuses clearly otherwise).
        self.tpm = (
            open_tpm(config.tcti, app_pcr=config.tpm_app_pcr, boot_pcrs=config.tpm_boot_pcrs, ek=config.tpm_ek)
            if config.level is Level.TPM
            else None
        )
        # sev: a configfs-tsm guest, sgx: Gramine (tests only: a mimic tree); absent hardware: a typed refusal
        self.hw = open_level_hardware(config.level, config.hw_tee, config.hw_root)
        config.level.require_available(
            AVAILABLE_LEVELS | ({Level.TPM} if self.tpm else set()) | ({self.hw.level} if self.hw else set())
        )
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
        if config.level is not Level.UNPROTECTED:  # tpm/sev/sgx too: it signs the audit log and roots sealing
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
            hw=self.hw,
        )
        if self.tpm is not None:  # after the measured launch: the TPM unseals only to this measurement
            from mesatee_notebook.enclave.tpm_secret import tpm_sealing_secret

            try:
                self.sealing_secret = tpm_sealing_secret(self.tpm, config.data_dir, self.identity.measurement)
            except BaseException:
                self.tpm.close()  # swtpm without a resource manager would keep the AK and EK otherwise
                raise
        self.sessions: dict[str, KernelSession] = {}
        self.nonces = _NonceGuard()
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._connections = 0
        self.slots = ConnectionSlots(
            config.max_connections, config.max_pending_connections, config.max_party_connections
        )
        self._last_activity = time.monotonic()
        self._last_watch = time.monotonic()
        self._listener: socket.socket | None = None
        self.address: tuple[str, int] = (config.host, config.port)
        self.service_pools: dict[str, ServicePool] = {}
        self._inproc_names: list[str] = []
        self._spare: ExecutorHandle | None = None
        self._pools_lock = threading.Lock()
        self._sealed_store: tuple[tuple[bytes, str], Any] | None = None
        # Service calls share this gate; a migration takes it alone, so no service call runs meanwhile. A party's
        # guarded calls (party_turns.GUARDED_SERVICES) take its turn first: one at a time, in the head or a worker.
        self.service_gate, self.party_turns = _Gate(), PartyTurns()
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
    def open_session(self, name: str, party: str | None = None) -> KernelSession:
        holder = self.quotas.holder(party)
        self.quotas.take(holder, sessions=1, executors=1)
        session = KernelSession(name=name, memory_limit=self.config.executor_memory, party=party, sandbox=self.sandbox)
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

    def close_session(self, session: KernelSession) -> None:
        with self._lock:
            was_open = self.sessions.pop(session.id, None) is not None
        session.close()
        if was_open:
            self.quotas.give_back(self.quotas.holder(session.party), sessions=1, executors=1)

    def handle_executor_request(
        self, executor: ExecutorHandle, m: Message, *, prefix: str, party: str | None, service: bool = False
    ) -> None:
        """Answer an executor's mid-call request: sealed storage, a dataset for a cell, an audit entry."""
        answer_executor(self, executor, m, prefix=prefix, party=party, service=service)

    def dataset_for_cell(self, name: str, party: str | None) -> bytes:
        """Arrow bytes of a dataset, for a cell whose party the owner's policy gives code access."""
        return dataset_for_cell(self, name, party)

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
                    self._audit_recovery,
                )
                self.service_pools[lane] = pool
            return pool

    def _audit_recovery(self, details: dict[str, Any]) -> None:
        """A service worker was replaced: audited for the party whose call it ran last, and the operator, only."""
        party = details.pop("party", None)
        self.audit_log.append("recovery", None, details, concerns=[party] if isinstance(party, str) else [])

    def run_service(
        self,
        party: str,
        nonce: str,
        order: RunService | dict[str, Any],
        payloads: list[Any],
        fds: list[int],
        on_message: Any,
        timeout: float | None,
    ) -> Message:
        """Run a service call in its pool, fairly scheduled among the parties waiting there."""
        header = order.to_header() if isinstance(order, RunService) else order
        service = str(header["service"])
        if service in INTERNAL:  # ordered only by the kernel itself (the cluster head's upload split)
            for fd in fds:
                os.close(fd)
            msg = f"service {service!r} is internal to the kernel; clients cannot call it"
            raise PolicyViolation(msg, service=service)
        guarded = service in GUARDED_SERVICES  # one at a time per party, head or worker (party_turns)
        with self.party_turns.turn(party, nonce, service) if guarded else contextlib.nullcontext():
            return self._run_service(party, nonce, header, payloads, fds, on_message, timeout)

    def _run_service(
        self,
        party: str,
        nonce: str,
        header: dict[str, Any],
        payloads: list[Any],
        fds: list[int],
        on_message: Any,
        timeout: float | None,
    ) -> Message:
        requested = timeout if isinstance(timeout, (int, float)) and not isinstance(timeout, bool) else None
        t = receipting.clamp_timeout(requested, self.config.max_cell_timeout)
        service = str(header["service"])
        if service.startswith("cluster."):  # the cluster head (serve --cluster) serves these in the supervisor
            from mesatee_notebook.enclave.cluster.head import cluster_call

            return cluster_call(self, party, header, payloads, fds, timeout=t)
        head = getattr(self, "cluster_head", None)
        if head is not None:  # frame.*, dataset.delete/upload on a partitioned dataset
            from mesatee_notebook.enclave.cluster.datasets import auto_partition_header
            from mesatee_notebook.enclave.cluster.head import cluster_call, partitioned_call

            try:
                big = auto_partition_header(head, header, payloads, fds) if service == "dataset.upload" else None
                routed = None if big is not None else partitioned_call(self, party, header, timeout=t)
            except BaseException:  # e.g. a plain upload over a partitioned name: its payload fds go nowhere
                for fd in fds:
                    os.close(fd)
                raise
            if big is not None:  # big enough to spread over the workers (cluster_call closes the fds)
                return cluster_call(self, party, big, payloads, fds, timeout=t)
            if routed is not None:
                return routed
        with self.service_gate.shared():
            return self.service_pool(service).run(party, nonce, service, header, payloads, fds, on_message, t)

    def forget_party_frames(self, party: str) -> None:
        """Serve ``party``'s next service call as ``fresh`` in every pool.

        Its worker then re-reads the sealed differencing history the cluster head just added to
        (enclave/cluster/cluster_frames.py).
        """
        with self._pools_lock:
            pools = list(self.service_pools.values())
        for pool in pools:
            pool.forget_party(party)

    def restart_service_pools(self) -> None:
        """Stop every service worker; the next calls start fresh ones (which re-read sealed state)."""
        with self._pools_lock:
            pools, self.service_pools = list(self.service_pools.values()), {}
        for pool in pools:
            pool.shutdown()

    def cancel_service_call(self, party: str | None, nonce: str) -> bool:
        """Cancel the call with ``nonce`` (made by ``party``, if the canceller proved one), waiting or in any pool.

        The party turns are asked first (a call waiting there is in no pool yet), then the pools: a call leaves its
        turn's wait only to go on to a pool, so asked in this order it is found in one of them, but for the moment
        between (longer only while a migration holds the service gate) or on the cluster head.
        """
        if self.party_turns.cancel(party, nonce):
            return True
        with self._pools_lock:
            pools = list(self.service_pools.values())
        return any(pool.cancel(party, nonce) for pool in pools)

    def sealed_store(self) -> Any:
        from mesatee_notebook.enclave.migration import live_store

        if self.sealing_secret is None:
            msg = "sealed storage needs a softtee (or hardware) platform; an unprotected kernel has no sealing key"
            raise PolicyViolation(msg)
        # One store object for the kernel's life (its keys and directory never change while it runs): building it
        # derives two keys and lists the directory, which every sealed read of every service call paid before.
        key = (self.sealing_secret, self.identity.measurement)
        cached = self._sealed_store
        if cached is None or cached[0] != key:
            cached = self._sealed_store = (key, live_store(self.config.data_dir, *key))
        return cached[1]

    def sign_receipt(self, subjects: dict[str, str], predicate: dict[str, Any]) -> dict[str, Any]:
        return receipting.sign(self.identity, subjects, predicate)

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
                peer = f"{addr[0]}:{addr[1]}"
                token = self.slots.admit(conn, peer)  # may close an older pending or idle anonymous connection
                if token is None:
                    conn.close()
                    log.warning("refused %s: every connection slot is held by a party at work", peer)
                    continue
                with self._lock:
                    self._connections += 1
                    self._last_activity = time.monotonic()
                threading.Thread(target=self._handle, args=(conn, peer, token), daemon=True).start()
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

    def _handle(self, raw: socket.socket, peer: str, token: int) -> None:
        """A new TCP connection: the TLS handshake, then its requests (on this thread)."""
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            raw.settimeout(self.config.handshake_timeout)
            ctx = self.identity.ssl_context
            cert_der = self.identity.certificate_der  # the one this handshake presents (a refresh may follow)
            assert ctx is not None
            try:
                sock = ctx.wrap_socket(raw, server_side=True)
            except (OSError, ssl.SSLError) as exc:
                log.info("TLS handshake with %s failed: %s", peer, exc)
                raw.close()
                return
            if not self.slots.handed_over(token, sock):  # its slot was given to a newer connection meanwhile
                sock.close()
                return
            sock.settimeout(None)
            self.serve_comm(TLSComm(sock, peer=peer), cert_der, slot=token)
        except Exception:
            log.exception("connection %s failed unexpectedly", peer)
        finally:
            self.slots.release(token)
            with self._lock:
                self._connections -= 1
                self._last_activity = time.monotonic()

    def serve_comm(self, comm: Comm, cert_der: bytes | None = None, *, slot: int | None = None) -> None:
        """Serve one client over ``comm`` until it hangs up; its sessions close with it.

        ``cert_der`` is the certificate the client was shown (a party's proof signs over it); ``slot``: the
        connection's token in :attr:`slots` (TCP connections).
        """
        conn = Connection(self, comm, cert_der if cert_der is not None else self.identity.certificate_der)
        if slot is not None:
            self.slots.attach(slot, conn)
            conn.slotted = True
        try:
            conn.serve()
        finally:
            for session in list(conn.sessions.values()):
                self.close_session(session)
            comm.close()

    # -- in-process clients (tests) --------------------------------------------------------------
    def listen_inproc(self, name: str) -> str:
        """Accept ``inproc://NAME`` connections from this process (tests); returns the URL.

        Nothing here is attested by a TLS handshake: the comm presents this kernel's certificate as given.
        """
        self._inproc_names.append(name)
        return listen_inproc(name, self._accept_inproc, lambda: self.identity.certificate_der)

    def _accept_inproc(self, comm: Comm, cert_der: bytes) -> None:
        with self._lock:
            self._connections += 1
            self._last_activity = time.monotonic()

        def run() -> None:
            try:
                self.serve_comm(comm, cert_der)
            except Exception:
                log.exception("connection %s failed unexpectedly", comm.peer)
            finally:
                with self._lock:
                    self._connections -= 1
                    self._last_activity = time.monotonic()

        threading.Thread(target=run, name="mesatee-inproc", daemon=True).start()

    def shutdown(self) -> None:
        self.stopping.set()
        if getattr(self, "cluster_head", None) is not None:  # serve --cluster: release the lane, close the client
            from mesatee_notebook.enclave.cluster.head import detach_head

            detach_head(self)
        for name in self._inproc_names:
            stop_inproc(name)
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
        from mesatee_notebook.enclave.faas_exec import shutdown_pool

        shutdown_pool(self)  # issue 17: the warmed function executors
        if self.tpm is not None:
            self.tpm.close()
        info = self.config.data_dir / "kernel.json"
        try:
            if json.loads(info.read_text()).get("pid") == os.getpid():
                info.unlink()
        except (OSError, ValueError):
            pass
