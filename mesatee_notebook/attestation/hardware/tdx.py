"""Intel TDX quotes (v4; v5 with TDX 1.0 or 1.5 bodies): verify and read the TD's measurements."""

from __future__ import annotations

import struct
from typing import Any

from mesatee_notebook.attestation.hardware import _dcap
from mesatee_notebook.attestation.hardware._checks import check_debug, check_equal, check_report_data
from mesatee_notebook.attestation.hardware._errors import malformed
from mesatee_notebook.attestation.hardware._verdict import Check, Verdict
from mesatee_notebook.attestation.hardware.policy import HardwarePolicy
from mesatee_notebook.attestation.levels import Level

__all__ = ["TD_ATTR_DEBUG", "parse_td_report", "parse_tdx_quote", "verify_tdx_quote"]

_HEADER = "quote header"
_TD_BODY = "TD report body"

TD_ATTR_DEBUG = 1 << 0
_TD_ATTR_SEPT_VE_DISABLE = 1 << 28

# (name, offset, size) in the TD report body (TDX 1.0, 584 bytes; 1.5 appends the last two).
_FIELDS = (
    ("tee_tcb_svn", 0, 16),
    ("mrseam", 16, 48),
    ("mrsignerseam", 64, 48),
    ("seam_attributes", 112, 8),
    ("td_attributes", 120, 8),
    ("xfam", 128, 8),
    ("mrtd", 136, 48),
    ("mrconfigid", 184, 48),
    ("mrowner", 232, 48),
    ("mrownerconfig", 280, 48),
    ("rtmr0", 328, 48),
    ("rtmr1", 376, 48),
    ("rtmr2", 424, 48),
    ("rtmr3", 472, 48),
    ("report_data", 520, 64),
)
_FIELDS_15 = (("tee_tcb_svn2", 584, 16), ("mrservicetd", 600, 48))


def parse_td_report(body: bytes) -> dict[str, Any]:
    """Decode a TD report body (584 or 648 bytes) into hex fields plus the debug flag."""
    if len(body) not in (584, 648):
        raise malformed(_TD_BODY, f"must be 584 or 648 bytes, got {len(body)}")
    fields = _FIELDS + (_FIELDS_15 if len(body) == 648 else ())
    out: dict[str, Any] = {name: body[off : off + size].hex() for name, off, size in fields}
    (attrs,) = struct.unpack_from("<Q", body, 120)
    out["td_attributes"] = f"{attrs:016x}"
    out["debug"] = bool(attrs & TD_ATTR_DEBUG)
    out["sept_ve_disable"] = bool(attrs & _TD_ATTR_SEPT_VE_DISABLE)
    return out


def parse_tdx_quote(data: bytes) -> tuple[_dcap.DcapQuote, dict[str, Any]]:
    """Parse a TDX quote and decode its TD report (no verification)."""
    quote = _dcap.parse_quote(data)
    if quote.body_type == _dcap.BODY_SGX:
        raise malformed(_HEADER, "this is an SGX quote, not a TDX quote")
    return quote, parse_td_report(quote.body)


def verify_tdx_quote(data: bytes, policy: HardwarePolicy | None = None) -> Verdict:
    """Verify a TDX quote to the pinned Intel root and check it against ``policy``."""
    policy = policy or HardwarePolicy()
    quote, body = parse_tdx_quote(data)
    checks, qe_claims = _dcap.verify_quote(quote, policy)
    claims: dict[str, Any] = {
        "tee": "tdx",
        "quote_version": quote.version,
        "tee_type": f"0x{quote.tee_type:02x}",
        "body_type": quote.body_type,
        "body_size": len(quote.body),
        **body,
        **qe_claims,
    }
    checks += tdx_policy_checks(body, policy)
    checks += _dcap.collateral_not_checked(claims)
    checks.append(
        Check("MRSEAM / TDX module", None, "needs Intel TDX module identity in TCB Info (collateral not supplied)")
    )
    return Verdict(Level.SEV, "tdx", f"TDX quote v{quote.version}", claims, tuple(checks))


def tdx_policy_checks(body: dict[str, Any], policy: HardwarePolicy) -> list[Check]:
    """Debug, MRTD/RTMR and report-data checks on a decoded TD report."""
    checks = [check_debug(bool(body["debug"]), policy.allow_debug, "TD")]
    checks.append(check_equal("MRTD", body["mrtd"], policy.expected("mrtd")))
    checks += [check_equal(f"RTMR{i}", body[f"rtmr{i}"], policy.expected_rtmr(i)) for i in range(4)]
    checks.append(check_report_data(bytes.fromhex(body["report_data"]), policy.expected("report_data")))
    return checks
