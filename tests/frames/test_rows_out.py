"""Large results in chunks (issue 15 P7): exact round trips, receipts over every byte, cut-off streams, the guard.

A DataFrame result of at least ``CHUNKED_MIN`` encoded bytes leaves the service worker in chunks that the
supervisor relays to the client while the worker sends the next (``enclave/result_stream.py``); these tests run
it through a real kernel over real TLS, and check the pieces (``wire/arrow_chunks.py``, ``remote/frames_result.py``)
on their own.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mesatee_notebook as mn
from mesatee_notebook.errors import KernelConnectionError, MalformedFrame, PolicyViolation, ReceiptError
from mesatee_notebook.remote import frames_result
from mesatee_notebook.remote.frames_result import ResultChunks
from mesatee_notebook.wire.arrow_chunks import CHUNKED_MIN, ChunkBuffer, split_parts
from mesatee_notebook.wire.codecs import digest_parts, encode_value
from mesatee_notebook.wire.digest import from_digest_set
from tests.conftest import KernelProc

ROWS = 1_300_000


def big_frame() -> pd.DataFrame:
    rng = np.random.default_rng(15)
    b = rng.normal(size=ROWS)
    b[::7] = np.nan
    s = pd.Series(rng.choice(["north", "south", "east", "west", "ünïcode"], ROWS), dtype="str")
    s[::11] = None
    return pd.DataFrame(
        {
            "a": np.arange(ROWS, dtype=np.int64),
            "b": b,
            "s": s,
            "c": pd.Categorical(rng.choice(["x", "y", "z"], ROWS), categories=["z", "y", "x", "unused"]),
            "flag": rng.integers(0, 2, ROWS).astype(bool),
            "i32": rng.integers(-5, 5, ROWS).astype(np.int32),
        }
    )


class Parties:
    def __init__(self, kernel: KernelProc, root: Path) -> None:
        self.policy = cast("mn.Policy", kernel.policy())
        self.url = kernel.url
        self.owner = mn.connect(kernel.url, policy=self.policy, identity=root / "owner")
        self.analyst = mn.connect(kernel.url, policy=self.policy, identity=root / "analyst")
        self.data = big_frame()
        self.root = root


@pytest.fixture(scope="module")
def parties(kernel: KernelProc, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Parties]:
    p = Parties(kernel, tmp_path_factory.mktemp("rows_out"))
    p.owner.upload(p.data, "rows_big", policy=mn.DataPolicy(min_group_size=10, allow_rows=False))
    p.owner.upload(p.data, "rows_open", policy=mn.DataPolicy(min_group_size=0, allow_rows=True))
    yield p
    p.owner.close()
    p.analyst.close()


@pytest.fixture
def chunk_log(monkeypatch: pytest.MonkeyPatch) -> list[ResultChunks]:
    """Every ResultChunks a call makes in this test (to see that chunks came, and that buffers were freed)."""
    made: list[ResultChunks] = []
    real = frames_result.ResultChunks

    class Spy(real):  # type: ignore[misc, valid-type]
        def __init__(self, limit: int) -> None:
            super().__init__(limit)
            self.added = 0
            made.append(self)

        def add(self, msg: Any) -> None:
            self.added += 1
            super().add(msg)

    monkeypatch.setattr("mesatee_notebook.remote.session.ResultChunks", Spy)
    return made


def test_the_test_result_is_big_enough_to_be_chunked() -> None:
    assert encode_value(big_frame()).nbytes >= CHUNKED_MIN


@pytest.mark.slow
def test_owner_rows_out_round_trip_is_exact(parties: Parties, chunk_log: list[Any]) -> None:
    f = parties.owner.dataframe("rows_big")
    got = f[f.a != 5].collect()  # a filter: the index is no longer a RangeIndex
    expected = parties.data[parties.data.a != 5]
    pd.testing.assert_frame_equal(got, expected)  # values, NaN and None, dtypes (str, category, bool, int32), index
    assert list(got["c"].cat.categories) == ["z", "y", "x", "unused"]
    assert chunk_log[-1].added > 1  # the collect's result came in chunks (the frame.info call before it did not)
    receipt = parties.owner.last_receipt
    assert receipt is not None
    verified = mn.verify_receipt(receipt, parties.policy)
    # the receipt's digest is over exactly the bytes of the unchunked encoding of this frame
    subject = {s["name"]: from_digest_set(s["digest"]) for s in verified.statement["subject"]}
    assert subject["out/result"] == digest_parts(encode_value(got).parts)


@pytest.mark.slow
def test_a_flipped_byte_in_a_chunk_is_refused(parties: Parties, monkeypatch: pytest.MonkeyPatch) -> None:
    real = ResultChunks.hasher_for
    flipped: list[bool] = []

    class Flip:
        def __init__(self, h: Any) -> None:
            self.h = h

        def update(self, data: Any) -> None:
            view = memoryview(data).cast("B")
            if not flipped and view.nbytes:
                flipped.append(True)
                self.h.update(bytes([view[0] ^ 1]))  # as if one byte had changed on its way
                self.h.update(view[1:])
            else:
                self.h.update(view)

        def hexdigest(self) -> str:
            return str(self.h.hexdigest())

    def hasher_for(self: ResultChunks, header: dict[str, Any]) -> Any:
        h = real(self, header)
        return None if h is None else Flip(h)

    monkeypatch.setattr(ResultChunks, "hasher_for", hasher_for)
    f = parties.owner.dataframe("rows_big")
    with pytest.raises(ReceiptError):
        f[f.a >= 0].collect()
    assert flipped


@pytest.mark.slow
def test_a_cut_off_stream_is_a_typed_error_and_frees_its_buffer(
    parties: Parties, chunk_log: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    s = mn.connect(parties.url, policy=parties.policy, identity=parties.root / "owner")
    real_add = frames_result.ResultChunks.add

    def add(self: ResultChunks, msg: Any) -> None:
        real_add(self, msg)
        if sum(self._counts.values()) == 2:  # two chunks in: the connection goes down mid-result
            socket.socket.shutdown(s._channel.comm.sock, socket.SHUT_RDWR)  # under TLS: the link drops

    monkeypatch.setattr(frames_result.ResultChunks, "add", add)
    try:
        f = s.dataframe("rows_big")
        with pytest.raises(KernelConnectionError):
            f[f.a >= 0].collect()
        assert chunk_log[-1].added == 2
        assert not chunk_log[-1].buffers  # its mapping was unmapped and dropped at once
    finally:
        monkeypatch.undo()
        s.close()
    f = parties.owner.dataframe("rows_big")  # the kernel drained the worker's chunks and serves the next call
    assert len(f[f.a >= 0].collect()) == ROWS


@pytest.mark.slow
def test_the_analyst_gets_nothing_before_the_policy_saw_the_whole_result(
    parties: Parties, chunk_log: list[Any]
) -> None:
    f = parties.analyst.dataframe("rows_big")
    with pytest.raises(PolicyViolation):
        f[f.a >= 0].collect()  # rows of a dataset that does not allow them
    assert chunk_log and all(c.added == 0 for c in chunk_log)  # not one chunk left the kernel


@pytest.mark.slow
def test_the_analyst_rows_out_goes_through_the_guard_and_comes_in_chunks(
    parties: Parties, chunk_log: list[Any]
) -> None:
    f = parties.analyst.dataframe("rows_open")
    got = f[f.a >= 0].collect()
    pd.testing.assert_frame_equal(got, parties.data[parties.data.a >= 0])
    assert chunk_log[-1].added > 1
    entry = next(e for e in reversed(parties.analyst.audit()) if e["kind"] == "query")
    assert entry["details"]["outcome"] == "released" and "rows_open" in entry["details"]["datasets"]


@pytest.mark.slow
def test_calls_at_the_same_time_each_get_their_own_chunks(parties: Parties) -> None:
    other = mn.connect(parties.url, policy=parties.policy, identity=parties.root / "owner")
    out: dict[str, Any] = {}

    def run(name: str, sess: mn.Session) -> None:
        f = sess.dataframe("rows_big")
        out[name] = f[f.a < ROWS // 2].collect() if name == "half" else f[f.a >= 0].collect()

    try:
        t = threading.Thread(target=run, args=("half", other))
        t.start()
        run("all", parties.owner)
        t.join(120)
    finally:
        other.close()
    assert len(out["half"]) == ROWS // 2 and len(out["all"]) == ROWS


# -- the pieces on their own -------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(0, 300), max_size=8), chunk=st.integers(1, 257))
def test_split_parts_is_the_same_bytes_in_order(sizes: list[int], chunk: int) -> None:
    parts = [bytes((i * 31 + j) % 256 for j in range(n)) for i, n in enumerate(sizes)]
    chunks = list(split_parts(parts, chunk))
    assert b"".join(bytes(v) for c in chunks for v in c) == b"".join(parts)
    assert all(sum(v.nbytes for v in c) == chunk for c in chunks[:-1])
    assert all(c for c in chunks)


def test_chunk_buffer_refuses_overruns_and_incomplete_values() -> None:
    buf = ChunkBuffer(10)
    buf.take(6)[:] = b"abcdef"
    with pytest.raises(MalformedFrame, match="overrun"):
        buf.take(5)
    with pytest.raises(MalformedFrame, match="incomplete"):
        buf.done()
    buf.close()
    assert buf.closed
    with pytest.raises(MalformedFrame):
        ChunkBuffer(0)


def _chunk_header(name: str, index: int, size: int, n: int) -> dict[str, Any]:
    return {"t": "result.chunk", "name": name, "index": index, "size": size, "p": [n]}


def test_result_chunks_refuse_disorder_and_sizes_over_the_limit_before_allocating() -> None:
    rc = ResultChunks(limit=100)
    assert rc.hasher_for({"t": "progress", "p": []}) is None
    assert rc.hasher_for(_chunk_header("out/x", 0, 50, 25)) is not None
    with pytest.raises(MalformedFrame, match="out of order"):
        rc.hasher_for(_chunk_header("out/x", 2, 50, 25))
    with pytest.raises(MalformedFrame, match="different sizes"):
        rc.hasher_for(_chunk_header("out/x", 1, 60, 25))
    with pytest.raises(MalformedFrame, match="payload limit"):
        rc.hasher_for(_chunk_header("out/y", 0, 51, 25))
    assert set(rc.buffers) == {"out/x"}
    with pytest.raises(MalformedFrame, match="names 2 chunks"):
        rc.digests([{"name": "out/x", "kind": "arrow.frame", "chunks": 2}])
    rc.clear()
    assert not rc.buffers
