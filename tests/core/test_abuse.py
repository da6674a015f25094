"""The kernel under abuse: limits before trust, idle connections, cut-off frames, p-less headers.

Each test is a regression test for an attack that worked before (issue 11). They use real kernel
processes over real TLS on loopback and look at the supervisor from outside (/proc, psutil).
"""

from __future__ import annotations

import os
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import psutil
import pytest

import mesatee_notebook as mn
from mesatee_notebook.errors import FrameTooLarge, MalformedFrame, QuotaExceeded, error_from_wire
from mesatee_notebook.wire.framing import MAGIC, PREFIX, Limits, pack_header
from mesatee_notebook.wire.messages import PROTOCOL_VERSION
from mesatee_notebook.wire.stream import recv_message, send_message
from tests.conftest import KernelProc, start_kernel, stop_kernel
from tests.waiting import PATIENCE, closed_by_peer, wait_until

pytestmark = pytest.mark.process


def raw_tls(kernel: KernelProc, timeout: float = 10) -> ssl.SSLSocket:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx.wrap_socket(socket.create_connection((kernel.host, kernel.port), timeout=timeout))


def hello(sock: ssl.SSLSocket) -> None:
    send_message(sock, {"t": "hello", "id": 1, "versions": [PROTOCOL_VERSION], "client": "test"})
    assert recv_message(sock, Limits()).type == "hello.ok"


def reply_error(sock: ssl.SSLSocket) -> mn.MesateeError | None:
    try:
        msg = recv_message(sock, Limits())
    except (EOFError, mn.KernelConnectionError, ssl.SSLError, OSError):
        return None
    assert msg.type == "error", msg.header
    return error_from_wire(msg.header)


def still_serving(kernel: KernelProc) -> None:
    s = mn.connect(kernel.url, policy=kernel.policy())
    try:
        assert s.run("6 * 7").value == 42
    finally:
        s.close()


def memfd_state(pid: int) -> tuple[int, int]:
    """(open memfd descriptors, mapped memfd regions) of a process, read from /proc."""
    fds = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/memfd:mesatee-payload"):
                fds += 1
        except OSError:
            continue
    maps = sum("memfd:mesatee-payload" in line for line in Path(f"/proc/{pid}/maps").read_text().splitlines())
    return fds, maps


@pytest.fixture(scope="module")
def strict_kernel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KernelProc]:
    """A kernel that closes silent connections after 2 s and lets anonymous clients hold 20 MiB in flight."""
    k = start_kernel(
        tmp_path_factory.mktemp("strict"), "--idle-connection-timeout", "2", "--anonymous-inflight-bytes", "20M"
    )
    yield k
    stop_kernel(k)


def test_header_without_p_is_a_typed_malformed_frame(kernel: KernelProc) -> None:
    sock = raw_tls(kernel)
    try:
        hello(sock)
        raw = msgpack.packb({"t": "ping", "id": 2})
        sock.sendall(PREFIX.pack(MAGIC, len(raw), 0) + raw)
        err = reply_error(sock)
        assert isinstance(err, MalformedFrame) and "'p'" in str(err)
    finally:
        sock.close()
    log = (kernel.data_dir / "serve.log").read_text()
    assert "KeyError" not in log and "Traceback" not in log
    still_serving(kernel)


def test_frames_before_hello_are_small(kernel: KernelProc) -> None:
    sock = raw_tls(kernel)
    try:
        raw = msgpack.packb({"t": "hello", "id": 1, "p": [1 << 20]})
        sock.sendall(PREFIX.pack(MAGIC, len(raw), 1 << 20) + raw)
        err = reply_error(sock)
        assert isinstance(err, FrameTooLarge) and "before 'hello'" in str(err)
    finally:
        sock.close()


def test_anonymous_frames_are_moderate(kernel: KernelProc) -> None:
    sock = raw_tls(kernel)
    try:
        hello(sock)
        size = 65 << 20
        raw = msgpack.packb({"t": "execute", "id": 2, "p": [size]})
        sock.sendall(PREFIX.pack(MAGIC, len(raw), size) + raw)
        err = reply_error(sock)
        assert isinstance(err, FrameTooLarge) and "party identity" in str(err)
    finally:
        sock.close()


@pytest.mark.slow
def test_aborted_large_uploads_free_every_buffer_and_thread(kernel: KernelProc) -> None:
    """100 uploads cut off mid-payload: no memfd, mapping, thread or RSS is left behind."""
    proc = psutil.Process(kernel.proc.pid)
    still_serving(kernel)  # warm: spare executor, service imports
    time.sleep(0.5)
    threads0, rss0 = proc.num_threads(), proc.memory_info().rss
    size, sent = 16 << 20, 12 << 20  # past the first 8 MiB chunk, so the hashing thread has work queued
    body = b"\x00" * sent
    for _ in range(100):
        sock = raw_tls(kernel)
        hello(sock)
        frame = pack_header({"t": "execute", "id": 2, "inputs": [{"name": "x"}]}, [size])
        sock.sendall(frame + body)
        sock.close()
    deadline = time.monotonic() + PATIENCE
    while time.monotonic() < deadline:
        state = memfd_state(kernel.proc.pid)
        if state == (0, 0) and proc.num_threads() <= threads0 + 2:
            break
        time.sleep(0.2)
    assert memfd_state(kernel.proc.pid) == (0, 0)
    assert proc.num_threads() <= threads0 + 2, (threads0, proc.num_threads())
    grown = proc.memory_info().rss - rss0
    assert grown < 256 << 20, f"supervisor RSS grew by {grown >> 20} MiB after 100 aborted uploads"
    still_serving(kernel)


@pytest.mark.slow
def test_idle_connections_are_closed(strict_kernel: KernelProc) -> None:
    """300 connections that said hello and then nothing: closed, and an honest client is served."""
    socks = []
    try:
        for _ in range(300):
            try:
                s = raw_tls(strict_kernel)
                hello(s)
            except (OSError, ssl.SSLError, EOFError, mn.KernelConnectionError):
                continue  # past max_connections the kernel refuses at accept
            socks.append(s)
        assert len(socks) >= 200
        deadline = time.monotonic() + PATIENCE  # each is closed 2 s after its hello; a slow machine only delays it
        open_ = [s for s in socks if not closed_by_peer(s, deadline)]
        assert open_ == [], f"{len(open_)} of {len(socks)} idle connections were still open after {PATIENCE:g} s"
    finally:
        for s in socks:
            s.close()
    still_serving(strict_kernel)


@pytest.mark.serial  # timing-sensitive: runs alone under pytest-xdist (tests/conftest.py)
@pytest.mark.slow
def test_an_idle_honest_client_stays_connected(strict_kernel: KernelProc) -> None:
    """The client pings while idle, so a notebook left alone keeps its session."""
    s = mn.connect(strict_kernel.url, policy=strict_kernel.policy())
    try:
        s.run("x = 5")
        time.sleep(4.5)
        assert s.run("x + 1").value == 6
    finally:
        s.close()


def test_anonymous_bytes_in_flight_are_bounded_together(strict_kernel: KernelProc) -> None:
    """Many anonymous connections each holding a half-sent frame cannot add up past the shared budget."""
    size = 10 << 20
    held = []
    try:
        for _ in range(2):
            s = raw_tls(strict_kernel)
            hello(s)
            s.sendall(pack_header({"t": "ping", "id": 2}, [size]) + b"\x00" * (1 << 20))  # and then nothing
            held.append(s)
        # both half-sent frames are counted (each took its share before its memfd was made)
        wait_until(lambda: memfd_state(strict_kernel.proc.pid)[0] >= 2, "the kernel to take both held frames")
        third = raw_tls(strict_kernel)
        try:
            hello(third)
            third.sendall(pack_header({"t": "ping", "id": 2}, [size]))
            err = reply_error(third)
            assert isinstance(err, QuotaExceeded), err
            assert "--anonymous-inflight-bytes" in str(err) and "party identity" in str(err)
        finally:
            third.close()
    finally:
        for s in held:
            s.close()
    # the budget comes back when they hang up (the kernel sees each EOF in its own time: ask until it has)
    wait_until(lambda: _ping_with(strict_kernel, size), "the anonymous budget to come back after the hang-ups")


def _ping_with(kernel: KernelProc, size: int) -> bool:
    """An anonymous ping carrying ``size`` bytes: True on pong, False if the shared budget refused it."""
    sock = raw_tls(kernel)
    try:
        hello(sock)
        sock.sendall(pack_header({"t": "ping", "id": 3}, [size]))
        try:
            sock.sendall(b"\x00" * size)
        except OSError:  # refused at the prefix: the kernel hung up after saying why
            pass
        try:
            msg = recv_message(sock, Limits())
        except (EOFError, mn.KernelConnectionError, ssl.SSLError, OSError):
            return False  # refused, and the reset beat the error frame: ask again
        if msg.type == "error":
            assert isinstance(error_from_wire(msg.header), QuotaExceeded), msg.header
            return False
        assert msg.type == "pong", msg.header
        return True
    finally:
        sock.close()
