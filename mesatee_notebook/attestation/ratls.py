"""RA-TLS certificates: a self-signed X.509 certificate whose extension carries evidence (pure)."""

from __future__ import annotations

import datetime as dt

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID

from mesatee_notebook.attestation.evidence import TCG_TAGGED_EVIDENCE_OID
from mesatee_notebook.errors import MalformedEvidence

__all__ = ["build_ratls_certificate", "evidence_from_certificate", "load_certificate", "spki_der"]


def spki_der(cert: x509.Certificate) -> bytes:
    """DER SubjectPublicKeyInfo of the certificate's key."""
    return cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def build_ratls_certificate(
    key: ec.EllipticCurvePrivateKey,
    evidence: bytes,
    *,
    not_before: dt.datetime,
    not_after: dt.datetime,
    common_name: str = "mesatee enclave kernel",
) -> x509.Certificate:
    """A self-signed certificate for ``key`` with ``evidence`` in the TCG DICE extension."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(
            x509.UnrecognizedExtension(x509.ObjectIdentifier(TCG_TAGGED_EVIDENCE_OID), evidence), critical=False
        )
    )
    return builder.sign(key, hashes.SHA256())


def load_certificate(der: bytes) -> x509.Certificate:
    """Parse a DER certificate, mapping parser errors to MalformedEvidence."""
    try:
        return x509.load_der_x509_certificate(der)
    except (ValueError, x509.InvalidVersion) as exc:
        msg = f"the peer's certificate cannot be parsed: {exc}"
        raise MalformedEvidence(msg) from exc


def evidence_from_certificate(cert: x509.Certificate) -> bytes:
    """Return the raw evidence from the TCG DICE tagged-evidence extension."""
    try:
        ext = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(TCG_TAGGED_EVIDENCE_OID))
    except x509.ExtensionNotFound:
        msg = "the peer's certificate carries no attestation evidence (no TCG DICE extension 2.23.133.5.4.9)"
        raise MalformedEvidence(msg) from None
    except ValueError as exc:
        msg = f"the peer's certificate extensions cannot be parsed: {exc}"
        raise MalformedEvidence(msg) from exc
    value = ext.value
    if not isinstance(value, x509.UnrecognizedExtension):
        msg = "unexpected decoding of the evidence extension"
        raise MalformedEvidence(msg)
    return bytes(value.value)
