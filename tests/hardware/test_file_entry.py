"""The CLI entry point ``verify_evidence_file`` and the format sniffer."""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path

import pytest

from mesatee_notebook.attestation.hardware import HardwarePolicy, detect_format, verify_evidence_file
from mesatee_notebook.attestation.hardware._file import parse_as_of
from mesatee_notebook.errors import CertificateExpired, DebugNotAllowed, MalformedEvidence

from .conftest import VECTORS, snp_chain


def test_file_with_as_of_string() -> None:
    v = verify_evidence_file(VECTORS / "tdx/quote_v5_sample.dat", as_of="2026-03-01")
    assert v.claims["body_size"] == 648


def test_file_as_of_before_the_pck_was_issued() -> None:
    with pytest.raises(CertificateExpired):
        verify_evidence_file(VECTORS / "tdx/quote_v5_sample.dat", as_of="2025-01-01")


def test_file_with_cert_chain_and_allow_debug(tmp_path: Path) -> None:
    chain = tmp_path / "chain.pem"
    chain.write_bytes(snp_chain("gosev"))
    with pytest.raises(DebugNotAllowed):
        verify_evidence_file(VECTORS / "snp/gosev_attestation.bin", chain, as_of=date(2026, 3, 1))
    v = verify_evidence_file(VECTORS / "snp/gosev_attestation.bin", chain, as_of=date(2026, 3, 1), allow_debug=True)
    assert v.tee == "sev-snp"


def test_file_policy_fields_are_kept(tmp_path: Path) -> None:
    policy = HardwarePolicy(
        allow_debug=True, mrenclave="0866e7ca11b9f4efe4bf39b2607f4e1299f111920d96d95719080f01b62b7585"
    )
    v = verify_evidence_file(VECTORS / "sgx/gramine-cert.pem", as_of="2026-03-01T00:00:00", policy=policy)
    assert v.check("MRENCLAVE").passed is True


def test_missing_file_and_bad_date(tmp_path: Path) -> None:
    with pytest.raises(MalformedEvidence, match="cannot read"):
        verify_evidence_file(tmp_path / "nope.dat")
    with pytest.raises(MalformedEvidence, match="ISO date"):
        verify_evidence_file(VECTORS / "tdx/quote_v5_sample.dat", as_of="yesterday")


def test_parse_as_of() -> None:
    assert parse_as_of("2024-06-01") == datetime(2024, 6, 1, tzinfo=UTC)
    assert parse_as_of(datetime(2024, 6, 1)) == datetime(2024, 6, 1, tzinfo=UTC)
    assert parse_as_of(None) is None


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("tdx/cos-113-tdx-quote.dat", "tdx"),
        ("sgx/dcap_sample_quote.dat", "sgx"),
        ("snp/gosev_attestation.bin", "sev-snp"),
        ("snp/virtee_report_milan.hex", "sev-snp"),
        ("sgx/rats-tls-cert.pem", "ratls"),
    ],
)
def test_detect_format(name: str, kind: str) -> None:
    assert detect_format((VECTORS / name).read_bytes()) == kind
