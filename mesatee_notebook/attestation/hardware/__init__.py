"""Verification of real hardware evidence: Intel SGX and TDX DCAP quotes, AMD SEV-SNP reports, RA-TLS.

Pure Python on ``cryptography``; no network. Only signatures, certificate chains to pinned
vendor roots, bindings and the caller's policy are checked. TCB status, QE identity and
revocation need vendor collateral that is not fetched; a :class:`Verdict` lists them as
NOT CHECKED rather than claiming them.
"""

from __future__ import annotations

from mesatee_notebook.attestation.hardware._detect import detect_format, verify_evidence
from mesatee_notebook.attestation.hardware._file import verify_evidence_file
from mesatee_notebook.attestation.hardware._verdict import Check, Verdict
from mesatee_notebook.attestation.hardware.policy import HardwarePolicy

__all__ = ["Check", "HardwarePolicy", "Verdict", "detect_format", "verify_evidence", "verify_evidence_file"]
