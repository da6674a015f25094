"""Policy checks shared by the SGX, TDX and SEV-SNP verifiers."""

from __future__ import annotations

from mesatee_notebook.attestation.hardware._errors import refuse
from mesatee_notebook.attestation.hardware._verdict import Check
from mesatee_notebook.errors import DebugNotAllowed, KeyBindingError, MeasurementMismatch

__all__ = ["check_debug", "check_equal", "check_min", "check_report_data"]


def check_debug(debug: bool, allow_debug: bool, what: str) -> Check:
    """Refuse a debug enclave/guest unless the policy allows debug."""
    if not debug:
        return Check("debug", True, f"not a debug {what}")
    if not allow_debug:
        raise refuse(
            DebugNotAllowed,
            "debug",
            f"this is a debug {what}: the host can read its memory; "
            "refused because the policy does not set allow_debug=True",
        )
    return Check("debug", True, f"DEBUG {what}, accepted only because the policy sets allow_debug=True")


def check_equal(name: str, actual: str, expected: str | None) -> Check:
    """Compare a measured identity (hex) with the policy's expected value, if any."""
    if expected is None:
        return Check(name, None, f"the policy sets no expected {name} (value {actual})")
    if actual != expected:
        raise refuse(MeasurementMismatch, name, f"got {actual}, the policy expects {expected}")
    return Check(name, True, f"equals the expected {expected}")


def check_min(name: str, actual: int, minimum: int | None) -> Check:
    """Compare a version number with the policy's minimum, if any."""
    if minimum is None:
        return Check(name, None, f"the policy sets no minimum {name} (value {actual})")
    if actual < minimum:
        raise refuse(MeasurementMismatch, name, f"{actual} is below the policy's minimum {minimum}")
    return Check(name, True, f"{actual} >= {minimum}")


def check_report_data(actual: bytes, expected_hex: str | None) -> Check:
    """Check that the report data starts with the policy's expected bytes (the key binding)."""
    if expected_hex is None:
        return Check("report data", None, "the policy sets no expected report data; the caller must bind it")
    expected = bytes.fromhex(expected_hex)
    if actual[: len(expected)] != expected:
        raise refuse(
            KeyBindingError,
            "report data",
            f"the first {len(expected)} bytes are {actual[: len(expected)].hex()}, expected {expected_hex}",
        )
    return Check("report data", True, f"the first {len(expected)} bytes match the expected value")
