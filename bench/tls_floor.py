"""The physical floor of moving a result: bare TLS 1.3 between two processes on loopback, no kernel.

The server process holds a buffer of the size asked for (the result exists before it is sent, as in the kernel)
and sends it over TLS 1.3 in 8 MiB writes; the client receives it with ``recv_into`` into one fresh private
anonymous mapping of that size, faulted in 8 MiB at a time, as the project's client does
(``wire/arrow_chunks.ChunkBuffer``). The settings are
the project's channel's (``transports.connect_tls`` and ``enclave/kernel_keys.py``): TLS 1.3 minimum, a P-256
self-signed certificate, TCP_NODELAY, OpenSSL's default cipher order (AES-256-GCM here). With ``hashed``, each
side also takes one BLAKE3 pass over the bytes on a helper thread while they move (what a receipt needs on each
side), and the client checks its digest against the server's.

Used by ``bench/p7_frames.py`` (columns ``tls floor`` and ``tls+blake3 floor``); run alone to try it:

    python bench/tls_floor.py --bytes 190000000 --repeat 5
"""

from __future__ import annotations

import argparse
import datetime as dt
import mmap
import os
import queue
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import blake3

CHUNK = 8 << 20
_REQ = struct.Struct("<QB")  # size, hashed


class _ThreadHash:
    """BLAKE3 over the chunks given, on a helper thread (the project's ``wire/stream._Hasher`` does the same)."""

    def __init__(self) -> None:
        self.h = blake3.blake3()
        self.q: queue.SimpleQueue[memoryview | None] = queue.SimpleQueue()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self) -> None:
        while (v := self.q.get()) is not None:
            self.h.update(v)
            v.release()

    def digest(self) -> bytes:
        self.q.put(None)
        self.t.join()
        return bytes(self.h.digest())


def self_signed_pem(common_name: str) -> bytes:
    """A self-signed P-256 certificate and its key, PEM (the benches' bare TLS servers; P2 uses it too)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _server_context(workdir: Path) -> ssl.SSLContext:
    pem = self_signed_pem("tls floor")
    path = workdir / "floor.pem"
    path.write_bytes(pem)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(str(path))
    path.unlink()
    return ctx


def _recv_exact(sock: Any, view: memoryview) -> None:
    pos = 0
    while pos < view.nbytes:
        got = sock.recv_into(view[pos:], view.nbytes - pos)
        if got == 0:
            raise EOFError
        pos += got


def serve() -> None:
    """The sending process: one connection; for each request, ``size`` bytes (and their BLAKE3 if hashed)."""
    with tempfile.TemporaryDirectory() as tmp:
        ctx = _server_context(Path(tmp))
    lsock = socket.create_server(("127.0.0.1", 0))
    print(lsock.getsockname()[1], flush=True)
    raw, _ = lsock.accept()
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock = ctx.wrap_socket(raw, server_side=True)
    data = bytearray()
    req = bytearray(_REQ.size)
    while True:
        try:
            _recv_exact(sock, memoryview(req))
        except (EOFError, OSError):
            return
        size, hashed = _REQ.unpack(req)
        if len(data) != size:
            data = bytearray(os.urandom(1 << 20)) * (size >> 20) + bytearray(os.urandom(size & ((1 << 20) - 1)))
        view = memoryview(data)
        hasher = _ThreadHash() if hashed else None
        for off in range(0, size, CHUNK):
            chunk = view[off : off + CHUNK]
            sock.sendall(chunk)
            if hasher is not None:
                hasher.q.put(chunk)
        if hasher is not None:
            sock.sendall(hasher.digest())


class FloorClient:
    """The receiving end, in this process; :attr:`pid` is the server's (its CPU counts with this process's)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        port = int(self.proc.stdout.readline())
        self.pid = self.proc.pid
        raw = socket.create_connection(("127.0.0.1", port))
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        self.sock = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
        self.cipher = self.sock.cipher()

    def fetch(self, size: int, hashed: bool = False) -> None:
        """Receive ``size`` bytes into a fresh mapping (and check their BLAKE3 against the sender's, if hashed)."""
        self.sock.sendall(_REQ.pack(size, hashed))
        mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        hasher = _ThreadHash() if hashed else None
        with memoryview(mm) as view:
            for off in range(0, size, CHUNK):
                try:  # fault the chunk's pages in with one call (MADV_POPULATE_WRITE, Linux 5.14+), as the client does
                    mm.madvise(23, off, min(CHUNK, size - off))
                except OSError:
                    pass
                with view[off : off + CHUNK] as chunk:
                    _recv_exact(self.sock, chunk)
                    if hasher is not None:
                        hasher.q.put(chunk[:])  # the thread releases its own view
            if hasher is not None:
                theirs = bytearray(32)
                _recv_exact(self.sock, memoryview(theirs))
                if hasher.digest() != theirs:
                    msg = "the floor's bytes arrived corrupted"
                    raise RuntimeError(msg)
        mm.close()

    def close(self) -> None:
        self.sock.close()
        self.proc.wait(timeout=10)


def _proc_cpu(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--bytes", type=int, default=190_000_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    if args.serve:
        serve()
        return
    client = FloorClient()
    print(f"cipher {client.cipher}")
    try:
        for hashed in (False, True, False, True):
            walls, cpus = [], []
            client.fetch(args.bytes, hashed)
            for _ in range(args.repeat):
                k0, c0, t0 = _proc_cpu(client.pid), time.process_time(), time.perf_counter()
                client.fetch(args.bytes, hashed)
                walls.append(time.perf_counter() - t0)
                cpus.append(time.process_time() - c0 + _proc_cpu(client.pid) - k0)
            print(
                f"{'tls+blake3' if hashed else 'tls':10} {args.bytes / 1e6:.0f} MB: "
                f"wall {statistics.median(walls):.3f} s "
                f"(p10 {sorted(walls)[len(walls) // 10]:.3f}), CPU {statistics.median(cpus):.3f} s"
            )
    finally:
        client.close()


if __name__ == "__main__":
    main()
