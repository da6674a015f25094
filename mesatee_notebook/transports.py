"""The connectors that open comms: TLS to a kernel, a Unix socket, and in-process kernels for tests.

``wire/comm.py`` is pure (it opens nothing); this module opens the sockets and registers one connector per scheme
(``mesatee``, ``unix``, ``inproc``) with :func:`~mesatee_notebook.wire.comm.register_scheme`. It is imported by
``wire.comm.connect`` on first use.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable

from mesatee_notebook.errors import KernelConnectionError
from mesatee_notebook.wire.comm import Comm, InprocComm, TLSComm, UnixComm, register_scheme

__all__ = ["connect_inproc", "connect_tls", "connect_unix", "listen_inproc", "stop_inproc"]


def connect_tls(url: str, host: str, port: int, timeout: float) -> TLSComm:
    """TCP + TLS 1.3 to ``host:port``; the certificate is not checked here (the Channel attests it)."""
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        msg = f"cannot reach a mesatee kernel at {host}:{port}: {exc.strerror or exc}"
        raise KernelConnectionError(msg) from exc
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    # The certificate is self-signed by design (RA-TLS): trust comes from the evidence inside it, which the
    # Channel checks before any request byte is written.
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        sock = ctx.wrap_socket(raw, server_hostname=host)
    except (OSError, ssl.SSLError) as exc:
        raw.close()
        msg = f"TLS handshake with {host}:{port} failed: {exc}"
        raise KernelConnectionError(msg) from exc
    return TLSComm(sock, url=f"mesatee://{host}:{port}", peer=f"{host}:{port}")


def connect_unix(url: str, path: str, port: int, timeout: float) -> UnixComm:
    """A Unix stream socket at ``path``."""
    del port
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.settimeout(None)
    except OSError as exc:
        sock.close()
        msg = f"cannot reach {url}: {exc.strerror or exc}"
        raise KernelConnectionError(msg) from exc
    return UnixComm(sock, url=url, peer=path)


# -- in-process kernels (tests) ---------------------------------------------------------------------------------
_Accept = Callable[[Comm, bytes], None]
_INPROC: dict[str, tuple[_Accept, Callable[[], bytes]]] = {}
_INPROC_LOCK = threading.Lock()


def listen_inproc(name: str, accept: _Accept, certificate: Callable[[], bytes]) -> str:
    """Let ``connect("inproc://NAME")`` reach ``accept``; returns the URL.

    Each connection reads ``certificate()`` once: the client end presents it, and ``accept`` gets it with the
    server end (a party's proof signs over the certificate the client was shown).
    """
    with _INPROC_LOCK:
        if name in _INPROC:
            msg = f"an in-process kernel named {name!r} is already listening"
            raise ValueError(msg)
        _INPROC[name] = (accept, certificate)
    return f"inproc://{name}"


def stop_inproc(name: str) -> None:
    """Stop accepting in-process connections for ``name``."""
    with _INPROC_LOCK:
        _INPROC.pop(name, None)


def connect_inproc(url: str, name: str, port: int, timeout: float) -> InprocComm:
    """A socketpair to the in-process kernel ``name``; the client end presents that kernel's certificate."""
    del port, timeout
    with _INPROC_LOCK:
        entry = _INPROC.get(name)
    if entry is None:
        msg = f"cannot reach a mesatee kernel at {url}: no kernel of that name in this process"
        raise KernelConnectionError(msg)
    accept, certificate = entry
    shown = certificate()
    client, server = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    accept(InprocComm(server, None, url=url, peer=f"inproc-client:{client.fileno()}"), shown)
    return InprocComm(client, shown, url=url, peer=url)


register_scheme("mesatee", connect_tls)
register_scheme("unix", connect_unix)
register_scheme("inproc", connect_inproc)
