"""The receive buffers of a result in chunks (issue 15 P7, session 7), over real Unix sockets, no kernel.

The supervisor lands every result chunk of one service exchange in the same buffer (``ChunkLanding``, through
``ipc_recv``'s ``allocator_for`` hook) and relays it before the next read; the client faults each chunk's pages in
with one call before the bytes arrive (``ChunkBuffer``). These check that reusing and prefaulting change no byte and
no digest, that nothing but a result chunk lands in the reused buffer, and that a cut-off frame is a typed error.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from mesatee_notebook.enclave.ipc import ipc_recv, ipc_send
from mesatee_notebook.enclave.result_stream import ChunkRelay
from mesatee_notebook.errors import KernelConnectionError
from mesatee_notebook.wire import arrow_chunks
from mesatee_notebook.wire.arrow_chunks import CHUNK_BYTES, ChunkBuffer, ChunkLanding
from mesatee_notebook.wire.comm import UnixComm
from mesatee_notebook.wire.digest import Hasher, payload_digest
from mesatee_notebook.wire.framing import pack_header
from mesatee_notebook.wire.protocol import ResultChunk
from mesatee_notebook.wire.stream import Message


@pytest.fixture
def link() -> Iterator[tuple[socket.socket, UnixComm]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    yield a, UnixComm(b)
    a.close()
    b.close()


def _send_in_thread(fn: Any) -> threading.Thread:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


def test_result_chunks_land_in_one_reused_buffer_and_other_frames_do_not(
    link: tuple[socket.socket, UnixComm],
) -> None:
    sender, comm = link
    pieces = [os.urandom(CHUNK_BYTES), os.urandom(CHUNK_BYTES), os.urandom(3 << 20)]
    total = sum(len(p) for p in pieces)

    def send() -> None:
        for i, piece in enumerate(pieces):
            ipc_send(sender, ResultChunk("out/x", i, total).to_header(), [piece])
        ipc_send(sender, {"t": "log", "line": "x"}, [b"y" * (2 << 20)])  # not a chunk: its own buffer
        ipc_send(sender, ResultChunk("out/y", 0, CHUNK_BYTES + 1).to_header(), [b"z" * (CHUNK_BYTES + 1)])

    t = _send_in_thread(send)
    landing = ChunkLanding()
    owners = []
    for piece in pieces:
        msg = ipc_recv(comm, allocator_for=landing.allocator_for)
        buf = msg.payloads[0]
        assert bytes(buf) == piece  # checked before the next read overwrites it
        owners.append(memoryview(buf).obj)
    assert owners[0] is owners[1] is owners[2]
    other = ipc_recv(comm, allocator_for=landing.allocator_for)
    assert isinstance(other.payloads[0], bytearray)
    assert memoryview(other.payloads[0]).obj is not owners[0]
    big = ipc_recv(comm, allocator_for=landing.allocator_for)  # over the chunk size: a fresh buffer of its own
    assert isinstance(big.payloads[0], bytearray)
    assert len(big.payloads[0]) == CHUNK_BYTES + 1
    t.join()


def test_the_relay_through_the_reused_buffer_digests_and_sends_every_byte(
    link: tuple[socket.socket, UnixComm],
) -> None:
    sender, comm = link
    data = os.urandom(2 * CHUNK_BYTES + 12345)
    parts = [data[i : i + CHUNK_BYTES] for i in range(0, len(data), CHUNK_BYTES)]
    sent: list[bytes] = []

    def to_client(header: dict[str, Any], payloads: list[Any], hasher: Hasher) -> None:
        for p in payloads:
            hasher.update(p)
            sent.append(bytes(p))

    relay = ChunkRelay(to_client, rid=1)

    def send() -> None:
        for i, part in enumerate(parts):
            ipc_send(sender, ResultChunk("out/v", i, len(data)).to_header(), [part])

    t = _send_in_thread(send)
    landing = ChunkLanding()
    for _ in parts:
        relay.on_chunk(ipc_recv(comm, allocator_for=landing.allocator_for))
    t.join()
    result = Message({"t": "result", "values": [{"name": "out/v", "kind": "bytes", "chunks": len(parts)}]})
    subjects, specs = relay.finish(result)
    assert b"".join(sent) == data
    assert subjects == {"out/v": payload_digest(data)}
    assert specs[0]["chunks"] == len(parts)


def test_a_cut_off_chunk_into_the_reused_buffer_is_a_typed_error(link: tuple[socket.socket, UnixComm]) -> None:
    sender, comm = link
    head = pack_header(ResultChunk("out/x", 0, CHUNK_BYTES).to_header(), [CHUNK_BYTES])

    def send() -> None:  # a chunk that promises 8 MiB and stops after 1 MiB
        sender.sendall(head + b"\0" * (1 << 20))
        sender.shutdown(socket.SHUT_WR)

    t = _send_in_thread(send)
    with pytest.raises(KernelConnectionError, match="in the middle of a frame"):
        ipc_recv(comm, allocator_for=ChunkLanding().allocator_for)
    t.join()


@pytest.mark.parametrize("advice", ["populate", "refused"])
def test_chunk_buffer_prefaulting_keeps_every_byte_in_its_place(advice: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if advice == "refused":  # an older kernel: madvise fails with EINVAL, and the reads fault the pages in instead
        monkeypatch.setattr(arrow_chunks, "_MADV_POPULATE_WRITE", 0x7FFF)
    sizes = [(1 << 20) + 17, 3 << 20, 5, (2 << 20) - 3]  # unaligned starts, and a piece too small to prefault
    data = os.urandom(sum(sizes))
    buf = ChunkBuffer(len(data))
    pos = 0
    for n in sizes:
        view = buf.take(n)
        view[:] = data[pos : pos + n]
        pos += n
    mm = buf.done()
    try:
        assert mm[:] == data
    finally:
        mm.close()
