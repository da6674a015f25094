"""Party identity: key files on disk, proofs bound to nonce, certificate and key."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from mesatee_notebook.attestation.party_proof import party_id_of, proof_message, verify_party_proof
from mesatee_notebook.errors import MalformedFrame, PolicyViolation
from mesatee_notebook.remote.party_key import KEY_FILE_NAME, PartyIdentity

NONCE = os.urandom(32)
CERT = hashlib.sha256(b"server certificate DER").digest()


def test_created_on_first_use_with_private_permissions(tmp_path: Path) -> None:
    d = tmp_path / "cfg" / "identity"
    me = PartyIdentity.load_or_create(d)
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert stat.S_IMODE((d / KEY_FILE_NAME).stat().st_mode) == 0o600
    assert (d / KEY_FILE_NAME).read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    again = PartyIdentity.load_or_create(d)
    assert again.party_id == me.party_id == hashlib.sha256(me.public_key_raw).hexdigest()
    assert len(me.party_id) == 64
    assert sorted(p.name for p in d.iterdir()) == [KEY_FILE_NAME]


def test_default_dir_follows_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    me = PartyIdentity.load_or_create()
    assert me.path == tmp_path / "mesatee_notebook" / "identity" / KEY_FILE_NAME


def test_loose_permissions_refused(tmp_path: Path) -> None:
    d = tmp_path / "id"
    PartyIdentity.load_or_create(d)
    (d / KEY_FILE_NAME).chmod(0o644)
    with pytest.raises(PolicyViolation, match=r"accessible to other users .*chmod 600"):
        PartyIdentity.load_or_create(d)
    (d / KEY_FILE_NAME).chmod(0o600)
    d.chmod(0o755)
    with pytest.raises(PolicyViolation, match="chmod 700"):
        PartyIdentity.load_or_create(d)


def test_proof_verifies() -> None:
    me = PartyIdentity.generate()
    sig = me.prove(NONCE, CERT)
    assert verify_party_proof(me.public_key_raw, NONCE, CERT, sig) == me.party_id
    assert verify_party_proof(me.public_key_raw, NONCE, CERT, sig, expected_party_id=me.party_id) == me.party_id
    hex_nonce = NONCE.hex()
    assert verify_party_proof(me.public_key_raw, hex_nonce, CERT, me.prove(hex_nonce, CERT)) == me.party_id


def test_wrong_nonce_cert_or_key_refused() -> None:
    me, other = PartyIdentity.generate(), PartyIdentity.generate()
    sig = me.prove(NONCE, CERT)
    cases = [
        (me.public_key_raw, os.urandom(32), CERT),  # replayed on a new challenge
        (me.public_key_raw, NONCE, hashlib.sha256(b"another server").digest()),  # relayed to another kernel
        (other.public_key_raw, NONCE, CERT),  # claimed under someone else's key
    ]
    for key, nonce, cert in cases:
        with pytest.raises(PolicyViolation, match="signature does not verify"):
            verify_party_proof(key, nonce, cert, sig)
    with pytest.raises(PolicyViolation, match="not " + other.party_id):
        verify_party_proof(me.public_key_raw, NONCE, CERT, sig, expected_party_id=other.party_id)
    flipped = bytes([sig[0] ^ 1]) + sig[1:]
    with pytest.raises(PolicyViolation):
        verify_party_proof(me.public_key_raw, NONCE, CERT, flipped)


def test_malformed_inputs() -> None:
    me = PartyIdentity.generate()
    sig = me.prove(NONCE, CERT)
    with pytest.raises(MalformedFrame, match="nonce"):
        me.prove(b"short", CERT)
    with pytest.raises(MalformedFrame, match="certificate hash"):
        me.prove(NONCE, CERT[:31])
    with pytest.raises(MalformedFrame, match="signature"):
        verify_party_proof(me.public_key_raw, NONCE, CERT, sig[:63])
    with pytest.raises(MalformedFrame, match="public key"):
        party_id_of(b"\x00" * 31)


def test_message_is_domain_separated_and_binds_everything() -> None:
    me = PartyIdentity.generate()
    msg = proof_message(NONCE, CERT, me.public_key_raw)
    assert msg.startswith(b"mesatee-notebook party-proof v1\x00")
    assert NONCE in msg and CERT in msg and msg.endswith(me.public_key_raw)
    # Length-prefixed nonce: moving bytes between nonce and certificate hash changes the message.
    assert proof_message(NONCE + CERT[:1], CERT[1:] + b"\x00", me.public_key_raw) != msg
