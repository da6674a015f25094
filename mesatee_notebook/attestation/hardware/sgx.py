"""Intel SGX DCAP quotes (v3, and v4/v5 with an SGX body): verify and read the enclave's identity."""

from __future__ import annotations

from typing import Any

from mesatee_notebook.attestation.hardware import _dcap
from mesatee_notebook.attestation.hardware._checks import check_debug, check_equal, check_min, check_report_data
from mesatee_notebook.attestation.hardware._errors import malformed
from mesatee_notebook.attestation.hardware._verdict import Check, Verdict
from mesatee_notebook.attestation.hardware.policy import HardwarePolicy
from mesatee_notebook.attestation.levels import Level

__all__ = ["parse_sgx_quote", "verify_sgx_quote"]

_HEADER = "quote header"


def parse_sgx_quote(data: bytes) -> tuple[_dcap.DcapQuote, dict[str, Any]]:
    """Parse an SGX quote and decode its report body (no verification)."""
    quote = _dcap.parse_quote(data)
    if quote.body_type != _dcap.BODY_SGX:
        raise malformed(_HEADER, "this is a TDX quote, not an SGX quote")
    return quote, _dcap.sgx_report_fields(quote.body)


def verify_sgx_quote(data: bytes, policy: HardwarePolicy | None = None) -> Verdict:
    """Verify an SGX DCAP quote to the pinned Intel root and check it against ``policy``."""
    policy = policy or HardwarePolicy()
    quote, body = parse_sgx_quote(data)
    checks, qe_claims = _dcap.verify_quote(quote, policy)
    claims: dict[str, Any] = {
        "tee": "sgx",
        "quote_version": quote.version,
        "tee_type": f"0x{quote.tee_type:02x}",
        "body_size": len(quote.body),
        **body,
        **qe_claims,
    }
    checks += sgx_policy_checks(body, policy)
    checks += _dcap.collateral_not_checked(claims)
    return Verdict(Level.SGX, "sgx", f"SGX DCAP quote v{quote.version}", claims, tuple(checks))


def sgx_policy_checks(body: dict[str, Any], policy: HardwarePolicy) -> list[Check]:
    """Debug, identity and report-data checks on a decoded SGX report body."""
    checks = [check_debug(bool(body["debug"]), policy.allow_debug, "enclave")]
    checks.append(check_equal("MRENCLAVE", body["mrenclave"], policy.expected("mrenclave")))
    checks.append(check_equal("MRSIGNER", body["mrsigner"], policy.expected("mrsigner")))
    prod = None if policy.isv_prod_id is None else str(policy.isv_prod_id)
    checks.append(check_equal("ISVPRODID", str(body["isv_prod_id"]), prod))
    checks.append(check_min("ISVSVN", int(body["isv_svn"]), policy.min_isv_svn))
    checks.append(check_report_data(bytes.fromhex(body["report_data"]), policy.expected("report_data")))
    return checks
