"""Certificate loading, vendor chain checks and a lenient certificate view (parsing only)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import itertools
import struct
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import cbor2
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import NameOID, SignatureAlgorithmOID

from mesatee_notebook.attestation.hardware import _der
from mesatee_notebook.attestation.hardware._errors import ChainBroken, RootNotTrusted, malformed, refuse
from mesatee_notebook.errors import AttestationError, CertificateExpired

__all__ = [
    "CertExtension",
    "CertView",
    "TrustAnchor",
    "common_name",
    "der_sha256",
    "load_certificate",
    "load_certificates",
    "parse_cert_view",
    "parsing",
    "verify_chain",
]

_PEM_BEGIN = b"-----BEGIN CERTIFICATE-----"
_PEM_END = b"-----END CERTIFICATE-----"
_PARSE_ERRORS = (
    ValueError,
    cbor2.CBORError,  # not a ValueError since cbor2 6: a broken TCG/RA-TLS CBOR extension
    x509.InvalidVersion,  # not a ValueError: an X.509 version field outside v1..v3
    TypeError,
    IndexError,
    KeyError,
    OverflowError,
    struct.error,
    UnsupportedAlgorithm,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
    RecursionError,
)


@contextmanager
def parsing(what: str) -> Iterator[None]:
    """Turn any lower-layer parse failure inside the block into :class:`MalformedEvidence`."""
    try:
        yield
    except AttestationError:
        raise
    except _PARSE_ERRORS as exc:
        raise malformed(what, f"cannot be parsed ({type(exc).__name__}: {exc})") from exc


def load_certificate(der: bytes, what: str) -> x509.Certificate:
    """Load one DER certificate, quietly accepting the deprecated encodings vendors still ship."""
    with parsing(what), warnings.catch_warnings():
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        cert = x509.load_der_x509_certificate(der)
        # Touch the lazily parsed parts now, so a broken field fails here, typed.
        _ = (cert.subject, cert.issuer, cert.extensions, cert.not_valid_before_utc, cert.not_valid_after_utc)
        return cert


def load_certificates(data: bytes, what: str) -> list[x509.Certificate]:
    """Every certificate in ``data`` in order: PEM blocks and/or concatenated DER, mixed freely."""
    certs: list[x509.Certificate] = []
    pos, end = 0, len(data)
    while pos < end:
        byte = data[pos]
        if byte in b" \t\r\n\x00":
            pos += 1
        elif data.startswith(_PEM_BEGIN, pos):
            stop = data.find(_PEM_END, pos)
            if stop < 0:
                raise malformed(what, "a PEM certificate has no END line")
            body = data[pos + len(_PEM_BEGIN) : stop]
            try:
                der = base64.b64decode(b"".join(body.split()), validate=True)
            except (binascii.Error, ValueError) as exc:
                raise malformed(what, "a PEM certificate is not valid base64") from exc
            certs.append(load_certificate(der, what))
            pos = stop + len(_PEM_END)
        elif byte == _der.SEQUENCE:
            tlv = _der.read_tlv(data, pos, end, what)
            certs.append(load_certificate(tlv.raw, what))
            pos = tlv.end
        else:
            raise malformed(what, f"byte 0x{byte:02x} at offset {pos} starts neither a PEM nor a DER certificate")
    if not certs:
        raise malformed(what, "no certificate found")
    return certs


def der_sha256(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate's DER, as hex: the form roots are pinned by."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def common_name(cert: x509.Certificate) -> str:
    """Return the subject CN, or the whole subject when there is none."""
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if attrs:
        value = attrs[0].value
        return value if isinstance(value, str) else value.decode("utf-8", "replace")
    return cert.subject.rfc4514_string()


@dataclass(frozen=True)
class TrustAnchor:
    """A root certificate the verifier trusts, with the name shown in verdicts."""

    name: str
    cert: x509.Certificate

    @property
    def sha256(self) -> str:
        """SHA-256 of the root's DER."""
        return der_sha256(self.cert)


def _verify_link(child: x509.Certificate, parent: x509.Certificate, kind: Literal["intel", "amd"], check: str) -> None:
    """Check that ``parent`` is a CA that signed ``child`` with the vendor's algorithm."""
    child_name, parent_name = common_name(child), common_name(parent)
    if child.issuer != parent.subject:
        raise refuse(ChainBroken, check, f"{child_name!r} is not issued by {parent_name!r}")
    try:
        constraints = parent.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise refuse(ChainBroken, check, f"{parent_name!r} is not a CA certificate")
    key = parent.public_key()
    try:
        if kind == "intel":
            hash_alg = child.signature_hash_algorithm
            if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(
                hash_alg, hashes.SHA256 | hashes.SHA384
            ):
                raise refuse(ChainBroken, check, f"{child_name!r} is not signed with ECDSA-SHA256/384")
            key.verify(child.signature, child.tbs_certificate_bytes, ec.ECDSA(hash_alg))
        else:
            if (
                not isinstance(key, rsa.RSAPublicKey)
                or child.signature_algorithm_oid != SignatureAlgorithmOID.RSASSA_PSS
            ):
                raise refuse(ChainBroken, check, f"{child_name!r} is not signed with RSA-PSS")
            pss = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
            key.verify(child.signature, child.tbs_certificate_bytes, pss, hashes.SHA384())
    except InvalidSignature:
        raise refuse(
            ChainBroken, check, f"the signature of {parent_name!r} on {child_name!r} does not verify"
        ) from None


def verify_chain(
    chain: Sequence[x509.Certificate],
    *,
    anchors: Sequence[TrustAnchor],
    kind: Literal["intel", "amd"],
    check: str,
    as_of: datetime,
) -> tuple[list[x509.Certificate], TrustAnchor]:
    """Verify a leaf-first chain up to a pinned anchor; return the full chain and the anchor.

    The root must be byte-identical (SHA-256 of DER) to an anchor. If the chain stops
    below the root, the anchor whose subject issued the top certificate is appended.
    """
    with parsing(check):
        certs = list(chain)
        if not certs:
            raise refuse(ChainBroken, check, "the chain is empty")
        top = certs[-1]
        if top.issuer != top.subject:
            issuer = next((a for a in anchors if a.cert.subject == top.issuer), None)
            if issuer is None:
                raise refuse(
                    RootNotTrusted,
                    check,
                    f"{common_name(top)!r} is issued by {top.issuer.rfc4514_string()!r}, not a trusted root",
                )
            certs.append(issuer.cert)
        root = certs[-1]
        digest = der_sha256(root)
        anchor = next((a for a in anchors if a.sha256 == digest), None)
        if anchor is None:
            trusted = ", ".join(f"{a.name} ({a.sha256[:8]})" for a in anchors)
            raise refuse(
                RootNotTrusted,
                check,
                f"the root {common_name(root)!r} (SHA-256 {digest[:8]}…) is not trusted; trusted roots: {trusted}",
                root_sha256=digest,
            )
        for child, parent in itertools.pairwise(certs):
            _verify_link(child, parent, kind, check)
        _verify_link(root, root, kind, check)
        for cert in certs:
            if not cert.not_valid_before_utc <= as_of <= cert.not_valid_after_utc:
                raise refuse(
                    CertificateExpired,
                    "certificate validity",
                    f"{common_name(cert)!r} is valid from {cert.not_valid_before_utc:%Y-%m-%d} to "
                    f"{cert.not_valid_after_utc:%Y-%m-%d}, not at {as_of:%Y-%m-%d %H:%M} UTC",
                )
        return certs, anchor


@dataclass(frozen=True)
class CertExtension:
    """One X.509 extension: its dotted OID, criticality and raw value."""

    oid: str
    critical: bool
    value: bytes


@dataclass(frozen=True)
class CertView:
    """What RA-TLS needs from a certificate, read with the DER walker (no cryptography parse)."""

    der: bytes
    tbs: bytes
    signature_oid: str
    signature: bytes
    spki: bytes
    issuer: bytes
    subject: bytes
    not_before: datetime
    not_after: datetime
    extensions: tuple[CertExtension, ...]
    parser: str = "cryptography"
    """``"cryptography"``, or ``"lenient DER walker"`` when cryptography refused the certificate."""

    def find(self, oid: str) -> CertExtension | None:
        """Return the extension with dotted OID ``oid``, if any."""
        return next((e for e in self.extensions if e.oid == oid), None)


def parse_cert_view(der: bytes, what: str = "RA-TLS certificate") -> CertView:
    """Read TBS, SPKI, validity and extensions of a certificate, tolerating odd encodings."""
    cert = _der.read_single(der, what)
    parts = _der.children(_der.expect(cert, _der.SEQUENCE, what), what)
    if len(parts) != 3:
        raise malformed(what, "a certificate has exactly three parts")
    tbs, sig_alg, sig = parts
    _der.expect(tbs, _der.SEQUENCE, what)
    alg_parts = _der.children(_der.expect(sig_alg, _der.SEQUENCE, what), what)
    if not alg_parts:
        raise malformed(what, "empty signature AlgorithmIdentifier")
    signature_oid = _der.decode_oid(_der.expect(alg_parts[0], _der.OID, what).content, what)
    sig_bits = _der.expect(sig, _der.BIT_STRING, what).content
    if not sig_bits or sig_bits[0] != 0:
        raise malformed(what, "the signature BIT STRING has unused bits")
    fields = _der.children(tbs, what)
    idx = 1 if fields and fields[0].tag == 0xA0 else 0
    if len(fields) < idx + 6:
        raise malformed(what, "the TBSCertificate is missing fields")
    validity = _der.children(_der.expect(fields[idx + 3], _der.SEQUENCE, what), what)
    if len(validity) != 2:
        raise malformed(what, "validity must hold two times")
    spki = _der.expect(fields[idx + 5], _der.SEQUENCE, what)
    extensions: list[CertExtension] = []
    for extra in fields[idx + 6 :]:
        if extra.tag != 0xA3:
            continue
        outer = _der.children(extra, what)
        if len(outer) != 1:
            raise malformed(what, "bad extensions wrapper")
        for ext in _der.children(_der.expect(outer[0], _der.SEQUENCE, what), what):
            items = _der.children(_der.expect(ext, _der.SEQUENCE, what), what)
            if len(items) not in (2, 3):
                raise malformed(what, "an extension must have two or three fields")
            oid_bytes = _der.expect(items[0], _der.OID, what).content
            critical = len(items) == 3 and _der.expect(items[1], _der.BOOLEAN, what).content not in (b"", b"\x00")
            value = _der.expect(items[-1], _der.OCTET_STRING, what).content
            extensions.append(CertExtension(_der.decode_oid(oid_bytes, what), critical, value))
    return CertView(
        der=der,
        tbs=tbs.raw,
        signature_oid=signature_oid,
        signature=sig_bits[1:],
        spki=spki.raw,
        issuer=fields[idx + 2].raw,
        subject=fields[idx + 4].raw,
        not_before=_der.decode_time(validity[0], what),
        not_after=_der.decode_time(validity[1], what),
        extensions=tuple(extensions),
        parser="lenient DER walker",
    )
