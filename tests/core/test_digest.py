"""Payload digests are BLAKE3 (wire/digest.py), both on the wire and in receipts; old SHA-256 receipts still read."""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import threading

import pytest

from mesatee_notebook.attestation.measurement import canonical_json
from mesatee_notebook.attestation.receipts import Receipt, build_receipt
from mesatee_notebook.wire.digest import PAYLOAD_DIGEST, digest_set, from_digest_set, payload_digest, payload_hasher
from mesatee_notebook.wire.framing import Limits
from mesatee_notebook.wire.stream import recv_message, send_message

# The BLAKE3 reference test vectors (github.com/BLAKE3-team/BLAKE3, test_vectors.json): input byte i = i % 251.
_VECTORS = {
    0: "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262",
    1: "2d3adedff11b61f14c886e35afa036736dcd87a74d27b5c1510225d0f592e213",
    1024: "42214739f095a406f3fc83deb889744ac00df831c10daa55189b5d121c855af7",
}


@pytest.mark.parametrize("n", sorted(_VECTORS))
def test_payload_digest_is_blake3_by_its_reference_vectors(n):
    data = bytes(i % 251 for i in range(n))
    assert payload_digest(data) == _VECTORS[n]
    h = payload_hasher()
    h.update(data[: n // 2])
    h.update(memoryview(data)[n // 2 :])
    assert h.hexdigest() == _VECTORS[n]
    assert payload_digest(data) != hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("size", [0, 1000, 3 << 20])  # inline, and on the helper thread (large)
def test_stream_digests_are_payload_digests_on_both_ends(size):
    payload = bytes(i % 253 for i in range(size))
    a, b = socket.socketpair()
    try:
        sent: list[list[str] | None] = []
        t = threading.Thread(target=lambda: sent.append(send_message(a, {"t": "x"}, [payload], digests=True)))
        t.start()
        msg = recv_message(b, Limits(), digests=True)
        t.join()
        assert msg.digests == sent[0] == [payload_digest(payload)]
    finally:
        a.close()
        b.close()


def _bundle(subject_digest: dict[str, str]) -> dict:
    statement = {
        "_type": "https://in-toto.io/Statement/v1",
        "subject": [{"name": "out", "digest": subject_digest}],
        "predicateType": "x",
        "predicate": {},
    }
    return {"dsseEnvelope": {"payload": base64.b64encode(canonical_json(statement)).decode()}}


def test_receipts_name_blake3_in_the_in_toto_digest_set():
    bundle = build_receipt(
        subjects={"out": payload_digest(b"v")},
        predicate={"finishedAt": 1.0},
        certificate_der=b"cert",
        sign=lambda _: b"sig",
        keyid="k",
    )
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    assert statement["subject"] == [{"name": "out", "digest": {"blake3": payload_digest(b"v")}}]
    assert Receipt(bundle).subjects == {"out": payload_digest(b"v")}
    assert Receipt(bundle).digest_algorithm == "blake3"
    assert PAYLOAD_DIGEST == "blake3" and digest_set("ab") == {"blake3": "ab"}


def test_a_receipt_made_before_blake3_still_reads_its_sha256_subjects():
    old = hashlib.sha256(b"v").hexdigest()
    assert Receipt(_bundle({"sha256": old})).subjects == {"out": old}
    assert Receipt(_bundle({"sha256": old})).digest_algorithm == "sha256"
    assert from_digest_set({"sha256": old, "blake3": "b3"}) == "b3"  # BLAKE3 wins when both are named
    assert from_digest_set({"md5": "x"}) is None


def test_a_live_receipt_names_blake3_digests_and_the_cli_says_so(kernel, tmp_path):
    import subprocess
    import sys

    import mesatee_notebook as mn

    s = mn.connect(kernel.url, policy=kernel.policy())
    try:
        blob = bytes(range(256)) * 4096
        r = s.run("out = len(b)\nprint('hi')", inputs={"b": blob}, outputs=["out"])
    finally:
        s.close()
    assert r.verified.predicate["inputs"] == {"b": payload_digest(blob)}  # the kernel hashed what the client sent
    assert r.receipt.subjects["stdout"] == payload_digest(b"hi\n")
    subjects = json.loads(base64.b64decode(r.receipt.bundle["dsseEnvelope"]["payload"]))["subject"]
    assert subjects and all(set(x["digest"]) == {"blake3"} for x in subjects)
    path = r.receipt.save(tmp_path / "receipt.json")
    out = subprocess.run(
        [sys.executable, "-m", "mesatee_notebook.cli", "client", "verify-receipt", str(path),
         "--platform-root", kernel.fingerprint, "--measurement", kernel.measurement],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert f"input  {'b':<20} blake3 {payload_digest(blob)}" in out.stdout
