"""Offline verification of the enclave's audit log (pure: no I/O, usable by clients).

Each entry is a JSON object::

    {"v": 1, "seq": 0, "time": "2026-01-01T00:00:00.000000Z", "kind": "job", "party": "<id>" | null,
     "concerns": ["<party id>", ...], "details": {...}, "prev": "<hex sha256>", "sig": "<base64 ed25519>"}

- ``sig`` is the enclave's Ed25519 signature over ``SIGNING_DOMAIN + canonical_json(entry without "sig")``.
- ``prev`` is :func:`entry_hash` of the previous entry (``GENESIS`` for ``seq`` 0), which chains the log:
  changing, removing or reordering an entry breaks either a signature or a link.
- Removing entries from the *end* leaves a valid shorter log; pass ``expected_head`` (a head obtained earlier,
  e.g. from a receipt) to catch that.

A party may hold only the entries that concern it (``partial=True``): each signature is still checked, ``seq`` must
increase, and links are checked wherever two consecutive ``seq`` numbers are both present.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from mesatee_notebook.errors import TamperedData

__all__ = [
    "AUDIT_FORMAT_VERSION",
    "AUDIT_KINDS",
    "ALL_PARTIES",
    "GENESIS",
    "SIGNING_DOMAIN",
    "AuditHead",
    "canonical_json",
    "entry_concerns",
    "entry_hash",
    "signing_payload",
    "verify_audit_log",
]

AUDIT_FORMAT_VERSION: Final = 1
GENESIS: Final = "0" * 64
SIGNING_DOMAIN: Final = b"mesatee-notebook audit-entry v1\x00"
ALL_PARTIES: Final = "*"
AUDIT_KINDS: Final = frozenset(
    {
        "job",
        "approval",
        "upload",
        "query",
        "refusal",
        "release",
        "cancel",
        "result",
        "recovery",
        "startup",
        "grant",
        "migration",
        "function",
        "key",
    }
)
_FIELDS: Final = frozenset({"v", "seq", "time", "kind", "party", "concerns", "details", "prev", "sig"})


@dataclass(frozen=True)
class AuditHead:
    """The last entry of a verified log: its ``seq`` and :func:`entry_hash` (pin it to detect a cut tail)."""

    seq: int
    hash: str


def canonical_json(value: Any) -> bytes:
    """Serialise to the one canonical byte form used for signing and hashing (sorted keys, no spaces, UTF-8)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def signing_payload(entry: Mapping[str, Any]) -> bytes:
    """Return the bytes the enclave signs for ``entry`` (domain-separated, without ``sig``)."""
    body = {k: v for k, v in entry.items() if k != "sig"}
    return SIGNING_DOMAIN + canonical_json(body)


def entry_hash(entry: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the canonical form of the whole entry, signature included."""
    return hashlib.sha256(canonical_json(dict(entry))).hexdigest()


def entry_concerns(entry: Mapping[str, Any], party_id: str) -> bool:
    """Return whether ``entry`` concerns ``party_id`` (its actor, a listed party, or everyone)."""
    concerns = entry.get("concerns") or ()
    return entry.get("party") == party_id or party_id in concerns or ALL_PARTIES in concerns


def _fail(index: int, entry: Mapping[str, Any] | None, reason: str) -> TamperedData:
    seq = entry.get("seq") if isinstance(entry, Mapping) else None
    where = f"audit log entry {index}" + (f" (seq {seq})" if isinstance(seq, int) else "")
    return TamperedData(f"{where}: {reason}", entry=index, seq=seq if isinstance(seq, int) else -1, reason=reason)


def _check_shape(index: int, entry: Mapping[str, Any]) -> None:
    if not isinstance(entry, Mapping):
        raise _fail(index, None, "is not a JSON object")
    missing = _FIELDS - entry.keys()
    extra = entry.keys() - _FIELDS
    if missing or extra:
        raise _fail(index, entry, f"has missing fields {sorted(missing)} or unknown fields {sorted(extra)}")
    if entry["v"] != AUDIT_FORMAT_VERSION:
        raise _fail(index, entry, f"has unsupported format version {entry['v']!r}")
    seq = entry["seq"]
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise _fail(index, entry, "has an invalid seq")
    if not isinstance(entry["kind"], str) or not isinstance(entry["time"], str):
        raise _fail(index, entry, "has an invalid kind or time")
    if entry["party"] is not None and not isinstance(entry["party"], str):
        raise _fail(index, entry, "has an invalid party")
    if not isinstance(entry["concerns"], list) or not all(isinstance(c, str) for c in entry["concerns"]):
        raise _fail(index, entry, "has an invalid concerns list")
    if not isinstance(entry["details"], dict):
        raise _fail(index, entry, "has details that are not an object")
    if not isinstance(entry["prev"], str) or len(entry["prev"]) != 64:
        raise _fail(index, entry, "has an invalid prev hash")


def _public_key(public_key: Ed25519PublicKey | bytes) -> Ed25519PublicKey:
    if isinstance(public_key, Ed25519PublicKey):
        return public_key
    return Ed25519PublicKey.from_public_bytes(bytes(public_key))


def verify_audit_log(
    entries: Sequence[Mapping[str, Any]],
    public_key: Ed25519PublicKey | bytes,
    *,
    partial: bool = False,
    expected_head: AuditHead | None = None,
) -> AuditHead | None:
    """Verify signatures and the hash chain; return the head, or ``None`` for an empty log.

    Raises ``TamperedData`` naming the first bad entry (``details["entry"]`` is its index in ``entries``).
    ``partial=True`` accepts a filtered view (gaps in ``seq`` allowed, see the module docstring).
    """
    key = _public_key(public_key)
    prev: Mapping[str, Any] | None = None
    for index, entry in enumerate(entries):
        _check_shape(index, entry)
        try:
            sig = base64.b64decode(str(entry["sig"]), validate=True)
            key.verify(sig, signing_payload(entry))
        except (InvalidSignature, binascii.Error, ValueError):
            raise _fail(
                index, entry, "signature does not verify (entry changed, or not signed by this enclave)"
            ) from None
        _check_link(index, entry, prev, partial)
        prev = entry
    if prev is None:
        if expected_head is not None:
            raise _fail(0, None, f"log is empty but the expected head is seq {expected_head.seq}: entries removed")
        return None
    head = AuditHead(int(prev["seq"]), entry_hash(prev))
    if expected_head is not None:
        _check_expected_head(entries, prev, head, expected_head)
    return head


def _check_link(index: int, entry: Mapping[str, Any], prev: Mapping[str, Any] | None, partial: bool) -> None:
    """``entry`` follows ``prev`` in the hash chain (or starts it)."""
    seq = int(entry["seq"])
    if prev is None:
        if not partial and seq != 0:
            raise _fail(index, entry, f"log does not start at seq 0 (starts at {seq}): entries removed")
        if seq == 0 and entry["prev"] != GENESIS:
            raise _fail(index, entry, "first entry does not link to the genesis hash")
        return
    prev_seq = int(prev["seq"])
    if seq <= prev_seq:
        raise _fail(index, entry, f"seq {seq} does not follow seq {prev_seq}: entries reordered or repeated")
    if seq != prev_seq + 1 and not partial:
        raise _fail(index, entry, f"seq {seq} follows seq {prev_seq}: entries removed")
    if seq == prev_seq + 1 and entry["prev"] != entry_hash(prev):
        raise _fail(index, entry, f"does not link to the entry with seq {prev_seq}: log changed or reordered")


def _check_expected_head(
    entries: Sequence[Mapping[str, Any]], last: Mapping[str, Any], head: AuditHead, expected_head: AuditHead
) -> None:
    if head.seq < expected_head.seq:
        raise _fail(
            len(entries) - 1, last, f"log ends at seq {head.seq} before the expected head seq {expected_head.seq}"
        )
    if head.seq == expected_head.seq and head.hash != expected_head.hash:
        raise _fail(len(entries) - 1, last, "last entry does not match the expected head")
    for index, entry in enumerate(entries):
        if entry["seq"] == expected_head.seq and entry_hash(entry) != expected_head.hash:
            raise _fail(index, entry, "does not match the expected head (log rewritten)")
