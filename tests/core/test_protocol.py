"""Bad input on the wire: the kernel answers with a typed error or hangs up, and keeps serving everyone else."""

from __future__ import annotations

import secrets
import socket
import ssl
import struct

import msgpack
import pytest

import mesatee_notebook as mn
from mesatee_notebook.errors import MalformedFrame, ProtocolError, VersionMismatch, error_from_wire
from mesatee_notebook.wire.framing import MAGIC, PREFIX, Limits, pack_header
from mesatee_notebook.wire.messages import PROTOCOL_VERSION
from mesatee_notebook.wire.stream import recv_message, send_message

pytestmark = pytest.mark.process


def raw_tls(kernel) -> ssl.SSLSocket:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    sock = ctx.wrap_socket(socket.create_connection((kernel.host, kernel.port), timeout=10))
    return sock


def hello(sock) -> None:
    send_message(sock, {"t": "hello", "id": 1, "versions": [PROTOCOL_VERSION], "client": "test"})
    assert recv_message(sock, Limits()).type == "hello.ok"


def open_session(sock, name: str) -> dict:
    send_message(sock, {"t": "session.open", "id": 2, "name": name})
    return recv_message(sock, Limits()).header


def reply_error(sock):
    try:
        msg = recv_message(sock, Limits())
    except (EOFError, mn.KernelConnectionError, ssl.SSLError, OSError):
        return None
    assert msg.type == "error"
    return error_from_wire(msg.header)


def still_serving(kernel) -> None:
    s = mn.connect(kernel.url, policy=kernel.policy())
    try:
        assert s.run("6 * 7").value == 42
    finally:
        s.close()


@pytest.fixture
def conn(kernel):
    sock = raw_tls(kernel)
    yield sock
    sock.close()


def test_garbage_bytes(kernel, conn):
    conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    err = reply_error(conn)
    assert isinstance(err, MalformedFrame) and "mesatee" in str(err)
    still_serving(kernel)


def test_truncated_frame_then_disconnect(kernel, conn):
    frame = pack_header({"t": "hello", "id": 1, "versions": [1]}, [])
    conn.sendall(frame[: len(frame) // 2])
    conn.close()
    still_serving(kernel)


def test_wrong_protocol_version_gets_one_clear_sentence(kernel, conn):
    send_message(conn, {"t": "hello", "id": 1, "versions": [99], "client": "9.9"})
    err = reply_error(conn)
    assert isinstance(err, VersionMismatch)
    assert "upgrade mesatee_notebook on the kernel side" in str(err)
    still_serving(kernel)


def test_oversized_header_is_refused_before_reading_it(kernel, conn):
    conn.sendall(PREFIX.pack(MAGIC, 1 << 30, 0))
    err = reply_error(conn)
    assert err is not None and err.code == "protocol.too-large"
    still_serving(kernel)


def test_oversized_payload_is_refused_before_reading_it(kernel, conn):
    hello(conn)
    raw = msgpack.packb({"t": "ping", "id": 2, "p": [1 << 40]})
    conn.sendall(PREFIX.pack(MAGIC, len(raw), 1 << 40) + raw)
    err = reply_error(conn)
    assert err is not None and "over the limit" in str(err)
    still_serving(kernel)


def test_header_that_lies_about_payload_sizes(kernel, conn):
    hello(conn)
    raw = msgpack.packb({"t": "ping", "id": 2, "p": [10]})
    conn.sendall(PREFIX.pack(MAGIC, len(raw), 3) + raw + b"abc")
    err = reply_error(conn)
    assert isinstance(err, MalformedFrame)
    still_serving(kernel)


def test_unknown_message_type_keeps_the_connection(kernel, conn):
    hello(conn)
    send_message(conn, {"t": "format_disk", "id": 2})
    err = reply_error(conn)
    assert isinstance(err, ProtocolError) and "format_disk" in str(err)
    send_message(conn, {"t": "ping", "id": 3})
    assert recv_message(conn, Limits()).type == "pong"


def test_request_before_hello_is_refused(kernel, conn):
    send_message(conn, {"t": "ping", "id": 1})
    err = reply_error(conn)
    assert isinstance(err, ProtocolError) and "hello" in str(err)


def test_replayed_nonce_is_refused(kernel, conn):
    hello(conn)
    opened = open_session(conn, "replay")
    nonce = secrets.token_hex(16)
    req = {
        "t": "execute",
        "session": opened["session"],
        "token": opened["token"],
        "nonce": nonce,
        "code": "1",
        "inputs": [],
        "outputs": [],
    }
    send_message(conn, {**req, "id": 3})
    assert recv_message(conn, Limits()).type == "result"
    send_message(conn, {**req, "id": 4})
    err = reply_error(conn)
    assert isinstance(err, mn.PolicyViolation) and "replayed" in str(err)


def test_wrong_session_token_is_refused(kernel, conn):
    hello(conn)
    opened = open_session(conn, "tok")
    send_message(
        conn,
        {
            "t": "execute",
            "id": 3,
            "session": opened["session"],
            "token": "0" * 32,
            "nonce": secrets.token_hex(16),
            "code": "1",
            "inputs": [],
            "outputs": [],
        },
    )
    err = reply_error(conn)
    assert isinstance(err, mn.PolicyViolation) and "token" in str(err)


def test_client_disconnects_mid_upload(kernel, conn):
    hello(conn)
    opened = open_session(conn, "mid")
    raw = msgpack.packb(
        {
            "t": "execute",
            "id": 3,
            "session": opened["session"],
            "token": opened["token"],
            "nonce": secrets.token_hex(16),
            "code": "1",
            "inputs": [{"name": "x", "kind": "bytes", "meta": {}}],
            "outputs": [],
            "p": [50 << 20],
        }
    )
    conn.sendall(PREFIX.pack(MAGIC, len(raw), 50 << 20) + raw)
    conn.sendall(b"\0" * (4 << 20))
    conn.close()
    still_serving(kernel)


def test_malformed_value_payload_is_a_typed_error(kernel, conn):
    hello(conn)
    opened = open_session(conn, "badval")
    send_message(
        conn,
        {
            "t": "execute",
            "id": 3,
            "session": opened["session"],
            "token": opened["token"],
            "nonce": secrets.token_hex(16),
            "code": "x",
            "outputs": [],
            "inputs": [{"name": "x", "kind": "npy", "meta": {}}],
        },
        [b"\x93NUMPY garbage"],
    )
    err = reply_error(conn)
    assert err is not None and "npy" in str(err)
    send_message(conn, {"t": "ping", "id": 4})
    assert recv_message(conn, Limits()).type == "pong"


def test_prefix_struct_layout_is_stable():
    assert PREFIX.size == 16
    assert struct.unpack("!4sIQ", pack_header({"t": "x"}, [5])[:16])[2] == 5
