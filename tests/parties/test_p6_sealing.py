"""Sealed storage: round trips, tamper/truncation/swap detection, crash safety under SIGKILL."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mesatee_notebook.enclave.sealing import SealedStore, validate_name
from mesatee_notebook.errors import NotFound, SealingError, TamperedData

SECRET = bytes(range(32))
MEASUREMENT = "ab" * 32
CHUNK = 1024
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def store(tmp_path: Path) -> SealedStore:
    return SealedStore(tmp_path / "sealed", SECRET, MEASUREMENT, chunk_size=CHUNK)


def blob(n: int, seed: int = 0) -> bytes:
    out = bytearray()
    i = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}:{i}".encode()).digest()
        i += 1
    return bytes(out[:n])


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 3 * CHUNK + 5])
def test_round_trip(store: SealedStore, size: int) -> None:
    data = blob(size, size)
    store.put("data/x", data)
    assert store.get("data/x") == data
    assert bytes(store.get_buffer("data/x")) == data
    assert b"".join(store.iter_chunks("data/x")) == data
    store.put("data/mv", memoryview(bytearray(data)))
    assert store.get("data/mv") == data


def test_streaming_writer_small_writes(store: SealedStore) -> None:
    data = blob(5 * CHUNK + 17, 9)
    with store.open_writer("stream") as w:
        for i in range(0, len(data), 100):
            w.write(data[i : i + 100])
    assert store.get("stream") == data
    with store.open_writer("stream2") as w:
        w.write(data[:10])
        w.write(memoryview(data)[10:])
    assert store.get("stream2") == data


def test_writer_exception_keeps_old_version(store: SealedStore) -> None:
    store.put("k", b"old")
    with pytest.raises(RuntimeError), store.open_writer("k") as w:
        w.write(b"new" * 1000)
        raise RuntimeError("boom")
    assert store.get("k") == b"old"
    assert [p.name for p in store.root.iterdir() if p.name.startswith(".tmp-")] == []


def test_permissions_list_exists_delete(store: SealedStore) -> None:
    store.put("a/b", b"1")
    store.put("c", b"2")
    assert stat.S_IMODE(store.root.stat().st_mode) == 0o700
    for p in store.root.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
        assert "a" not in p.name.split(".")[0] or len(p.name) == 37  # hashed, not the logical name
    assert store.list() == ["a/b", "c"]
    assert store.list("a/") == ["a/b"]
    assert store.exists("c") and not store.exists("d")
    store.delete("c")
    assert store.list() == ["a/b"]
    with pytest.raises(NotFound, match="no sealed blob named 'c'"):
        store.get("c")
    with pytest.raises(NotFound):
        store.delete("c")


@pytest.mark.parametrize(
    "name", ["", "../x", "/abs", "a//b", ".hidden", "a/../b", "a/./b", "a\\b", "a\x00b", "-x", "x" * 600, "a/"]
)
def test_bad_names_refused(store: SealedStore, name: str) -> None:
    with pytest.raises(SealingError, match="invalid sealed-storage name"):
        store.put(name, b"x")
    with pytest.raises(SealingError):
        validate_name(name)


def test_key_bound_to_measurement_and_secret(tmp_path: Path) -> None:
    root = tmp_path / "s"
    SealedStore(root, SECRET, MEASUREMENT).put("k", b"secret")
    with pytest.raises(TamperedData, match="failed authentication"):
        SealedStore(root, SECRET, "cd" * 32).list()
    other = SealedStore(root, bytes(32), MEASUREMENT)
    with pytest.raises(TamperedData):
        other.list()
    with pytest.raises(SealingError, match="at least 32 bytes"):
        SealedStore(root, b"short", MEASUREMENT)


def _file(store: SealedStore, name: str) -> Path:
    return store.path_for(name)


def test_every_flipped_byte_detected(store: SealedStore) -> None:
    data = blob(2 * CHUNK + 10, 3)
    store.put("f", data)
    path = _file(store, "f")
    original = path.read_bytes()
    for pos in list(range(0, 120)) + list(range(120, len(original), 37)) + [len(original) - 1]:
        damaged = bytearray(original)
        damaged[pos] ^= 0x01
        path.write_bytes(bytes(damaged))
        with pytest.raises(TamperedData, match=path.name):
            store.get("f")
    path.write_bytes(original)
    assert store.get("f") == data


def test_every_truncation_detected(store: SealedStore) -> None:
    data = blob(2 * CHUNK + 10, 4)
    store.put("t", data)
    path = _file(store, "t")
    original = path.read_bytes()
    cuts = list(range(0, 100)) + list(range(100, len(original), 13)) + [len(original) - 1]
    for cut in cuts:
        path.write_bytes(original[:cut])
        with pytest.raises(TamperedData, match=r"truncated|failed authentication"):
            store.get("t")
    path.write_bytes(original + b"\x00")
    with pytest.raises(TamperedData, match="trailing bytes"):
        store.get("t")


def test_swapped_file_detected(store: SealedStore) -> None:
    store.put("alice/data", b"alice's rows")
    store.put("bob/data", b"bob's rows")
    shutil.copyfile(_file(store, "alice/data"), _file(store, "bob/data"))
    with pytest.raises(TamperedData, match=r"holds 'alice/data' instead \(swapped\)"):
        store.get("bob/data")
    with pytest.raises(TamperedData, match="swapped"):
        store.list()


def _records(raw: bytes, chunk: int) -> tuple[bytes, list[bytes]]:
    """Split a sealed file into its prefix (header + name record) and chunk records."""
    header = 32
    name_len = int.from_bytes(raw[header : header + 2], "big")
    prefix_end = header + 2 + name_len
    records = []
    pos = prefix_end
    while pos < len(raw):
        length = int.from_bytes(raw[pos + 1 : pos + 5], "big")
        end = pos + 17 + length + 16
        records.append(raw[pos:end])
        pos = end
    assert all(len(r) == 17 + chunk + 16 for r in records[:-1])
    return raw[:prefix_end], records


def test_reordered_dropped_and_spliced_chunks_detected(store: SealedStore) -> None:
    data = blob(4 * CHUNK + 3, 5)
    store.put("c", data)
    path = _file(store, "c")
    original = path.read_bytes()
    prefix, recs = _records(original, CHUNK)
    assert len(recs) == 5
    variants = {
        "reordered": prefix + recs[1] + recs[0] + b"".join(recs[2:]),
        "dropped middle": prefix + recs[0] + b"".join(recs[2:]),
        "dropped final": prefix + b"".join(recs[:-1]),
    }
    store.put("c", blob(4 * CHUNK + 3, 6))  # a newer version of the same name
    _, new_recs = _records(path.read_bytes(), CHUNK)
    variants["spliced from another version"] = prefix + recs[0] + new_recs[1] + b"".join(recs[2:])
    for label, raw in variants.items():
        path.write_bytes(raw)
        with pytest.raises(TamperedData):
            store.get("c")
        assert label
    path.write_bytes(original)
    assert store.get("c") == data


_CHILD = r"""
import hashlib, sys
from pathlib import Path
from mesatee_notebook.enclave.sealing import SealedStore
root, secret, measurement = Path(sys.argv[1]), bytes.fromhex(sys.argv[2]), sys.argv[3]
store = SealedStore(root, secret, measurement, chunk_size=1 << 20)
size = 24 << 20
i = 0
while True:
    data = hashlib.sha256(str(i).encode()).digest() * (size // 32)
    with store.open_writer("big") as w:
        w.write(memoryview(data)[: size // 2])
        print("mid", i, flush=True)
        w.write(memoryview(data)[size // 2 :])
    print("done", i, flush=True)
    i += 1
"""


def _version_digest(i: int) -> str:
    return hashlib.sha256(hashlib.sha256(str(i).encode()).digest() * ((24 << 20) // 32)).hexdigest()


@pytest.mark.slow
@pytest.mark.parametrize("when", ["random", "mid-write"])
def test_sigkill_during_sealed_write_leaves_consistent_store(tmp_path: Path, when: str) -> None:
    root = tmp_path / "crash"
    store = SealedStore(root, SECRET, MEASUREMENT)
    earlier = {f"earlier/{i}": blob(100_000 + i, i) for i in range(3)}
    for name, data in earlier.items():
        store.put(name, data)
    digests = {name: hashlib.sha256(d).hexdigest() for name, d in earlier.items()}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for round_ in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(root), SECRET.hex(), MEASUREMENT], stdout=subprocess.PIPE, env=env
        )
        assert proc.stdout is not None
        completed = -1
        while completed < 0:  # wait for one complete write in this round
            kind, i = proc.stdout.readline().split()
            completed = int(i) if kind == b"done" else completed
        if when == "mid-write":
            while proc.stdout.readline().split()[0] != b"mid":
                pass
        else:
            time.sleep(0.01 + 0.04 * round_)
        proc.send_signal(signal.SIGKILL)
        lines = [line.split() for line in proc.stdout.read().splitlines()]
        proc.wait()
        proc.stdout.close()
        assert proc.returncode == -signal.SIGKILL
        completed = max([completed] + [int(i) for kind, i in lines if kind == b"done"])
        leftovers = [p for p in root.iterdir() if p.name.startswith(".tmp-")]
        if when == "mid-write":
            assert leftovers, "the kill was meant to land while a temp file was half written"
        reopened = SealedStore(root, SECRET, MEASUREMENT)
        for name, digest in digests.items():
            assert hashlib.sha256(reopened.get(name)).hexdigest() == digest
        got = hashlib.sha256(reopened.get("big")).hexdigest()
        # A complete version: the last one reported done, or the next if its rename landed just before the kill.
        assert got in {_version_digest(completed), _version_digest(completed + 1)}
        assert reopened.list() == sorted([*earlier, "big"])
        assert not any(p.name.startswith(".tmp-") for p in root.iterdir()), "stale temp file of a dead writer left"
