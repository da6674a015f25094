"""The client end of the attested channel: TLS 1.3, evidence verified before a byte is sent."""

from __future__ import annotations

import itertools
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mesatee_notebook.attestation.policy import (
    AttestationReport,
    Policy,
    check_tpm_hello,
    tpm_hello_request,
    verify_certificate,
)
from mesatee_notebook.errors import KernelConnectionError, MalformedFrame, MesateeError, error_from_wire
from mesatee_notebook.remote.ctrl_c import Held, held_while_reading
from mesatee_notebook.wire.comm import DEFAULT_PORT, Comm, connect
from mesatee_notebook.wire.comm import parse_url as split_url
from mesatee_notebook.wire.digest import Hasher
from mesatee_notebook.wire.framing import Limits
from mesatee_notebook.wire.messages import PROTOCOL_VERSION
from mesatee_notebook.wire.stream import Allocator, Message, Progress

__all__ = ["DEFAULT_PORT", "Channel", "Reply", "open_channel", "parse_url"]


def parse_url(url: str) -> tuple[str, int]:
    """``mesatee://host:port`` (or ``host:port``) → (host, port)."""
    scheme, host, port = split_url(url)
    if scheme != "mesatee":
        msg = f"not a mesatee URL: {url!r} (expected mesatee://HOST:PORT)"
        raise ValueError(msg)
    return host, port


@dataclass(slots=True)
class Reply(Message):
    """A request's final reply, with the digests of the payloads the request sent (``sent``)."""

    sent: list[str] | None = None


def _client_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mesatee_notebook")
    except PackageNotFoundError:
        return "0+unknown"


class Channel:
    """One attested connection over a :class:`~mesatee_notebook.wire.comm.Comm`. Requests are sequential.

    It attests what the comm presents (the kernel's certificate, with its evidence) before a byte of the user's is
    sent, then says hello; a lock serialises callers. Open one with :func:`open_channel`.
    """

    def __init__(self, comm: Comm, policy: Policy, *, limits: Limits | None = None) -> None:
        self.policy = policy
        self.comm = comm
        self.url = comm.url
        scheme, where, port = split_url(comm.url) if comm.url else ("", "", 0)
        self.host, self.port = (where, port) if scheme == "mesatee" else (comm.url, 0)
        self.limits = limits or Limits()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        der = comm.peer_certificate()
        try:
            if not der:
                msg = "the kernel presented no certificate"
                raise KernelConnectionError(msg)
            self.attestation: AttestationReport = verify_certificate(der, policy, live=True)
        except BaseException:
            comm.close()
            raise
        comm.set_timeout(None)
        try:
            # tpm: a fresh nonce and a credential challenge ride in hello; no user byte goes before they check out.
            tpm_fields, tpm_kept = tpm_hello_request(self.attestation, policy)
            hello = self.request(
                {"t": "hello", "versions": [PROTOCOL_VERSION], "client": _client_version(), **tpm_fields}
            )
            self.attestation = check_tpm_hello(self.attestation, tpm_kept, hello.header, policy)
        except BaseException:
            self.close()
            raise
        self.protocol = int(hello.header["protocol"])
        self.server_version = str(hello.header.get("server"))
        self.kernel_nonce = str(hello.header.get("kernel_nonce"))
        self._closing = threading.Event()
        idle = hello.header.get("idle_timeout")
        if isinstance(idle, (int, float)) and not isinstance(idle, bool) and idle > 0:
            # The kernel closes connections that are silent for ``idle`` seconds: ping well before that.
            # A weak reference: a channel nobody holds any more is still closed by garbage collection.
            threading.Thread(
                target=_keepalive,
                args=(weakref.ref(self), self._closing, idle / 3),
                name="mesatee-keepalive",
                daemon=True,
            ).start()

    def _ping_if_idle(self) -> bool:
        """Send one keepalive ping unless a request is in flight; False when the connection is gone."""
        if not self._lock.acquire(blocking=False):
            return True  # a request is in flight: the connection is not idle
        try:
            if self.closed:
                return False
            self.comm.send({"t": "ping", "id": next(self._ids)})
            return self.comm.recv(self.limits).type == "pong"
        except (OSError, EOFError, MesateeError):
            return False
        finally:
            self._lock.release()

    def request(
        self,
        header: dict[str, Any],
        payloads: list[Any] | None = None,
        *,
        on_stream: Callable[[Message], None] | None = None,
        digests: bool = False,
        upload_progress: Progress | None = None,
        download_progress: Progress | None = None,
        on_interrupt: Callable[[], object] | None = None,
        hasher_for: Callable[[dict[str, Any]], Hasher | None] | None = None,
        allocator: Allocator | None = None,
    ) -> Reply:
        """Send a request and return its final reply; stream frames go to ``on_stream``.

        A typed error reply is raised as its local exception class. With ``digests`` the reply carries the
        digests of what was sent (``reply.sent``) and of what came back (``reply.digests``). ``result.chunk``
        frames (a large result in chunks) go to ``on_stream`` too; ``hasher_for`` and ``allocator`` are the
        frame reader's digest and buffer hooks for them (``remote/frames_result.py``). A frame that cannot be
        read whole closes the connection.
        """
        with self._lock:
            rid = next(self._ids)
            sent = self.comm.send({**header, "id": rid}, payloads or [], digests=digests, progress=upload_progress)
            interrupted = False
            while True:
                held = Held()
                try:
                    self.comm.wait_readable()  # a Ctrl-C here has read nothing: the stream stays in step
                    with held_while_reading() as held:  # a Ctrl-C during the frame is acted on once it is whole
                        msg = self.comm.recv(
                            self.limits,
                            digests=digests,
                            progress=download_progress,
                            hasher_for=hasher_for,
                            allocator=allocator,
                        )
                except EOFError:
                    self.close()
                    msg_ = "the kernel closed the connection"
                    raise KernelConnectionError(msg_) from None
                except MesateeError:
                    self.close()  # cut off or refused mid-frame: what follows on the stream cannot be read
                    raise
                except KeyboardInterrupt:
                    if held.abandoned or interrupted or on_interrupt is None:
                        self.close()
                        raise
                    interrupted = True
                    self._interrupt(on_interrupt)
                    continue
                final = msg.type not in ("stream", "progress", "result.chunk")
                if held.pressed and not final:  # pressed while this frame came in: now it is whole, act on it
                    if interrupted or on_interrupt is None:
                        self.close()
                        raise KeyboardInterrupt
                    interrupted = True
                    self._interrupt(on_interrupt)
                # (pressed during the final reply: the call is over, its result is returned)
                if msg.header.get("re") not in (rid, None):
                    msg_ = "the kernel answered a different request"
                    raise MalformedFrame(msg_)
                if msg.type in ("stream", "progress", "result.chunk"):
                    if on_stream is not None:
                        on_stream(msg)
                    continue
                if msg.type == "error":
                    raise error_from_wire(msg.header)
                return Reply(msg.header, msg.payloads, msg.digests, msg.fds, sent=sent)

    def _interrupt(self, on_interrupt: Callable[[], object]) -> None:
        """Ask the kernel to interrupt the call in progress (the first Ctrl-C); a failure closes the channel."""
        try:
            on_interrupt()
        except BaseException:
            self.close()  # the reply is still pending: this connection cannot be reused
            raise

    def authenticate(self, identity: Any) -> str:
        """Prove ``identity`` (a PartyIdentity) on this channel; returns the party id the kernel recorded."""
        import hashlib

        cert_sha = hashlib.sha256(self.attestation.certificate_der).digest()
        sig = identity.prove(self.kernel_nonce, cert_sha)
        reply = self.request({"t": "auth", "public_key": identity.public_key_raw, "signature": sig})
        party = str(reply.header["party"])
        if party != identity.party_id:
            msg = "the kernel recorded a different party id than this identity's"
            raise MalformedFrame(msg)
        return party

    def close(self) -> None:
        closing = getattr(self, "_closing", None)
        if closing is not None:
            closing.set()
        comm = getattr(self, "comm", None)
        if comm is not None:
            comm.close()

    @property
    def closed(self) -> bool:
        return self.comm.closed


def _keepalive(ref: weakref.ref[Channel], closing: threading.Event, interval: float) -> None:
    while not closing.wait(interval):
        channel = ref()
        if channel is None or not channel._ping_if_idle():
            return
        del channel


def open_channel(url: str, policy: Policy, *, timeout: float = 30.0, limits: Limits | None = None) -> Channel:
    """Connect to ``url`` (by its scheme: ``mesatee://`` is TLS) and attest it under ``policy``."""
    return Channel(connect(url, timeout=timeout), policy, limits=limits)
