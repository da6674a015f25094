r"""Evidence of a kernel at ``sev`` (SEV-SNP / TDX guest) or ``sgx`` (Gramine), carried in its RA-TLS cert (pure).

The evidence is CBOR ``tag(HW_TAG, [statement, report, auxblob])``:

* ``statement``: canonical JSON with ``format``, ``level`` (``sev``; ``sgx``), ``tee`` (``sev-snp``, ``tdx``; ``sgx``),
  ``source`` (``configfs-tsm``, ``gramine``, or ``mimic`` for the test-only tree), ``measurement``, ``manifest``,
  ``time``, ``report_data``
  (``SHA-256(TLS SPKI DER || receipt key)``, the softtee key binding), ``receipt_key``, ``audit_key`` and ``sandbox``;
* ``report``: what configfs-tsm's ``outblob`` (Gramine's ``quote``) returned for ``inblob`` (``user_report_data``)
  ``= SHA-512(EVIDENCE_CONTEXT || statement)``: an SEV-SNP attestation report, a TDX DCAP quote or an SGX DCAP quote,
  so the hardware signature commits to the whole statement and, through
  its ``report_data``, to the TLS and receipt keys;
* ``auxblob``: SEV-SNP's certificate table (VCEK, ASK, ARK) from ``auxblob``, empty for TDX and SGX (the quote carries
  its PCK chain).

Each connection also gets a fresh report over ``SHA-512(FRESH_CONTEXT || report_data || client nonce)``
(:func:`fresh_report_data`), checked by the client before any request.

Verification uses the existing verifiers (``attestation/hardware``: chain to the pinned AMD ARK or Intel SGX Root CA,
plus any root the caller trusts explicitly in ``HardwarePolicy.extra_trusted_roots``, such as the test chain).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import cbor2

from mesatee_notebook.attestation.measurement import canonical_json, measurement_of
from mesatee_notebook.attestation.statement import parse_statement
from mesatee_notebook.errors import MalformedEvidence, MeasurementMismatch

if TYPE_CHECKING:  # the verifiers load only when hardware evidence is met (a client's import stays light)
    from mesatee_notebook.attestation.hardware._verdict import Verdict
    from mesatee_notebook.attestation.hardware.policy import HardwarePolicy

__all__ = [
    "EVIDENCE_CONTEXT",
    "FRESH_CONTEXT",
    "HW_EVIDENCE_FORMAT",
    "HW_TAG",
    "IDENTITY_CLAIMS",
    "HwEvidence",
    "check_same_guest",
    "fresh_report_data",
    "make_hw_evidence",
    "parse_hw_evidence",
    "statement_report_data",
    "verify_hw_report",
]

HW_TAG = 0x4D544857  # "MTHW": project-private CBOR content type for configfs-tsm (SEV-SNP / TDX) evidence
HW_EVIDENCE_FORMAT = "mesatee-hw/1"
EVIDENCE_CONTEXT = b"mesatee-hw-evidence/1\x00"
FRESH_CONTEXT = b"mesatee-hw-fresh/1\x00"
TEES = {"sev-snp": "sev", "tdx": "sev", "sgx": "sgx"}  # TEE -> the level it serves
# What must be equal between the certificate's report and a connection's fresh report: the same guest, same launch.
IDENTITY_CLAIMS = {
    "sev-snp": ("measurement", "host_data", "chip_id", "policy", "id_key_digest", "author_key_digest"),
    "tdx": ("mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3", "mrseam", "td_attributes", "mrconfigid", "mrowner"),
    "sgx": ("mrenclave", "mrsigner", "isv_prod_id", "isv_svn", "attributes", "config_id"),
}
_REQUIRED: dict[str, type] = {
    "format": str,
    "level": str,
    "tee": str,
    "source": str,
    "measurement": str,
    "manifest": dict,
    "time": int,
    "report_data": str,
    "receipt_key": str,
}


def statement_report_data(statement_bytes: bytes) -> bytes:
    """The 64 bytes the hardware signs for the certificate's evidence: a commitment to the whole statement."""
    return hashlib.sha512(EVIDENCE_CONTEXT + statement_bytes).digest()


def fresh_report_data(report_data: str, nonce: bytes) -> bytes:
    """The 64 bytes the hardware signs for one connection: the key binding and the client's nonce."""
    return hashlib.sha512(FRESH_CONTEXT + bytes.fromhex(report_data) + nonce).digest()


@dataclass(frozen=True, slots=True)
class HwEvidence:
    """Parsed (not yet trusted) hardware evidence."""

    statement: dict[str, Any]
    statement_bytes: bytes
    report: bytes
    auxblob: bytes
    raw: bytes

    @property
    def tee(self) -> str:
        """``"sev-snp"`` or ``"tdx"``."""
        return str(self.statement["tee"])

    @property
    def receipt_key(self) -> bytes:
        """Raw Ed25519 public key that signs receipts."""
        return bytes.fromhex(str(self.statement["receipt_key"]))

    def check_manifest(self) -> None:
        """The measurement must be the digest of the manifest that travels with it."""
        if measurement_of(self.statement["manifest"]) != self.statement["measurement"]:
            msg = "the evidence's measurement is not the digest of its manifest"
            raise MalformedEvidence(msg)


def make_hw_evidence(statement: dict[str, Any], report: bytes, auxblob: bytes) -> bytes:
    """CBOR evidence from a statement and the report made for :func:`statement_report_data` of it."""
    body = canonical_json(statement)
    return bytes(cbor2.dumps(cbor2.CBORTag(HW_TAG, [body, bytes(report), bytes(auxblob)])))


def parse_hw_evidence(raw: bytes, value: Any) -> HwEvidence:
    """The tagged CBOR value (``[statement, report, auxblob]``) as :class:`HwEvidence`; shape errors are typed."""
    if not (isinstance(value, (list, tuple)) and len(value) == 3 and all(isinstance(v, bytes) for v in value)):
        msg = "hardware evidence must be [statement, report, auxblob] byte strings"
        raise MalformedEvidence(msg)
    body, report, aux = value
    statement = parse_statement(body, _REQUIRED, HW_EVIDENCE_FORMAT, "hardware evidence")
    if TEES.get(statement["tee"]) != statement["level"]:
        msg = (
            f"hardware evidence names tee {statement['tee']!r} at level {statement['level']!r} "
            "(expected sev-snp or tdx at sev, sgx at sgx)"
        )
        raise MalformedEvidence(msg)
    try:
        bytes.fromhex(statement["receipt_key"])
        bytes.fromhex(statement["report_data"])
    except ValueError as exc:
        raise MalformedEvidence(str(exc)) from exc
    return HwEvidence(statement, body, report, aux, raw)


def verify_hw_report(tee: str, report: bytes, auxblob: bytes, policy: HardwarePolicy, report_data: bytes) -> Verdict:
    """Verify an SEV-SNP report (with its auxblob certificate table), a TDX or an SGX quote, expecting ``report_data``.

    Raises the verifier's typed error: ``RootNotTrusted`` for a chain to a root neither pinned nor trusted by the
    policy, ``EvidenceSignatureError`` for an altered report, ``KeyBindingError`` when the report data differs.
    """
    from mesatee_notebook.attestation.hardware.sgx import verify_sgx_quote
    from mesatee_notebook.attestation.hardware.snp import certs_from_cert_table, verify_snp_report
    from mesatee_notebook.attestation.hardware.tdx import verify_tdx_quote

    pol = replace(policy, report_data=report_data)
    if tee == "sev-snp":
        table = certs_from_cert_table(auxblob) if auxblob else {}
        chain = b"".join(table[name] for name in ("vcek", "vlek", "ask", "ark") if name in table) or None
        return verify_snp_report(report, chain, pol)
    if tee == "tdx":
        return verify_tdx_quote(report, pol)
    if tee == "sgx":
        return verify_sgx_quote(report, pol)
    msg = f"unknown TEE {tee!r} in hardware evidence"
    raise MalformedEvidence(msg)


def check_same_guest(tee: str, first: Mapping[str, Any], fresh: Mapping[str, Any]) -> None:
    """A connection's fresh report must come from the guest (same launch identity) the certificate's report names.

    ``first`` and ``fresh`` are the verified claims of the two reports.
    """
    for name in IDENTITY_CLAIMS[tee]:
        if first.get(name) != fresh.get(name):
            msg = (
                f"the report made for this connection has another {name} ({str(fresh.get(name))[:16]}…) than "
                f"the certificate's ({str(first.get(name))[:16]}…): another guest answered"
            )
            raise MeasurementMismatch(msg, check="fresh report")
