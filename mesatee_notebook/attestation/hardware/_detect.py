"""One entry point: sniff the evidence format and hand it to the right verifier (pure, no I/O)."""

from __future__ import annotations

from mesatee_notebook.attestation.hardware import _dcap, _der
from mesatee_notebook.attestation.hardware._certs import parsing
from mesatee_notebook.attestation.hardware._errors import malformed
from mesatee_notebook.attestation.hardware._verdict import Verdict
from mesatee_notebook.attestation.hardware.policy import HardwarePolicy
from mesatee_notebook.attestation.hardware.ratls import verify_ratls_certificate
from mesatee_notebook.attestation.hardware.sgx import verify_sgx_quote
from mesatee_notebook.attestation.hardware.snp import (
    REPORT_SIZE,
    decode_report_bytes,
    looks_like_snp_report,
    verify_snp_report,
)
from mesatee_notebook.attestation.hardware.tdx import verify_tdx_quote
from mesatee_notebook.errors import MalformedEvidence

__all__ = ["detect_format", "verify_evidence"]

_FORMAT = "evidence format"


def _is_der_certificate(data: bytes) -> bool:
    if not data or data[0] != _der.SEQUENCE:
        return False
    try:
        tlv = _der.read_tlv(data, 0, len(data))
    except MalformedEvidence:
        return False
    return not data[tlv.end :].strip()


def detect_format(data: bytes) -> str:
    """``"ratls"``, ``"sgx"``, ``"tdx"`` or ``"sev-snp"``; anything else is refused."""
    if data.lstrip().startswith(b"-----BEGIN CERTIFICATE-----") or _is_der_certificate(data):
        return "ratls"
    if _dcap.looks_like_quote(data):
        return "tdx" if int.from_bytes(data[4:8], "little") == _dcap.TEE_TDX else "sgx"
    if len(data) == REPORT_SIZE or len(b"".join(data.split())) == 2 * REPORT_SIZE:
        try:
            raw = decode_report_bytes(data)
        except MalformedEvidence:
            raw = b""
        if looks_like_snp_report(raw):
            return "sev-snp"
    head = data[:8].hex()
    raise malformed(
        _FORMAT,
        f"not an SGX/TDX DCAP quote, SEV-SNP report (raw or hex) or RA-TLS certificate "
        f"({len(data)} bytes starting {head})",
    )


def verify_evidence(data: bytes, *, cert_chain: bytes | None = None, policy: HardwarePolicy | None = None) -> Verdict:
    """Detect the evidence format and verify it under ``policy`` (default: pinned roots, no debug).

    ``cert_chain`` supplies endorsement certificates the evidence does not carry itself: for
    SEV-SNP the VCEK or VLEK (plus, optionally, ASK/ASVK and ARK), PEM and/or DER concatenated.
    Raises a typed :class:`~mesatee_notebook.errors.AttestationError` naming the failed check.
    """
    policy = policy or HardwarePolicy()
    with parsing("evidence"):
        data = bytes(data)
        kind = detect_format(data)
        if kind == "ratls":
            return verify_ratls_certificate(data, cert_chain=cert_chain, policy=policy)
        if kind == "sgx":
            return verify_sgx_quote(data, policy)
        if kind == "tdx":
            return verify_tdx_quote(data, policy)
        return verify_snp_report(data, cert_chain, policy)
