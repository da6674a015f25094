"""Tampered evidence is refused with a typed error that names the failed check."""

from __future__ import annotations

import base64
import struct
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from mesatee_notebook.attestation.hardware import HardwarePolicy, verify_evidence
from mesatee_notebook.attestation.hardware._certs import load_certificates, verify_chain
from mesatee_notebook.attestation.hardware._dcap import DcapQuote, parse_quote
from mesatee_notebook.attestation.hardware._errors import (
    ChainBroken,
    EndorsementMismatch,
    MissingEndorsement,
    RootNotTrusted,
    TcbTooLow,
)
from mesatee_notebook.attestation.hardware.roots import amd_anchors
from mesatee_notebook.attestation.hardware.snp import _endorsement_checks, decode_tcb, parse_snp_report
from mesatee_notebook.errors import (
    AttestationError,
    CertificateExpired,
    EvidenceSignatureError,
    KeyBindingError,
    MalformedEvidence,
    MeasurementMismatch,
    UntrustedPlatform,
)

from .conftest import AS_OF, snp_chain, vec

TDX = "tdx/tdx_prod_quote_SPR_E4.dat"
SNP = "snp/virtee_report_milan.hex"


def flip(data: bytes, offset: int, mask: int = 0x01) -> bytes:
    out = bytearray(data)
    out[offset] ^= mask
    return bytes(out)


def refused(exc_type: type[AttestationError], check: str, data: bytes, **kw: object) -> AttestationError:
    """Verify ``data`` and return the error, asserting its type and the check it names."""
    with pytest.raises(exc_type) as info:
        verify_evidence(data, **kw)  # type: ignore[arg-type]
    assert info.value.details.get("check") == check, info.value
    assert str(info.value).startswith(check)
    return info.value


def sig_offsets(data: bytes) -> tuple[int, DcapQuote]:
    """Offset of the signature data (after the 4-byte length) of a v4 quote."""
    q = parse_quote(data)
    return len(q.signed) + 4, q


def rebuild_v4(q: DcapQuote, chain_pem: bytes) -> bytes:
    """Re-assemble a v4 quote with another PCK chain (sizes recomputed)."""
    inner = (
        q.qe_report
        + q.qe_report_signature
        + struct.pack("<H", len(q.qe_auth_data))
        + q.qe_auth_data
        + struct.pack("<HI", 5, len(chain_pem))
        + chain_pem
    )
    sig = q.signature + q.attest_key + struct.pack("<HI", 6, len(inner)) + inner
    return q.signed + struct.pack("<I", len(sig)) + sig


def pem_certs(chain: bytes) -> list[x509.Certificate]:
    return load_certificates(chain.rstrip(b"\x00"), "chain")


def to_pem(certs: list[x509.Certificate] | list[bytes]) -> bytes:
    out = b""
    for c in certs:
        der = c if isinstance(c, bytes) else c.public_bytes(serialization.Encoding.DER)
        out += b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(der) + b"-----END CERTIFICATE-----\n"
    return out


def self_signed(
    subject: x509.Name, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, *, ca: bool
) -> x509.Certificate:
    now = datetime(2020, 1, 1, tzinfo=UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=365 * 30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )


# --- DCAP quotes (TDX production sample) -------------------------------------------------


def test_flipped_body_byte(policy: HardwarePolicy) -> None:
    refused(EvidenceSignatureError, "quote signature", flip(vec(TDX), 48 + 136), policy=policy)  # in MRTD


def test_flipped_header_byte(policy: HardwarePolicy) -> None:
    refused(EvidenceSignatureError, "quote signature", flip(vec(TDX), 40), policy=policy)  # user data


def test_flipped_report_data(policy: HardwarePolicy) -> None:
    refused(EvidenceSignatureError, "quote signature", flip(vec(TDX), 48 + 520), policy=policy)


def test_flipped_quote_signature(policy: HardwarePolicy) -> None:
    off, _ = sig_offsets(vec(TDX))
    refused(EvidenceSignatureError, "quote signature", flip(vec(TDX), off + 5), policy=policy)


def test_flipped_attestation_key_breaks_qe_binding(policy: HardwarePolicy) -> None:
    off, _ = sig_offsets(vec(TDX))
    refused(KeyBindingError, "QE report binding", flip(vec(TDX), off + 64 + 3), policy=policy)


def test_flipped_qe_report(policy: HardwarePolicy) -> None:
    off, _ = sig_offsets(vec(TDX))
    refused(EvidenceSignatureError, "QE report signature", flip(vec(TDX), off + 128 + 6 + 100), policy=policy)


def test_flipped_qe_auth_data(policy: HardwarePolicy) -> None:
    off, _ = sig_offsets(vec(TDX))
    refused(KeyBindingError, "QE report binding", flip(vec(TDX), off + 128 + 6 + 384 + 64 + 2), policy=policy)


def test_flipped_byte_in_pck_leaf_certificate(policy: HardwarePolicy) -> None:
    q = parse_quote(vec(TDX))
    certs = pem_certs(q.cert_chain_pem)
    leaf = certs[0].public_bytes(serialization.Encoding.DER)
    tampered = to_pem([flip(leaf, len(leaf) - 1), *certs[1:]])  # last byte of the signature's S
    err = refused(ChainBroken, "PCK certificate chain", rebuild_v4(q, tampered), policy=policy)
    assert "does not verify" in str(err)


def test_unmodified_rebuild_still_verifies(policy: HardwarePolicy) -> None:
    """The rebuild helper itself is faithful, so the refusals above come from the tampering."""
    q = parse_quote(vec(TDX))
    verify_evidence(rebuild_v4(q, to_pem(pem_certs(q.cert_chain_pem))), policy=policy)


def test_substituted_intel_root(policy: HardwarePolicy) -> None:
    q = parse_quote(vec(TDX))
    certs = pem_certs(q.cert_chain_pem)
    fake_root = self_signed(certs[-1].subject, ec.generate_private_key(ec.SECP256R1()), ca=True)
    data = rebuild_v4(q, to_pem([*certs[:-1], fake_root]))
    err = refused(RootNotTrusted, "PCK certificate chain", data, policy=policy)
    assert "is not trusted" in str(err)
    # Trusting the impostor explicitly does not help: Intel's intermediate is not signed by it.
    trusting = replace(policy, extra_trusted_roots=(to_pem([fake_root]),))
    refused(ChainBroken, "PCK certificate chain", data, policy=trusting)


def test_chain_without_root_is_completed_from_the_pin(policy: HardwarePolicy) -> None:
    q = parse_quote(vec(TDX))
    certs = pem_certs(q.cert_chain_pem)
    v = verify_evidence(rebuild_v4(q, to_pem(certs[:-1])), policy=policy)
    assert v.check("PCK certificate chain").detail.endswith("(SHA-256 44a0196b2b99f889...)")


@pytest.mark.parametrize("size", [0, 10, 47, 48, 600, 632, 700, 1200, 4000, 4934])
def test_truncated_quote(size: int, policy: HardwarePolicy) -> None:
    with pytest.raises(MalformedEvidence):
        verify_evidence(vec(TDX)[:size], policy=policy)


def test_pck_certificate_outside_validity() -> None:
    late = HardwarePolicy(as_of=datetime(2030, 1, 1, tzinfo=UTC))
    err = refused(CertificateExpired, "certificate validity", vec(TDX), policy=late)
    assert "Intel SGX PCK Certificate" in str(err)


def test_tdx_policy_mismatches(policy: HardwarePolicy) -> None:
    refused(MeasurementMismatch, "MRTD", vec(TDX), policy=replace(policy, mrtd="00" * 48))
    refused(MeasurementMismatch, "RTMR1", vec(TDX), policy=replace(policy, rtmrs=(None, "11" * 48)))
    refused(KeyBindingError, "report data", vec(TDX), policy=replace(policy, report_data=b"\x00" * 32))


def test_sgx_policy_mismatches() -> None:
    base = HardwarePolicy(as_of=AS_OF, allow_debug=True)
    gramine = vec("sgx/gramine-cert.pem")
    refused(MeasurementMismatch, "MRENCLAVE", gramine, policy=replace(base, mrenclave="11" * 32))
    refused(MeasurementMismatch, "MRSIGNER", gramine, policy=replace(base, mrsigner="11" * 32))
    refused(MeasurementMismatch, "ISVPRODID", gramine, policy=replace(base, isv_prod_id=7))
    refused(MeasurementMismatch, "ISVSVN", gramine, policy=replace(base, min_isv_svn=1))


# --- SEV-SNP (virtee Milan report, not debug) ---------------------------------------------


def snp_raw() -> bytes:
    return bytes.fromhex(vec(SNP).decode())


@pytest.mark.parametrize(
    ("offset", "what"),
    [
        (0x90, "measurement"),
        (0x50, "report data"),
        (0x180, "reported TCB"),
        (0x2A0, "signature R"),
        (0x2E8 + 10, "signature S"),
        (0x08, "policy"),
    ],
)
def test_snp_flipped_bytes(offset: int, what: str, policy: HardwarePolicy) -> None:
    refused(
        EvidenceSignatureError,
        "report signature",
        flip(snp_raw(), offset),
        cert_chain=snp_chain("virtee"),
        policy=policy,
    )


def test_snp_flipped_vcek_byte(policy: HardwarePolicy) -> None:
    vcek = vec("snp/virtee_vcek_milan.der")
    chain = flip(vcek, len(vcek) - 3) + vec("snp/virtee_cert_chain_milan")
    refused(ChainBroken, "AMD certificate chain", vec(SNP), cert_chain=chain, policy=policy)


def test_snp_vcek_of_another_chip(policy: HardwarePolicy) -> None:
    chain = vec("snp/gosev_vcek.testcer") + vec("snp/virtee_cert_chain_milan")
    refused(EvidenceSignatureError, "report signature", vec(SNP), cert_chain=chain, policy=policy)


def test_snp_wrong_vendor_root_milan_ark_for_turin_vcek(policy: HardwarePolicy) -> None:
    chain = vec("snp/virtee_vcek_turin.der") + vec("snp/virtee_cert_chain_milan")
    err = refused(RootNotTrusted, "AMD certificate chain", vec(SNP), cert_chain=chain, policy=policy)
    assert "ARK-Milan" in str(err)


def test_turin_chain_verifies_and_refuses_the_milan_ark() -> None:
    turin = [
        *load_certificates(vec("snp/virtee_vcek_turin.der"), "vcek"),
        *load_certificates(vec("snp/virtee_cert_chain_turin"), "chain"),
    ]
    chain, anchor = verify_chain(
        turin, anchors=amd_anchors("Turin"), kind="amd", check="AMD certificate chain", as_of=AS_OF
    )
    assert anchor.name == "AMD ARK-Turin" and len(chain) == 3
    with pytest.raises(RootNotTrusted, match="not trusted"):
        verify_chain(turin, anchors=amd_anchors("Milan"), kind="amd", check="AMD certificate chain", as_of=AS_OF)
    # And a Turin VCEK hung under Milan's ASK+ARK is not signed by that ASK.
    milan = load_certificates(vec("snp/virtee_cert_chain_milan"), "chain")
    with pytest.raises(ChainBroken, match="is not issued by"):
        verify_chain(
            [turin[0], *milan], anchors=amd_anchors("Milan"), kind="amd", check="AMD certificate chain", as_of=AS_OF
        )


def test_snp_turin_vcek_for_milan_report(policy: HardwarePolicy) -> None:
    chain = vec("snp/virtee_vcek_turin.der") + vec("snp/virtee_cert_chain_turin")
    refused(EvidenceSignatureError, "report signature", vec(SNP), cert_chain=chain, policy=policy)


def test_snp_substituted_ark(policy: HardwarePolicy) -> None:
    ask, ark = load_certificates(vec("snp/virtee_cert_chain_milan"), "chain")
    fake_ark = self_signed(ark.subject, rsa.generate_private_key(65537, 2048), ca=True)
    chain = vec("snp/virtee_vcek_milan.der") + to_pem([ask, fake_ark])
    err = refused(RootNotTrusted, "AMD certificate chain", vec(SNP), cert_chain=chain, policy=policy)
    assert "is not trusted" in str(err)


def test_snp_missing_vcek(policy: HardwarePolicy) -> None:
    refused(MissingEndorsement, "endorsement key", vec(SNP), policy=policy)
    refused(
        MissingEndorsement, "endorsement key", vec(SNP), cert_chain=vec("snp/virtee_cert_chain_milan"), policy=policy
    )


@pytest.mark.parametrize("size", [0, 4, 0x2A0, 0x49F, 0x4A1])
def test_snp_truncated_or_padded(size: int, policy: HardwarePolicy) -> None:
    raw = (snp_raw() + b"\x00")[:size]
    with pytest.raises(MalformedEvidence):
        verify_evidence(raw, cert_chain=snp_chain("virtee"), policy=policy)


def test_snp_truncated_hex(policy: HardwarePolicy) -> None:
    with pytest.raises(MalformedEvidence):
        verify_evidence(vec(SNP)[:-2], cert_chain=snp_chain("virtee"), policy=policy)


def test_snp_policy_mismatches(policy: HardwarePolicy) -> None:
    kw = {"cert_chain": snp_chain("virtee")}
    refused(MeasurementMismatch, "measurement", vec(SNP), policy=replace(policy, snp_measurement="00" * 48), **kw)
    refused(MeasurementMismatch, "host data", vec(SNP), policy=replace(policy, snp_host_data="01" * 32), **kw)
    err = refused(TcbTooLow, "minimum TCB", vec(SNP), policy=replace(policy, snp_min_tcb={"snp": 9}), **kw)
    assert "snp 8 < 9" in str(err)
    assert isinstance(err, UntrustedPlatform)
    refused(KeyBindingError, "report data", vec(SNP), policy=replace(policy, report_data=b"\x01"), **kw)


def test_snp_certificates_outside_validity() -> None:
    late = HardwarePolicy(as_of=datetime(2031, 1, 1, tzinfo=UTC))
    refused(CertificateExpired, "certificate validity", vec(SNP), cert_chain=snp_chain("virtee"), policy=late)


def test_snp_chip_id_and_tcb_must_match_the_vcek() -> None:
    """A VCEK is per chip and per TCB: a report claiming another chip or TCB is refused."""
    report = parse_snp_report(vec(SNP))
    vcek = load_certificates(vec("snp/virtee_vcek_milan.der"), "vcek")[0]
    tcb = decode_tcb(report.reported_tcb, "Milan")
    assert [c.passed for c in _endorsement_checks(report, vcek, "Milan", tcb)] == [True, True]
    other_chip = replace(report, chip_id=flip(report.chip_id, 0))
    with pytest.raises(EndorsementMismatch, match="chip id"):
        _endorsement_checks(other_chip, vcek, "Milan", tcb)
    with pytest.raises(EndorsementMismatch, match="reported TCB"):
        _endorsement_checks(report, vcek, "Milan", {**tcb, "snp": tcb["snp"] + 1})


# --- RA-TLS: re-issued certificates that carry someone else's evidence --------------------


def _extension(name: str, oid: str) -> bytes:
    from mesatee_notebook.attestation.hardware.ratls import read_ratls_certificate

    ev = read_ratls_certificate(vec(name))
    ext = ev.view.find(oid)
    assert ext is not None
    return ext.value


def _reissue(extensions: dict[str, bytes], key: ec.EllipticCurvePrivateKey | None = None) -> bytes:
    key = key or ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "impostor")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(7)
        .not_valid_before(datetime(2020, 1, 1, tzinfo=UTC))
        .not_valid_after(datetime(2040, 1, 1, tzinfo=UTC))
    )
    for oid, value in extensions.items():
        builder = builder.add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), value), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def test_ratls_evidence_moved_to_another_key(debug_policy: HardwarePolicy) -> None:
    tcg = _extension("sgx/gramine-cert.pem", "2.23.133.5.4.9")
    refused(KeyBindingError, "public key hash", _reissue({"2.23.133.5.4.9": tcg}), policy=debug_policy)


def test_ratls_claims_rewritten_for_the_new_key(debug_policy: HardwarePolicy) -> None:
    import hashlib

    import cbor2

    key = ec.generate_private_key(ec.SECP384R1())
    spki = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    tagged = cbor2.loads(_extension("sgx/gramine-cert.pem", "2.23.133.5.4.9"))
    claims = cbor2.dumps({"pubkey-hash": cbor2.dumps([1, hashlib.sha256(spki).digest()])})
    forged = cbor2.dumps(cbor2.CBORTag(60000, [tagged.value[0], claims]))
    refused(KeyBindingError, "RA-TLS key binding", _reissue({"2.23.133.5.4.9": forged}, key), policy=debug_policy)


def test_ratls_legacy_quote_moved_to_another_key(debug_policy: HardwarePolicy) -> None:
    quote = _extension("sgx/intel-sgxsdk-cert.pem", "1.2.840.113741.1.13.1")
    refused(
        KeyBindingError,
        "Intel SGX SDK extension key binding",
        _reissue({"1.2.840.113741.1.13.1": quote}),
        policy=debug_policy,
    )


def test_ratls_flipped_report_data_in_extension(debug_policy: HardwarePolicy) -> None:
    """Report data flipped inside the carried quote: the quote signature fails (cert re-signed)."""
    import cbor2

    tagged = cbor2.loads(_extension("sgx/gramine-cert.pem", "2.23.133.5.4.9"))
    quote = flip(tagged.value[0], 48 + 320)
    forged = cbor2.dumps(cbor2.CBORTag(60000, [quote, tagged.value[1]]))
    refused(EvidenceSignatureError, "quote signature", _reissue({"2.23.133.5.4.9": forged}), policy=debug_policy)


def test_ratls_flipped_certificate_byte(debug_policy: HardwarePolicy) -> None:
    from mesatee_notebook.attestation.hardware.ratls import certificate_der

    der = certificate_der(vec("sgx/intel-sgxsdk-cert.pem"))
    i = der.find(b"20501231235959Z")  # notAfter, inside the signed TBSCertificate
    refused(EvidenceSignatureError, "certificate signature", flip(der, i + 13), policy=debug_policy)


def test_ratls_certificate_not_self_issued_is_not_signature_checked(debug_policy: HardwarePolicy) -> None:
    """A CA-issued RA-TLS certificate: its signature is the TLS layer's business, and the verdict says so."""
    from mesatee_notebook.attestation.hardware.ratls import certificate_der

    der = certificate_der(vec("sgx/intel-sgxsdk-cert.pem"))
    issuer_cn = der.find(b"Intel SGX Enclave")  # the issuer comes before the subject
    v = verify_evidence(flip(der, issuer_cn + 2), policy=debug_policy)
    assert v.check("certificate signature").passed is None


def test_ratls_without_evidence(debug_policy: HardwarePolicy) -> None:
    refused(MalformedEvidence, "RA-TLS certificate", _reissue({}), policy=debug_policy)


def test_ratls_unknown_cbor_tag(debug_policy: HardwarePolicy) -> None:
    import cbor2

    forged = cbor2.dumps(cbor2.CBORTag(0x4D544545, [b"x", cbor2.dumps({})]))
    with pytest.raises(MalformedEvidence):
        verify_evidence(_reissue({"2.23.133.5.4.9": forged}), policy=debug_policy)


def test_ratls_certificate_outside_validity() -> None:
    refused(
        CertificateExpired,
        "certificate validity",
        vec("sgx/rats-tls-cert.pem"),
        policy=HardwarePolicy(as_of=AS_OF, allow_debug=True),
    )


def test_garbage_is_not_evidence(policy: HardwarePolicy) -> None:
    refused(MalformedEvidence, "evidence format", b"hello world", policy=policy)


def test_snp_vcek_and_ark_without_ask(policy: HardwarePolicy) -> None:
    ark = load_certificates(vec("snp/virtee_cert_chain_milan"), "chain")[1]
    chain = vec("snp/virtee_vcek_milan.der") + to_pem([ark])
    v = verify_evidence(vec(SNP), cert_chain=chain, policy=policy)
    assert v.check("AMD certificate chain").detail.startswith("SEV-VCEK -> SEV-Milan -> ARK-Milan")
