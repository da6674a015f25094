"""Large payloads into memfds (the kernel's receive path): chunk boundaries, digests, cut-off frames, helper threads.

A payload larger than one chunk that lands in an ``mmap`` buffer has its pages faulted in by a helper thread
(``wire/stream.py`` ``_Prefaulter``) while the bytes are read; these tests check that the bytes and digests are
exactly those sent at every chunk boundary, that a cut-off frame leaves no helper thread or mapping behind, and
that a digest which does not match what the client sent is refused by receipt verification.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import numpy as np
import pytest

from mesatee_notebook.enclave.shm import SharedAllocator
from mesatee_notebook.errors import KernelConnectionError, ReceiptError
from mesatee_notebook.wire import stream
from mesatee_notebook.wire.digest import payload_digest
from mesatee_notebook.wire.framing import Limits, pack_header
from mesatee_notebook.wire.stream import CHUNK, recv_message, send_message


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def _helpers() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name in ("mesatee-prefault", "mesatee-hash")]


def _payload(size: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


@pytest.mark.parametrize(
    "sizes",
    [
        [CHUNK + 1],  # one byte past the first chunk: the smallest payload with a prefaulter
        [2 * CHUNK],  # exactly two chunks
        [CHUNK - 1, 3 * CHUNK + 4097, 300 << 10],  # several payloads, one longer than the prefaulter's lead
        [(stream._Prefaulter.LEAD + 2) * CHUNK - 5],
    ],
)
def test_large_payloads_into_memfds_arrive_exactly_with_their_digests(pair, sizes):
    a, b = pair
    payloads = [_payload(n, i) for i, n in enumerate(sizes)]
    sent: list[list[str] | None] = []
    t = threading.Thread(target=lambda: sent.append(send_message(a, {"t": "x"}, payloads, digests=True)))
    t.start()
    alloc = SharedAllocator()
    try:
        msg = recv_message(b, Limits(max_payload=1 << 30), allocator=alloc, digests=True)
        t.join()
        assert [alloc.fd_of(p) is not None for p in msg.payloads] == [n >= alloc.threshold for n in sizes]
        for got, want in zip(msg.payloads, payloads, strict=True):
            assert bytes(got) == want
        assert msg.digests == sent[0] == [payload_digest(p) for p in payloads]
        # a byte flipped at a chunk boundary is a different digest (the digest covers every byte)
        flipped = bytearray(payloads[0])
        flipped[min(CHUNK, len(flipped) - 1)] ^= 1
        assert payload_digest(flipped) != msg.digests[0]
        assert _helpers() == []
    finally:
        alloc.close()


def test_a_frame_cut_off_mid_payload_frees_its_memfd_and_helper_threads(pair):
    a, b = pair
    size, cut = 16 * CHUNK, 2 * CHUNK + 12345  # the prefaulter waits, LEAD chunks ahead, when the sender goes away
    body = _payload(cut, 7)

    def send_then_hang_up() -> None:
        a.sendall(pack_header({"t": "x"}, [size]) + body)
        a.shutdown(socket.SHUT_WR)

    t = threading.Thread(target=send_then_hang_up)
    t.start()
    alloc = SharedAllocator()
    made = []

    def tracking(n: int):
        buf = alloc(n)
        made.append(buf)
        return buf

    with pytest.raises(KernelConnectionError, match="in the middle of a frame"):
        recv_message(b, Limits(max_payload=1 << 30), allocator=tracking, digests=True)
    t.join()
    assert len(made) == 1 and made[0].closed  # unmapped at once (no export of it was left by a helper thread)
    assert _helpers() == []
    alloc.close()


def test_a_kernel_digest_that_does_not_match_what_was_sent_is_refused(kernel):
    """A 20 MiB input (three chunks, prefaulted memfd): the receipt binds the kernel's digest of every byte."""
    import mesatee_notebook as mn
    from mesatee_notebook.attestation.receipts import verify_receipt

    blob = _payload(20 << 20, 3)
    s = mn.connect(kernel.url, policy=kernel.policy())
    try:
        r = s.run("n = len(b)\nn", inputs={"b": blob})
    finally:
        s.close()
    assert r.value == len(blob)
    assert r.verified.predicate["inputs"] == {"b": payload_digest(blob)}
    tampered = bytearray(blob)
    tampered[CHUNK] ^= 0x80  # the first byte of the second chunk

    def check(data: bytes | bytearray) -> object:
        return verify_receipt(
            r.receipt,
            s.policy,
            nonce=r.verified.predicate["nonce"],
            outputs=dict(r.receipt.subjects),
            inputs={"b": payload_digest(data)},
            code="n = len(b)\nn",
            attested=s.attestation,
        )

    check(blob)  # the same check passes with the bytes that were sent ...
    with pytest.raises(ReceiptError, match="input digests do not match"):
        check(tampered)  # ... and refuses one flipped bit


def test_a_peer_that_stalls_mid_frame_commits_at_most_the_prefaulters_lead(pair):
    """Pages are faulted in ahead of the reads by at most LEAD chunks, not for the whole announced size."""
    import os
    import time

    a, b = pair
    size, sent = 32 * CHUNK, 2 * CHUNK
    sender = threading.Thread(target=a.sendall, args=(pack_header({"t": "x"}, [size]) + _payload(sent, 9),))
    sender.start()  # then says nothing more
    alloc = SharedAllocator()
    fds: list[int] = []

    def tracking(n: int):
        buf = alloc(n)
        fds.append(alloc.fd_of(buf))
        return buf

    errors: list[BaseException] = []

    def receive() -> None:
        try:
            recv_message(b, Limits(max_payload=1 << 30), allocator=tracking, digests=True)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=receive)
    t.start()
    lead = (2 + stream._Prefaulter.LEAD + 1) * CHUNK
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not (fds and os.fstat(fds[0]).st_blocks * 512 >= sent + CHUNK):
        time.sleep(0.05)
    time.sleep(0.3)  # give the prefaulter time to run as far ahead as it would
    committed = os.fstat(fds[0]).st_blocks * 512
    sender.join(20)
    a.shutdown(socket.SHUT_WR)
    t.join(20)
    assert sent + CHUNK <= committed <= lead, (committed >> 20, lead >> 20)
    assert len(errors) == 1 and isinstance(errors[0], KernelConnectionError)
    assert _helpers() == []
    alloc.close()
