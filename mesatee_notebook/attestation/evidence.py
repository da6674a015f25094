r"""softtee and unprotected evidence: a signed statement carried in an RA-TLS certificate (pure).

The evidence is CBOR ``tag(SOFTTEE_TAG, [statement, signature, platform_key])``:

* ``statement``: canonical JSON with ``format``, ``level``, ``measurement``, ``manifest``,
  ``time`` (Unix seconds), ``report_data`` and the ``receipt_key``;
* ``signature``: Ed25519 by the platform key over ``b"mesatee-softtee-evidence/1\\0" + statement``;
* ``platform_key``: the raw Ed25519 public key; the client's policy pins its fingerprint.

``report_data = SHA-256(TLS SubjectPublicKeyInfo DER || receipt public key)`` binds the
evidence to the TLS key that ends the channel and to the key that signs receipts.
It rides in the TCG DICE tagged-evidence extension (OID 2.23.133.5.4.9); the CBOR tag
number is this project's own content type (``SOFTTEE_TAG``), distinct from tag 60000
used by interoperable RA-TLS for SGX quotes.

softtee is *software* trust: the host operator can read the kernel's memory.
TPM evidence (``attestation/tpm.py``) travels in the same extension under its own CBOR tag.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from typing import Any

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from mesatee_notebook.attestation.hw_evidence import HW_TAG, HwEvidence, parse_hw_evidence
from mesatee_notebook.attestation.levels import Level
from mesatee_notebook.attestation.measurement import canonical_json, measurement_of
from mesatee_notebook.attestation.statement import parse_statement
from mesatee_notebook.attestation.tpm import TPM_TAG, TpmEvidence, parse_tpm_evidence
from mesatee_notebook.errors import EvidenceSignatureError, MalformedEvidence

__all__ = [
    "EVIDENCE_FORMAT",
    "SIGNING_CONTEXT",
    "SOFTTEE_TAG",
    "TCG_TAGGED_EVIDENCE_OID",
    "SoftteeEvidence",
    "fingerprint",
    "make_evidence",
    "parse_evidence",
    "report_data_for",
]

TCG_TAGGED_EVIDENCE_OID = "2.23.133.5.4.9"
SOFTTEE_TAG = 0x4D544545  # "MTEE": project-private CBOR content type for softtee evidence
EVIDENCE_FORMAT = "mesatee-softtee/1"
SIGNING_CONTEXT = b"mesatee-softtee-evidence/1\x00"


def fingerprint(raw_public_key: bytes) -> str:
    """Platform or party fingerprint: SHA-256 hex of the raw public key."""
    return hashlib.sha256(raw_public_key).hexdigest()


def report_data_for(tls_spki_der: bytes, receipt_key: bytes) -> str:
    """The key binding: SHA-256(TLS SPKI DER || receipt public key), hex."""
    return hashlib.sha256(tls_spki_der + receipt_key).hexdigest()


@dataclass(frozen=True, slots=True)
class SoftteeEvidence:
    """Parsed (not yet trusted) softtee/unprotected evidence."""

    statement: dict[str, Any]
    statement_bytes: bytes
    signature: bytes
    platform_key: bytes
    raw: bytes

    @property
    def level(self) -> Level:
        """The level the statement claims."""
        return Level.parse(str(self.statement["level"]))

    @property
    def receipt_key(self) -> bytes:
        """Raw Ed25519 public key that signs receipts."""
        return bytes.fromhex(str(self.statement["receipt_key"]))

    def verify_signature(self) -> None:
        """Check the platform signature over the statement (softtee only)."""
        try:
            Ed25519PublicKey.from_public_bytes(self.platform_key).verify(
                self.signature, SIGNING_CONTEXT + self.statement_bytes
            )
        except (InvalidSignature, ValueError) as exc:
            msg = "the platform signature over the softtee evidence does not verify: the evidence was altered"
            raise EvidenceSignatureError(msg) from exc

    def check_manifest(self) -> None:
        """The measurement must be the digest of the manifest that travels with it."""
        if measurement_of(self.statement["manifest"]) != self.statement["measurement"]:
            msg = "the evidence's measurement is not the digest of its manifest"
            raise MalformedEvidence(msg)


def make_evidence(
    *,
    level: Level,
    manifest: dict[str, Any],
    tls_spki_der: bytes,
    receipt_key: bytes,
    time: int,
    platform_key: Ed25519PrivateKey | None,
    sandbox: dict[str, Any] | None = None,
) -> bytes:
    """Build the CBOR evidence; ``platform_key`` is None only for ``unprotected``.

    ``sandbox`` is the kernel's runtime sandbox report (None: it runs cells unsandboxed).
    """
    if level not in (Level.SOFTTEE, Level.UNPROTECTED):
        msg = f"software evidence cannot claim level {level.label}"
        raise ValueError(msg)
    if (platform_key is None) != (level is Level.UNPROTECTED):
        msg = "softtee evidence needs a platform key; unprotected evidence must have none"
        raise ValueError(msg)
    statement = {
        "format": EVIDENCE_FORMAT,
        "level": level.label,
        "measurement": measurement_of(manifest),
        "manifest": manifest,
        "time": int(time),
        "report_data": report_data_for(tls_spki_der, receipt_key),
        "receipt_key": receipt_key.hex(),
        "sandbox": sandbox if sandbox is not None else {"active": False, "why": "--no-sandbox"},
    }
    body = canonical_json(statement)
    if platform_key is None:
        sig, pub = b"", b""
    else:
        sig = platform_key.sign(SIGNING_CONTEXT + body)
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        pub = platform_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return bytes(cbor2.dumps(cbor2.CBORTag(SOFTTEE_TAG, [body, sig, pub])))


_REQUIRED: dict[str, type] = {
    "format": str,
    "level": str,
    "measurement": str,
    "manifest": dict,
    "time": int,
    "report_data": str,
    "receipt_key": str,
}


def parse_evidence(raw: bytes) -> SoftteeEvidence | TpmEvidence | HwEvidence:
    """Parse evidence bytes (softtee/unprotected, TPM, SEV-SNP/TDX); raise MalformedEvidence on anything unexpected.

    The same bytes parse to the same (frozen, not yet trusted) object: a connect parses its evidence several times
    (certificate check, hello, activation cache), so the last few parses are kept. Failures are not cached.
    """
    return _parse_cached(bytes(raw))


@functools.lru_cache(maxsize=16)
def _parse_cached(raw: bytes) -> SoftteeEvidence | TpmEvidence | HwEvidence:
    try:
        tagged = cbor2.loads(raw)
    except Exception as exc:  # cbor2 raises several types on garbage
        msg = f"evidence is not valid CBOR: {type(exc).__name__}"
        raise MalformedEvidence(msg) from exc
    if isinstance(tagged, cbor2.CBORTag) and tagged.tag == TPM_TAG:
        return parse_tpm_evidence(raw, tagged.value)
    if isinstance(tagged, cbor2.CBORTag) and tagged.tag == HW_TAG:
        return parse_hw_evidence(raw, tagged.value)
    if not isinstance(tagged, cbor2.CBORTag) or tagged.tag != SOFTTEE_TAG:
        msg = "evidence is neither mesatee softtee, TPM nor hardware (SEV-SNP/TDX) evidence (unexpected CBOR tag)"
        raise MalformedEvidence(msg)
    value = tagged.value
    if not (isinstance(value, (list, tuple)) and len(value) == 3 and all(isinstance(v, bytes) for v in value)):
        msg = "softtee evidence must be [statement, signature, platform_key] byte strings"
        raise MalformedEvidence(msg)
    body, sig, pub = value
    statement = parse_statement(body, _REQUIRED, EVIDENCE_FORMAT, "softtee")
    try:
        Level.parse(statement["level"])
        bytes.fromhex(statement["receipt_key"])
    except ValueError as exc:
        raise MalformedEvidence(str(exc)) from exc
    return SoftteeEvidence(statement, body, sig, pub, raw)
