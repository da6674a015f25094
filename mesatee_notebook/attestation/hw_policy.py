"""The client's checks of a kernel at ``sev`` (SEV-SNP/TDX guest) or ``sgx`` (Gramine enclave), in order (pure).

:func:`verify_hw` runs on the RA-TLS certificate (from :func:`~mesatee_notebook.attestation.policy.verify_certificate`);
:func:`hw_hello_request` and :func:`check_hw_hello` add a fresh report per connection, checked before any request.
"""

from __future__ import annotations

import datetime as dt
import secrets
from dataclasses import replace
from typing import Any

from mesatee_notebook.attestation.evidence import parse_evidence
from mesatee_notebook.attestation.hardware._verdict import Verdict
from mesatee_notebook.attestation.hardware.policy import HardwarePolicy
from mesatee_notebook.attestation.hw_evidence import (
    HwEvidence,
    check_same_guest,
    fresh_report_data,
    statement_report_data,
    verify_hw_report,
)
from mesatee_notebook.attestation.levels import Level
from mesatee_notebook.attestation.policy import (
    AttestationReport,
    Check,
    Policy,
    _check_freshness,
    _check_key_binding,
    _check_measurement,
    _check_sandbox,
)
from mesatee_notebook.errors import KeyBindingError, LevelTooLow, MalformedEvidence, ReplayedQuote

__all__ = ["check_hw_hello", "hw_hello_request", "tee_text", "verify_hw"]

_TEE_NAMES = {"sev-snp": "AMD SEV-SNP guest", "tdx": "Intel TDX guest", "sgx": "Intel SGX enclave"}
# (what the launch identity is called, its HardwarePolicy field, its claim in the verdict)
_LAUNCH = {
    "sev-snp": ("MEASUREMENT", "snp_measurement", "measurement"),
    "tdx": ("MRTD", "mrtd", "mrtd"),
    "sgx": ("MRENCLAVE", "mrenclave", "mrenclave"),
}


def tee_text(tee: str | None, vendor_root: bool | None) -> str:
    """``AMD SEV-SNP guest`` or, on a chain the caller trusted explicitly, a loud ``TEST CHAIN`` (never 'hardware')."""
    name = _TEE_NAMES.get(str(tee), str(tee))
    if vendor_root:
        return f"{name} (vendor root)"
    return f"{name.rsplit(' ', 1)[0]} format on a TEST CHAIN you trusted explicitly: NOT hardware, NOT a TEE"


def _hardware_policy(policy: Policy) -> HardwarePolicy:
    return policy.hardware if policy.hardware is not None else HardwarePolicy()


def _root_check(verdict: Verdict) -> Check:
    root = str(verdict.claims.get("root", "?"))
    if verdict.claims.get("vendor_root"):
        return Check("vendor root", True, f"the chain ends at the pinned {root}")
    return Check(
        "vendor root",
        True,
        f"the chain ends at {root}, which this policy trusts explicitly (HardwarePolicy.extra_trusted_roots), NOT "
        "at AMD's or Intel's root: a test chain such as the mimic configfs-tsm tree proves no hardware",
    )


def _launch_check(tee: str, verdict: Verdict, hw: HardwarePolicy) -> Check:
    label, field, claim = _LAUNCH[tee]
    value = str(verdict.claims.get(claim, "?"))
    if hw.expected(field) is None:
        return Check(
            "launch measurement",
            True,
            f"{label} {value[:16]}… is NOT pinned (HardwarePolicy.{field}): any genuine guest could have made the "
            "statement, so the kernel's measurement below is only the guest's own claim",
        )
    return Check("launch measurement", True, f"{label} {value[:16]}… equals the pinned value")


def verify_hw(
    cert_der: bytes,
    spki: bytes,
    evidence: HwEvidence,
    policy: Policy,
    now: dt.datetime,
    check_freshness: bool,
    checks: list[Check],
) -> AttestationReport:
    """Level, hardware report (chain to a trusted root, signature, report data over the statement), then as softtee.

    Then manifest, sandbox, measurement, freshness and key binding (report data = SHA-256(TLS SPKI ‖ receipt key)).
    """
    tee = evidence.tee
    level = Level.SGX if tee == "sgx" else Level.SEV
    checks.append(Check("evidence format", True, f"{evidence.statement['format']} ({tee}) in TCG DICE extension"))
    if policy.min_level > level:
        msg = f"the kernel's level {level.label} ({tee}) is below the policy's minimum {policy.min_level.label}"
        raise LevelTooLow(msg)
    hw = _hardware_policy(policy)
    verdict = verify_hw_report(
        tee, evidence.report, evidence.auxblob, hw, statement_report_data(evidence.statement_bytes)
    )
    vendor = bool(verdict.claims.get("vendor_root"))
    checks.append(Check("level", True, f"{level.label} ≥ minimum {policy.min_level.label} ({tee_text(tee, vendor)})"))
    not_checked = ", ".join(c.name for c in verdict.not_checked if c.name != "report data")
    checks.append(
        Check(
            "hardware report",
            True,
            f"{verdict.format}: signature and chain verify, report data commits to the statement"
            + (f"; NOT CHECKED: {not_checked}" if not_checked else ""),
        )
    )
    checks.append(_root_check(verdict))
    checks.append(_launch_check(tee, verdict, hw))
    evidence.check_manifest()
    sandbox = _check_sandbox(evidence.statement, level, policy, checks)
    measurement, local = _check_measurement(evidence.statement, policy, checks)
    t = _check_freshness(evidence.statement, policy, now, check_freshness, checks)
    _check_key_binding(evidence.statement, spki, evidence.receipt_key, checks)
    return AttestationReport(
        level=level,
        measurement=measurement,
        expected_measurement=local,
        platform=f"{tee} {verdict.claims.get(_LAUNCH[tee][2]) or '?'}"[:48],
        manifest=evidence.statement["manifest"],
        evidence_time=t,
        receipt_key=evidence.receipt_key,
        certificate_der=cert_der,
        evidence=evidence.raw,
        checks=tuple(checks),
        audit_key=str(evidence.statement.get("audit_key") or "") or None,
        sandbox=sandbox,
        hw_tee=tee,
        hw_vendor_root=vendor,
        hw_source=str(evidence.statement["source"]),
        hw_claims=dict(verdict.claims),
    )


def _hw_evidence_of(report: AttestationReport) -> HwEvidence:
    evidence = parse_evidence(report.evidence)
    if not isinstance(evidence, HwEvidence):
        msg = "hardware connection checks only make sense for hardware evidence"
        raise MalformedEvidence(msg)
    return evidence


def hw_hello_request(report: AttestationReport) -> tuple[dict[str, Any], dict[str, bytes]]:
    """A fresh nonce for ``hello`` (in its evidence-nonce field, ``tpm_nonce``); kept for the reply's check."""
    nonce = secrets.token_bytes(32)
    return {"tpm_nonce": nonce}, {"nonce": nonce}


def check_hw_hello(
    report: AttestationReport, kept: dict[str, bytes], reply: dict[str, Any], policy: Policy | None
) -> AttestationReport:
    """``hello.ok`` must carry a report over this connection's nonce, from the same guest, verified as the first."""
    if not kept:
        return report
    evidence = _hw_evidence_of(report)
    fresh = reply.get("hw_report")
    blob = fresh.get("report") if isinstance(fresh, dict) else None
    aux = fresh.get("auxblob", b"") if isinstance(fresh, dict) else b""
    if not isinstance(blob, bytes) or not isinstance(aux, bytes):
        msg = "the kernel sent no hardware report for this connection's nonce: its evidence cannot be shown to be fresh"
        raise ReplayedQuote(msg)
    hw = _hardware_policy(policy) if policy is not None else HardwarePolicy()
    tee = evidence.tee
    try:
        now = verify_hw_report(
            tee, blob, aux or evidence.auxblob, hw, fresh_report_data(evidence.statement["report_data"], kept["nonce"])
        )
    except KeyBindingError as exc:
        msg = (
            "the hardware report sent for this connection does not commit to its nonce (a report replayed from "
            f"another connection): {exc}"
        )
        raise ReplayedQuote(msg) from exc
    check_same_guest(tee, report.hw_claims, now.claims)
    added = Check("fresh report", True, f"{now.format} over this connection's nonce, same guest and launch")
    return replace(report, checks=(*report.checks, added))
