"""A fake TLS 'kernel' that presents a chosen certificate and records every byte it receives."""

from __future__ import annotations

import datetime as dt
import os
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from tests.waiting import PATIENCE


@dataclass
class FakeKernel:
    """Serves one TLS connection with ``cert``/``key``; ``received`` holds application bytes."""

    cert_pem: bytes
    key: ec.EllipticCurvePrivateKey
    received: bytearray = field(default_factory=bytearray)
    handshakes: int = 0
    port: int = 0
    done: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        fd = os.memfd_create("fake")
        os.write(fd, self.cert_pem + self.key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
        os.close(fd)
        self._ctx = ctx
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"mesatee://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        conn, _ = self._listener.accept()
        tls = None
        try:
            tls = self._ctx.wrap_socket(conn, server_side=True)
            self.handshakes += 1
            # It reads until the client hangs up (a refusing client does) or sends its first bytes (one that passed
            # attestation: its hello); the deadline only bounds a client that does neither. (A fixed 3 s window lost
            # a slow client's hello on a loaded machine.)
            tls.settimeout(PATIENCE)
            deadline = time.monotonic() + PATIENCE
            while time.monotonic() < deadline:
                try:
                    data = tls.recv(65536)
                except (TimeoutError, ssl.SSLError, OSError):
                    break
                if not data:
                    break
                self.received.extend(data)
                if len(self.received) >= len(b"MTEE"):  # enough to tell a frame (every test checks no more)
                    break
        except (ssl.SSLError, OSError):
            pass
        finally:
            if tls is not None:
                tls.close()
            conn.close()
            self._listener.close()
            self.done.set()


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
