"""The transport seam: a small ``Comm`` (send a message, receive one, close), chosen by URL scheme.

In the manner of ``distributed.comm``: everything above this module (the client's ``Channel``, the kernel's
connection, the supervisor's executor handles and the executors' ``SupervisorClient``) speaks to a :class:`Comm`
and never to a socket. Every comm moves the same frames (``wire/framing.py``, ``wire/stream.py``).

=====================  ==================  ===================================================================
scheme                 class               what it is
=====================  ==================  ===================================================================
``mesatee://H:P``      :class:`TLSComm`    TCP + TLS 1.3 to a kernel; presents the kernel's certificate
``unix:///path``       :class:`UnixComm`   a Unix socket (executor ↔ supervisor; passes fds as SCM_RIGHTS)
``inproc://NAME``      :class:`InprocComm` a kernel in this very process (tests): a socketpair, no TLS
=====================  ==================  ===================================================================

What a comm *presents* (:meth:`Comm.peer_certificate`) is what :class:`~mesatee_notebook.remote.channel.Channel`
attests before it sends a user byte. A TLS comm presents the certificate the TLS handshake proved the peer holds
the key of. An in-process comm presents the certificate its kernel registered: there is no handshake, so it proves
nothing about key possession and gives no confidentiality. It exists so that protocol tests run a real supervisor
and real handlers in threads; never use it across a trust boundary (it cannot cross a process boundary anyway).

``connect(url)`` picks the connector registered for the URL's scheme (as ``distributed.comm.registry`` does). This
module stays pure (it opens no socket: the comms wrap sockets they are given); the connectors that open them are
registered by ``mesatee_notebook/transports.py``. A second transport (e.g. a cluster worker's link) is one more
``Comm`` subclass and one ``register_scheme`` call; server side, whatever accepts it hands each new comm to
``Kernel.serve_comm``.
"""

from __future__ import annotations

import urllib.parse
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, Unpack

from mesatee_notebook.wire.framing import Limits
from mesatee_notebook.wire.stream import Message, RecvOptions, SendOptions, recv_message, send_message

__all__ = [
    "DEFAULT_PORT",
    "Comm",
    "Connector",
    "InprocComm",
    "SocketComm",
    "TLSComm",
    "UnixComm",
    "connect",
    "parse_url",
    "register_scheme",
]

DEFAULT_PORT = 7443


class Comm(ABC):
    """One ordered, reliable, two-way message link (one reader and one writer at a time)."""

    #: ``mesatee://host:port`` or the like: where this comm leads (for messages and for a second connection).
    url: str = ""
    #: The peer, as text for logs.
    peer: str = ""

    @abstractmethod
    def send(
        self, header: dict[str, Any], payloads: Sequence[Any] = (), **options: Unpack[SendOptions]
    ) -> list[str] | None:
        """Send one message (options as ``wire.stream.send_message``); the payload digests when ``digests`` is set."""

    @abstractmethod
    def recv(self, limits: Limits, **options: Unpack[RecvOptions]) -> Message:
        """Receive one message (options as ``wire.stream.recv_message``); EOFError on a clean close between messages."""

    @abstractmethod
    def close(self) -> None:
        """Close the link (idempotent)."""

    @property
    @abstractmethod
    def closed(self) -> bool:
        """True once closed."""

    def peer_certificate(self) -> bytes | None:
        """The DER certificate the peer presented (None: it presented none)."""
        return None

    def peer_open(self) -> bool:
        """False once the peer has hung up, seen without reading a byte of what it sent."""
        return not self.closed

    def set_timeout(self, seconds: float | None) -> None:  # noqa: B027 - optional for a comm without a socket
        """Bound the next wait for a message (None: wait forever)."""

    def wait_readable(self) -> None:  # noqa: B027 - optional: a comm without a socket has its message at once
        """Wait, within the comm's timeout, until a message has begun to arrive, reading none of it.

        A signal raised here (Ctrl-C) has consumed nothing, so the stream stays in step. TimeoutError when the
        timeout passes first.
        """

    def fileno(self) -> int:
        """A descriptor that polls readable when a message arrives (-1: none)."""
        return -1


class SocketComm(Comm):
    """A comm over a connected stream socket it is given (``socket.socket``, ``ssl.SSLSocket``); it opens nothing."""

    def __init__(self, sock: Any, *, url: str = "", peer: str = "") -> None:
        self.sock = sock
        self.url = url
        self.peer = peer

    def send(
        self, header: dict[str, Any], payloads: Sequence[Any] = (), **options: Unpack[SendOptions]
    ) -> list[str] | None:
        return send_message(self.sock, header, payloads, **options)

    def recv(self, limits: Limits, **options: Unpack[RecvOptions]) -> Message:
        return recv_message(self.sock, limits, **options)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    @property
    def closed(self) -> bool:
        return self.fileno() < 0

    def wait_readable(self) -> None:
        import select

        pending = getattr(self.sock, "pending", None)  # TLS: bytes already decrypted and buffered
        if pending is not None and pending() > 0:
            return
        timeout = self.sock.gettimeout()
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR)
        if not poller.poll(None if timeout is None else max(0, int(timeout * 1000))):
            msg = "timed out"
            raise TimeoutError(msg)

    def peer_open(self) -> bool:
        import select

        try:
            poller = select.poll()
            poller.register(self.sock.fileno(), select.POLLRDHUP | select.POLLHUP | select.POLLERR)
            return not poller.poll(0)
        except (OSError, ValueError):  # closed under us
            return False

    def set_timeout(self, seconds: float | None) -> None:
        if self.sock.fileno() >= 0:
            self.sock.settimeout(seconds)

    def fileno(self) -> int:
        return int(self.sock.fileno())


class TLSComm(SocketComm):
    """TCP + TLS 1.3; the client end presents the certificate the kernel proved it holds the key of."""

    def peer_certificate(self) -> bytes | None:
        der = self.sock.getpeercert(binary_form=True)
        return bytes(der) if der else None


class UnixComm(SocketComm):
    """A Unix stream socket: the supervisor ↔ executor link (fds travel with a header)."""


class InprocComm(SocketComm):
    """One end of a socketpair to a kernel in this process (tests); presents the certificate it was given."""

    def __init__(self, sock: Any, certificate: bytes | None, *, url: str = "", peer: str = "") -> None:
        super().__init__(sock, url=url, peer=peer)
        self._certificate = certificate

    def peer_certificate(self) -> bytes | None:
        return self._certificate


# -- choosing a comm by URL -------------------------------------------------------------------------------------
Connector = Callable[[str, str, int, float], Comm]
"""``connector(url, host_or_path_or_name, port, timeout)`` → an open comm (nothing attested yet)."""
_CONNECTORS: dict[str, Connector] = {}


def register_scheme(scheme: str, connector: Connector) -> None:
    """Make ``connect`` open ``scheme://`` URLs with ``connector``."""
    _CONNECTORS[scheme] = connector


def parse_url(url: str) -> tuple[str, str, int]:
    """``scheme://host:port`` (``host:port`` means ``mesatee://``) → (scheme, host or path or name, port)."""
    text = url if "://" in url else f"mesatee://{url}"
    parsed = urllib.parse.urlsplit(text)
    if parsed.scheme == "mesatee" and parsed.hostname:
        return "mesatee", parsed.hostname, parsed.port or DEFAULT_PORT
    if parsed.scheme == "unix" and parsed.path:
        return "unix", parsed.path, 0
    if parsed.scheme == "inproc" and parsed.netloc:
        return "inproc", parsed.netloc, 0
    msg = f"not a mesatee URL: {url!r} (expected mesatee://HOST:PORT)"
    raise ValueError(msg)


def connect(url: str, *, timeout: float = 30.0) -> Comm:
    """Open a comm to ``url`` with the connector of its scheme (see the module docstring); nothing is attested here."""
    scheme, where, port = parse_url(url)
    connector = _CONNECTORS.get(scheme)
    if connector is None:
        import importlib

        importlib.import_module("mesatee_notebook.transports")  # registers the standard schemes
        connector = _CONNECTORS[scheme]
    return connector(url, where, port, timeout)
