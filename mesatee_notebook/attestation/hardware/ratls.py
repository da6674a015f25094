"""RA-TLS certificates: find the hardware evidence in an X.509 extension and check it binds the key.

Three carriers are understood:

* TCG DICE tagged evidence, OID 2.23.133.5.4.9: CBOR ``tag([evidence, claims])`` where claims is a
  CBOR map ``{"pubkey-hash": [alg, H(SPKI)], ...}`` and ``report_data[0:32] == SHA-256(claims)``.
  Tags: 60000 (interoperable RA-TLS, Intel quote), 0x1A7501 (rats-tls Intel quote), 0x1A7504 (SEV-SNP).
* Gramine's legacy extension, whose OID is the DER of 1.2.840.113741.1337.6 wrapped once more
  (it reads as 0.6.9.42.840.113741.1337.6); binding ``report_data[0:32] == SHA-256(DER SPKI)``.
* The Intel SGX SDK's 1.2.840.113741.1.13.1, with the same legacy binding.

Certificates that cryptography refuses (old mbedTLS: NULL parameters in the ECDSA signature
AlgorithmIdentifier) are read with a small DER walker instead.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import cbor2
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from mesatee_notebook.attestation.hardware import _dcap
from mesatee_notebook.attestation.hardware._certs import (
    CertExtension,
    CertView,
    load_certificate,
    parse_cert_view,
    parsing,
)
from mesatee_notebook.attestation.hardware._errors import malformed, refuse
from mesatee_notebook.attestation.hardware._verdict import Check, Verdict
from mesatee_notebook.attestation.hardware.policy import HardwarePolicy
from mesatee_notebook.errors import CertificateExpired, EvidenceSignatureError, KeyBindingError, MalformedEvidence

__all__ = [
    "GRAMINE_LEGACY_OID",
    "INTEL_SDK_OID",
    "TCG_EVIDENCE_OID",
    "RaTlsEvidence",
    "certificate_der",
    "read_ratls_certificate",
    "verify_ratls_certificate",
]

_TCG = "TCG DICE evidence extension"
_EVIDENCE = "RA-TLS evidence"

TCG_EVIDENCE_OID = "2.23.133.5.4.9"
GRAMINE_LEGACY_OID = "0.6.9.42.840.113741.1337.6"
INTEL_SDK_OID = "1.2.840.113741.1.13.1"
TAG_INTEROP_QUOTE = 60000
TAG_RATS_INTEL_QUOTE = 0x1A7501
TAG_RATS_SNP_REPORT = 0x1A7504
_QUOTE_TAGS = (TAG_INTEROP_QUOTE, TAG_RATS_INTEL_QUOTE)
# IANA "Named Information Hash Algorithm" registry ids used by pubkey-hash.
_HASHES: dict[int, tuple[str, Callable[[bytes], Any]]] = {
    1: ("sha-256", hashlib.sha256),
    7: ("sha-384", hashlib.sha384),
    8: ("sha-512", hashlib.sha512),
}
_SIG_HASHES: dict[str, hashes.HashAlgorithm] = {
    "1.2.840.10045.4.3.2": hashes.SHA256(),
    "1.2.840.10045.4.3.3": hashes.SHA384(),
    "1.2.840.10045.4.3.4": hashes.SHA512(),
    "1.2.840.113549.1.1.11": hashes.SHA256(),
    "1.2.840.113549.1.1.12": hashes.SHA384(),
    "1.2.840.113549.1.1.13": hashes.SHA512(),
}
_CERT = "RA-TLS certificate"
_PEM_BEGIN = b"-----BEGIN CERTIFICATE-----"
_PEM_END = b"-----END CERTIFICATE-----"


@dataclass(frozen=True)
class RaTlsEvidence:
    """What an RA-TLS certificate carries, parsed but not verified."""

    view: CertView
    tcg_tag: int | None
    tcg_evidence: bytes | None
    tcg_claims_raw: bytes | None
    tcg_claims: dict[str, Any]
    legacy: tuple[tuple[str, bytes], ...]


def certificate_der(data: bytes) -> bytes:
    """Return the DER of a PEM certificate (the first block), or ``data`` itself if it is DER.

    Only text that *starts* with a PEM header is PEM: DER evidence embeds PEM PCK chains.
    """
    text = data.lstrip()
    if not text.startswith(_PEM_BEGIN):
        return bytes(data)
    stop = text.find(_PEM_END)
    if stop < 0:
        raise malformed(_CERT, "the PEM certificate has no END line")
    try:
        return base64.b64decode(b"".join(text[len(_PEM_BEGIN) : stop].split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise malformed(_CERT, "the PEM certificate is not valid base64") from exc


def _view(der: bytes) -> CertView:
    """Read the certificate with cryptography; fall back to the DER walker only if it refuses."""
    try:
        cert = load_certificate(der, _CERT)
    except MalformedEvidence:
        return parse_cert_view(der, _CERT)
    with parsing(_CERT):
        exts: list[CertExtension] = []
        for ext in cert.extensions:
            value = ext.value.value if isinstance(ext.value, x509.UnrecognizedExtension) else b""
            exts.append(CertExtension(ext.oid.dotted_string, ext.critical, value))
        return CertView(
            der=der,
            tbs=cert.tbs_certificate_bytes,
            signature_oid=cert.signature_algorithm_oid.dotted_string,
            signature=cert.signature,
            spki=cert.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
            issuer=cert.issuer.public_bytes(),
            subject=cert.subject.public_bytes(),
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            extensions=tuple(exts),
        )


def _decode_tcg(ext: CertExtension) -> tuple[int, bytes, bytes, dict[str, Any]]:
    """Decode ``tag([evidence, claims])`` and the claims map."""
    what = _TCG
    with parsing(what):
        item = cbor2.loads(ext.value)
        if not isinstance(item, cbor2.CBORTag):
            raise malformed(what, "is not a CBOR tag")
        content = item.value
        if not isinstance(content, list | tuple) or len(content) != 2:
            raise malformed(what, "must wrap an array [evidence, claims]")
        evidence, claims_raw = content
        if not isinstance(evidence, bytes) or not isinstance(claims_raw, bytes):
            raise malformed(what, "evidence and claims must be byte strings")
        claims = cbor2.loads(claims_raw)
        if not isinstance(claims, dict) or not all(isinstance(k, str) for k in claims):
            raise malformed(what, "claims must be a CBOR map with text keys")
        return int(item.tag), evidence, claims_raw, claims


def read_ratls_certificate(data: bytes) -> RaTlsEvidence:
    """Parse an RA-TLS certificate (PEM or DER) and pull out its evidence extensions."""
    view = _view(certificate_der(bytes(data)))
    tcg = view.find(TCG_EVIDENCE_OID)
    legacy = tuple(
        (name, ext.value)
        for name, oid in (("Gramine legacy extension", GRAMINE_LEGACY_OID), ("Intel SGX SDK extension", INTEL_SDK_OID))
        if (ext := view.find(oid)) is not None
    )
    if tcg is None and not legacy:
        raise malformed(_CERT, "carries no attestation evidence extension (2.23.133.5.4.9 or a legacy SGX one)")
    if tcg is None:
        return RaTlsEvidence(view, None, None, None, {}, legacy)
    tag, evidence, claims_raw, claims = _decode_tcg(tcg)
    return RaTlsEvidence(view, tag, evidence, claims_raw, claims, legacy)


def _self_signature(view: CertView) -> Check:
    """Verify a self-issued certificate's signature with its own key (integrity of the certificate)."""
    check = "certificate signature"
    if view.issuer != view.subject:
        return Check(check, None, "issued by a CA: its signature is for the TLS layer's CA policy, not checked here")
    hash_alg = _SIG_HASHES.get(view.signature_oid)
    if hash_alg is None:
        return Check(check, None, f"signature algorithm {view.signature_oid} not supported here")
    with parsing(_CERT):
        key = serialization.load_der_public_key(view.spki)
    try:
        if isinstance(key, ec.EllipticCurvePublicKey) and view.signature_oid.startswith("1.2.840.10045"):
            key.verify(view.signature, view.tbs, ec.ECDSA(hash_alg))
        elif isinstance(key, rsa.RSAPublicKey) and view.signature_oid.startswith("1.2.840.113549"):
            key.verify(view.signature, view.tbs, padding.PKCS1v15(), hash_alg)
        else:
            raise refuse(EvidenceSignatureError, check, "the key type does not match the signature algorithm")
    except InvalidSignature:
        raise refuse(
            EvidenceSignatureError, check, "the self-signature does not verify under the certificate's key"
        ) from None
    return Check(check, True, f"self-signed, verifies under its own key ({view.signature_oid})")


def _report_data(verdict: Verdict) -> bytes:
    return bytes.fromhex(str(verdict.claims["report_data"]))


def _verify_inner(evidence: bytes, cert_chain: bytes | None, policy: HardwarePolicy, tag: int | None) -> Verdict:
    from mesatee_notebook.attestation.hardware.sgx import verify_sgx_quote
    from mesatee_notebook.attestation.hardware.snp import verify_snp_report
    from mesatee_notebook.attestation.hardware.tdx import verify_tdx_quote

    if tag == TAG_RATS_SNP_REPORT:
        return verify_snp_report(evidence, cert_chain, policy)
    if tag is not None and tag not in _QUOTE_TAGS:
        raise malformed(_TCG, f"CBOR tag {tag} is not a known hardware evidence format")
    if not _dcap.looks_like_quote(evidence):
        raise malformed(_EVIDENCE, "the extension does not hold an Intel DCAP quote")
    if int.from_bytes(evidence[4:8], "little") == _dcap.TEE_TDX:
        return verify_tdx_quote(evidence, policy)
    return verify_sgx_quote(evidence, policy)


def verify_ratls_certificate(
    data: bytes, *, cert_chain: bytes | None = None, policy: HardwarePolicy | None = None
) -> Verdict:
    """Verify the evidence in an RA-TLS certificate and that it commits to the certificate's key."""
    policy = policy or HardwarePolicy()
    ev = read_ratls_certificate(data)
    view = ev.view
    parse_note = (
        "read with cryptography"
        if view.parser == "cryptography"
        else ("cryptography refused it (e.g. NULL ECDSA parameters from old mbedTLS); read with the lenient DER walker")
    )
    checks = [Check("RA-TLS certificate", True, parse_note), _self_signature(view)]
    when = policy.when()
    if not view.not_before <= when <= view.not_after:
        raise refuse(
            CertificateExpired,
            "certificate validity",
            f"the RA-TLS certificate is valid from {view.not_before:%Y-%m-%d} to {view.not_after:%Y-%m-%d}, "
            f"not at {when:%Y-%m-%d %H:%M} UTC",
        )
    checks.append(Check("RA-TLS certificate validity", True, f"valid at {when:%Y-%m-%d %H:%M} UTC"))
    spki_sha256 = hashlib.sha256(view.spki).digest()
    inner_policy = replace(policy, report_data=None)
    claims: dict[str, Any] = {"ratls_spki_sha256": spki_sha256.hex(), "ratls_parser": view.parser}
    primary: Verdict | None = None
    carriers: list[str] = []

    if ev.tcg_evidence is not None and ev.tcg_claims_raw is not None:
        primary = _verify_inner(ev.tcg_evidence, cert_chain, policy, ev.tcg_tag)
        carriers.append("TCG DICE tagged evidence")
        checks += [c for c in primary.checks if not (c.name == "report data" and c.passed is None)]
        checks.append(_pubkey_hash(ev.tcg_claims, view.spki))
        if _report_data(primary)[:32] != hashlib.sha256(ev.tcg_claims_raw).digest():
            raise refuse(KeyBindingError, "RA-TLS key binding", "report_data[0:32] is not SHA-256 of the TCG claims")
        checks.append(
            Check("RA-TLS key binding", True, "report_data[0:32] == SHA-256(CBOR claims), claims hold H(SPKI)")
        )
        claims["ratls_tcg_tag"] = ev.tcg_tag
        claims["ratls_claims"] = {k: _plain(v) for k, v in ev.tcg_claims.items()}

    for name, quote in ev.legacy:
        verdict = _verify_inner(quote, cert_chain, inner_policy, None)
        carriers.append(name)
        rd = _report_data(verdict)[:32]
        if rd == spki_sha256:
            how = "report_data[0:32] == SHA-256(DER SPKI)"
        elif ev.tcg_evidence is not None and quote == ev.tcg_evidence:
            how = "the same quote as the TCG extension, bound through its claims"
        else:
            raise refuse(
                KeyBindingError, f"{name} key binding", "report_data[0:32] is not SHA-256 of the certificate's SPKI"
            )
        checks.append(Check(f"{name}", True, f"{verdict.format} verified under the same policy; {how}"))
        if primary is None:
            primary = _verify_inner(quote, cert_chain, policy, None)
            checks[-1:-1] = [c for c in primary.checks if not (c.name == "report data" and c.passed is None)]
    if primary is None:  # unreachable: read_ratls_certificate guarantees a carrier
        raise malformed(_CERT, "carries no attestation evidence")
    return Verdict(
        primary.level,
        primary.tee,
        f"RA-TLS certificate ({' + '.join(carriers)}) with {primary.format}",
        {**primary.claims, **claims},
        tuple(checks),
    )


def _pubkey_hash(claims: dict[str, Any], spki: bytes) -> Check:
    """claims["pubkey-hash"] = [alg, H(SPKI)] (possibly CBOR-encoded in a byte string) must match the SPKI."""
    check = "public key hash"
    value = claims.get("pubkey-hash")
    with parsing(check):
        if isinstance(value, bytes):
            value = cbor2.loads(value)
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise refuse(KeyBindingError, check, "the claims carry no pubkey-hash [alg, hash]")
    alg, digest = value
    if not isinstance(alg, int) or alg not in _HASHES or not isinstance(digest, bytes):
        raise refuse(KeyBindingError, check, f"unsupported pubkey-hash algorithm {alg!r}")
    name, fn = _HASHES[alg]
    if fn(spki).digest() != digest:
        raise refuse(KeyBindingError, check, f"the claims' {name} hash is not the certificate's public key")
    return Check(check, True, f"claims pubkey-hash is {name}(SPKI) of this certificate")


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value if isinstance(value, str | int | float | bool) or value is None else str(value)
