"""Party identity proofs (pure: no I/O; both sides use it).

A party is an Ed25519 key pair; its id is the SHA-256 fingerprint (hex) of the raw 32-byte public key. On a verified
channel the party proves it holds the key by signing::

    PARTY_PROOF_DOMAIN | u16 len(nonce) | server nonce | SHA-256(server certificate DER) (32) | party public key (32)

The server nonce makes the proof fresh. The certificate hash binds it to this channel's attested server, so a
proof cannot be relayed to another kernel. The public key inside the message binds the proof to the claimed party.
A string nonce is signed as its UTF-8 bytes.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from mesatee_notebook.errors import MalformedFrame, PolicyViolation

__all__ = [
    "MIGRATION_GRANT_DOMAIN",
    "MAX_NONCE_BYTES",
    "MIN_NONCE_BYTES",
    "PARTY_PROOF_DOMAIN",
    "migration_grant",
    "migration_grant_message",
    "party_id_of",
    "proof_message",
    "verify_migration_grant",
    "verify_party_proof",
]

PARTY_PROOF_DOMAIN: Final = b"mesatee-notebook party-proof v1\x00"
MIGRATION_GRANT_DOMAIN: Final = b"mesatee-notebook migration-grant v1\x00"
MIN_NONCE_BYTES: Final = 16
MAX_NONCE_BYTES: Final = 256
_PUBLIC_KEY_BYTES: Final = 32
_SIGNATURE_BYTES: Final = 64
_SHA256_BYTES: Final = 32


def party_id_of(public_key_raw: bytes) -> str:
    """Return the party id: SHA-256 (hex) of the raw Ed25519 public key."""
    _check_len("party public key", public_key_raw, _PUBLIC_KEY_BYTES)
    return hashlib.sha256(public_key_raw).hexdigest()


def _check_len(what: str, value: bytes, expected: int) -> None:
    if not isinstance(value, (bytes, bytearray)) or len(value) != expected:
        got = len(value) if isinstance(value, (bytes, bytearray)) else type(value).__name__
        msg = f"{what} must be {expected} bytes, got {got}"
        raise MalformedFrame(msg)


def _nonce_bytes(server_nonce: bytes | str) -> bytes:
    nonce = server_nonce.encode() if isinstance(server_nonce, str) else bytes(server_nonce)
    if not MIN_NONCE_BYTES <= len(nonce) <= MAX_NONCE_BYTES:
        msg = f"the server nonce must be {MIN_NONCE_BYTES} to {MAX_NONCE_BYTES} bytes, got {len(nonce)}"
        raise MalformedFrame(msg)
    return nonce


def proof_message(server_nonce: bytes | str, server_cert_sha256: bytes, public_key_raw: bytes) -> bytes:
    """Return the domain-separated bytes a party signs to prove its key on this channel."""
    nonce = _nonce_bytes(server_nonce)
    _check_len("the server certificate hash", server_cert_sha256, _SHA256_BYTES)
    _check_len("party public key", public_key_raw, _PUBLIC_KEY_BYTES)
    return PARTY_PROOF_DOMAIN + struct.pack(">H", len(nonce)) + nonce + server_cert_sha256 + public_key_raw


def verify_party_proof(
    public_key_raw: bytes,
    server_nonce: bytes | str,
    server_cert_sha256: bytes,
    signature: bytes,
    *,
    expected_party_id: str | None = None,
) -> str:
    """Check a party's proof and return its party id.

    Raises ``PolicyViolation`` if the signature does not verify (wrong key, nonce or certificate: the message does
    not say which) or the key is not ``expected_party_id``; ``MalformedFrame`` for inputs of the wrong size.
    """
    message = proof_message(server_nonce, server_cert_sha256, public_key_raw)
    _check_len("party proof signature", signature, _SIGNATURE_BYTES)
    party_id = party_id_of(public_key_raw)
    if expected_party_id is not None and party_id != expected_party_id:
        msg = f"party proof refused: the key presented is party {party_id}, not {expected_party_id}"
        raise PolicyViolation(msg, party=party_id)
    try:
        Ed25519PublicKey.from_public_bytes(bytes(public_key_raw)).verify(bytes(signature), message)
    except (InvalidSignature, ValueError):
        msg = f"party proof refused for party {party_id}: the signature does not verify for this channel"
        raise PolicyViolation(msg, party=party_id) from None
    return party_id


_MEASUREMENT_RE: Final = re.compile(r"^[0-9a-f]{64}$")
_GRANT_FIELDS: Final = frozenset({"v", "party", "dataset", "from", "to", "rollback", "time"})


def migration_grant(
    party_id: str, dataset: str, from_measurement: str, to_measurement: str, *, rollback: bool, time: float
) -> dict[str, Any]:
    """The grant a data owner signs to move ``dataset`` (or ``"*"``: all its state) between two measurements.

    ``rollback=True`` is needed when the target is an older version than the source.
    """
    grant = {
        "v": 1,
        "party": party_id,
        "dataset": dataset,
        "from": from_measurement,
        "to": to_measurement,
        "rollback": bool(rollback),
        "time": float(time),
    }
    _check_grant(grant)
    return grant


def _check_grant(grant: Any) -> None:
    if not isinstance(grant, dict) or set(grant) != _GRANT_FIELDS or grant.get("v") != 1:
        msg = f"a migration grant is a map with exactly the fields {sorted(_GRANT_FIELDS)} and v = 1"
        raise MalformedFrame(msg)
    for key in ("from", "to", "party"):
        if not isinstance(grant[key], str) or not _MEASUREMENT_RE.match(grant[key]):
            msg = f"migration grant field {key!r} must be 64 lowercase hex digits"
            raise MalformedFrame(msg)
    if grant["from"] == grant["to"]:
        msg = "a migration grant must name two different measurements"
        raise MalformedFrame(msg)
    dataset = grant["dataset"]
    if not isinstance(dataset, str) or not (dataset == "*" or re.match(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$", dataset)):
        msg = "migration grant field 'dataset' must be a dataset name or '*'"
        raise MalformedFrame(msg)
    if not isinstance(grant["rollback"], bool) or not isinstance(grant["time"], (int, float)):
        msg = "migration grant fields 'rollback' (bool) and 'time' (number) have the wrong type"
        raise MalformedFrame(msg)


def migration_grant_message(grant: dict[str, Any]) -> bytes:
    """The domain-separated bytes an owner signs for a migration grant (canonical JSON of the grant)."""
    _check_grant(grant)
    return MIGRATION_GRANT_DOMAIN + json.dumps(grant, sort_keys=True, separators=(",", ":")).encode()


def verify_migration_grant(grant: Any, public_key_raw: bytes, signature: bytes) -> str:
    """Check an owner's signature over a migration grant; return the signer's party id.

    Raises ``PolicyViolation`` if the key is not the grant's party or the signature does not verify (a forged or
    altered grant), ``MalformedFrame`` for a grant or key of the wrong shape.
    """
    message = migration_grant_message(grant)
    _check_len("grant signature", signature, _SIGNATURE_BYTES)
    party_id = party_id_of(public_key_raw)
    if party_id != grant["party"]:
        msg = f"migration grant refused: it names party {grant['party'][:16]}… but is signed by {party_id[:16]}…"
        raise PolicyViolation(msg, party=party_id, check="grant-signature")
    try:
        Ed25519PublicKey.from_public_bytes(bytes(public_key_raw)).verify(bytes(signature), message)
    except (InvalidSignature, ValueError):
        msg = f"migration grant refused: the signature of party {party_id[:16]}… does not verify (forged or altered)"
        raise PolicyViolation(msg, party=party_id, check="grant-signature") from None
    return party_id
