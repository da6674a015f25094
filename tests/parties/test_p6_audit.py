"""Audit log: signed hash chain, offline verification, tamper detection, per-party views, crash recovery."""

from __future__ import annotations

import datetime as dt
import json
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from mesatee_notebook.attestation.audit_verify import AuditHead, entry_hash, verify_audit_log
from mesatee_notebook.enclave.audit import AuditLog
from mesatee_notebook.enclave.sealing import SealedStore
from mesatee_notebook.errors import EncodingError, TamperedData

ALICE, BOB, CAROL = "a" * 64, "b" * 64, "c" * 64


def fixed_clock() -> dt.datetime:
    return dt.datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=dt.UTC)


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def fill(log: AuditLog) -> None:
    log.append("job", ALICE, {"job_id": "j1", "event": "created"}, concerns=[BOB])
    log.append("upload", ALICE, {"job_id": "j1", "digest": "00" * 32})
    log.append("upload", BOB, {"job_id": "j1", "digest": "11" * 32})
    log.append("approval", BOB, {"job_id": "j1"}, concerns=[ALICE])
    log.append("refusal", CAROL, {"job_id": "j1", "reason": "not a party"})
    log.append("release", ALICE, {"job_id": "j1"}, concerns=[BOB])


@pytest.fixture
def entries(tmp_path: Path, key: Ed25519PrivateKey) -> list[dict[str, Any]]:
    with AuditLog(tmp_path / "audit.jsonl", key, clock=fixed_clock) as log:
        fill(log)
        return log.entries()


def test_verifies_and_returns_head(entries: list[dict[str, Any]], key: Ed25519PrivateKey) -> None:
    head = verify_audit_log(entries, key.public_key())
    assert head == AuditHead(5, entry_hash(entries[-1]))
    raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert verify_audit_log(entries, raw) == head
    assert [e["seq"] for e in entries] == list(range(6))
    assert entries[0]["time"] == "2026-01-02T03:04:05.678901Z"
    assert verify_audit_log([], raw) is None


def test_changed_entry_detected(entries: list[dict[str, Any]], key: Ed25519PrivateKey) -> None:
    changed = [dict(e) for e in entries]
    changed[2] = {**changed[2], "details": {"job_id": "j1", "digest": "22" * 32}}
    with pytest.raises(TamperedData, match=r"audit log entry 2 \(seq 2\): signature does not verify") as info:
        verify_audit_log(changed, key.public_key())
    assert info.value.details["entry"] == 2


def test_removed_entry_detected(entries: list[dict[str, Any]], key: Ed25519PrivateKey) -> None:
    with pytest.raises(TamperedData, match=r"entry 2 \(seq 3\): seq 3 follows seq 1: entries removed"):
        verify_audit_log(entries[:2] + entries[3:], key.public_key())
    with pytest.raises(TamperedData, match="does not start at seq 0"):
        verify_audit_log(entries[1:], key.public_key())


def test_reordered_entries_detected(entries: list[dict[str, Any]], key: Ed25519PrivateKey) -> None:
    swapped = [*entries[:2], entries[3], entries[2], *entries[4:]]
    with pytest.raises(TamperedData, match=r"entry 2 \(seq 3\)"):
        verify_audit_log(swapped, key.public_key())


def test_renumbered_entries_detected(entries: list[dict[str, Any]], key: Ed25519PrivateKey) -> None:
    renumbered = [dict(e) for e in entries[:2] + entries[3:]]
    for i, e in enumerate(renumbered):
        e["seq"] = i  # hide the gap: breaks the signatures
    with pytest.raises(TamperedData, match=r"entry 2 .*signature"):
        verify_audit_log(renumbered, key.public_key())


def test_cut_tail_needs_a_known_head(entries: list[dict[str, Any]], key: Ed25519PrivateKey) -> None:
    head = verify_audit_log(entries, key.public_key())
    assert head is not None
    assert verify_audit_log(entries[:-1], key.public_key()) is not None  # undetectable alone
    with pytest.raises(TamperedData, match="before the expected head"):
        verify_audit_log(entries[:-1], key.public_key(), expected_head=head)
    older = verify_audit_log(entries[:3], key.public_key())
    assert verify_audit_log(entries, key.public_key(), expected_head=older) == head
    with pytest.raises(TamperedData, match="expected head"):
        verify_audit_log(entries, key.public_key(), expected_head=AuditHead(2, "f" * 64))


def test_other_enclave_key_refused(entries: list[dict[str, Any]]) -> None:
    with pytest.raises(TamperedData, match=r"entry 0 \(seq 0\): signature"):
        verify_audit_log(entries, Ed25519PrivateKey.generate().public_key())


def test_malformed_entry_refused(entries: list[dict[str, Any]], key: Ed25519PrivateKey) -> None:
    bad = [dict(e) for e in entries]
    bad[1]["extra"] = 1
    with pytest.raises(TamperedData, match=r"entry 1 .*unknown fields"):
        verify_audit_log(bad, key.public_key())


def test_visible_to_and_partial_verification(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    with AuditLog(tmp_path / "audit.jsonl", key) as log:
        fill(log)
        bob_view = log.visible_to(BOB)
        carol_view = log.visible_to(CAROL)
    assert [e["seq"] for e in bob_view] == [0, 2, 3, 5]
    assert [e["seq"] for e in carol_view] == [4]
    verify_audit_log(bob_view, key.public_key(), partial=True)
    with pytest.raises(TamperedData, match="entries removed"):
        verify_audit_log(bob_view, key.public_key())
    tampered = [dict(e) for e in bob_view]
    tampered[1]["party"] = CAROL
    with pytest.raises(TamperedData, match=r"entry 1 \(seq 2\)"):
        verify_audit_log(tampered, key.public_key(), partial=True)
    with pytest.raises(TamperedData, match="does not follow"):
        verify_audit_log(list(reversed(bob_view)), key.public_key(), partial=True)


def test_file_is_private_and_reopen_continues_chain(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, key) as log:
        fill(log)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with AuditLog(path, key) as log:
        log.append("query", ALICE, {"rows": 3})
        all_entries = log.entries()
    assert len(all_entries) == 7
    verify_audit_log(all_entries, key.public_key())
    assert len(path.read_bytes().splitlines()) == 7


def test_tampered_file_refused_on_open(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, key) as log:
        fill(log)
    lines = path.read_bytes().splitlines(keepends=True)
    entry = json.loads(lines[3])
    entry["details"]["job_id"] = "j2"
    lines[3] = json.dumps(entry).encode() + b"\n"
    path.write_bytes(b"".join(lines))
    with pytest.raises(TamperedData, match="entry 3"):
        AuditLog(path, key)
    path.write_bytes(b"".join(lines[:3]) + b"not json\n")
    with pytest.raises(TamperedData, match="not valid JSON"):
        AuditLog(path, key)


def test_torn_last_line_is_recovered_and_recorded(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, key) as log:
        fill(log)
    with path.open("ab") as fh:
        fh.write(b'{"v":1,"seq":6,"ti')  # a crash in the middle of an append
    with AuditLog(path, key) as log:
        entries = log.entries()
    assert entries[-1]["kind"] == "recovery"
    assert entries[-1]["details"]["dropped_bytes"] == 18
    verify_audit_log(entries, key.public_key())


def test_sealed_head_catches_cut_tail(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    path = tmp_path / "audit.jsonl"
    heads = SealedStore(tmp_path / "sealed", bytes(32), "ab" * 32)
    with AuditLog(path, key, head_store=heads) as log:
        fill(log)
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-1]))
    with pytest.raises(TamperedData, match="before the expected head"):
        AuditLog(path, key, head_store=heads)
    path.unlink()
    with pytest.raises(TamperedData, match="log is empty"):
        AuditLog(path, key, head_store=heads)


def test_append_refuses_unknown_kind_and_non_json(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    with AuditLog(tmp_path / "audit.jsonl", key) as log:
        with pytest.raises(EncodingError, match="unknown audit entry kind"):
            log.append("gossip", ALICE)
        with pytest.raises(EncodingError, match="plain JSON"):
            log.append("query", ALICE, {"value": object()})
        with pytest.raises(EncodingError, match="plain JSON"):
            log.append("query", ALICE, {"value": float("nan")})
        assert log.entries() == []
