"""Vectors and fixed dates for the hardware evidence tests (files copied unchanged; see vectors/PROVENANCE.md)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from mesatee_notebook.attestation.hardware import HardwarePolicy

VECTORS = Path(__file__).parent / "vectors"
# Every vector's certificates are valid on this date, except the rats-tls certificate (2023-02-22..2024-02-22).
AS_OF = datetime(2026, 3, 1, tzinfo=UTC)
AS_OF_RATS_TLS = datetime(2023, 6, 1, tzinfo=UTC)


def vec(name: str) -> bytes:
    """The bytes of one vector file."""
    return (VECTORS / name).read_bytes()


def snp_chain(name: str) -> bytes:
    """VCEK (DER) followed by the ASK+ARK PEM chain, as a caller would pass it."""
    if name == "gosev":
        return vec("snp/gosev_vcek.testcer") + vec("snp/gosev_ask_ark_milan.pem")
    return vec("snp/virtee_vcek_milan.der") + vec("snp/virtee_cert_chain_milan")


@pytest.fixture
def policy() -> HardwarePolicy:
    """Default policy (no debug) with the fixed date."""
    return HardwarePolicy(as_of=AS_OF)


@pytest.fixture
def debug_policy() -> HardwarePolicy:
    """Allows debug enclaves: every SGX sample comes from one."""
    return HardwarePolicy(as_of=AS_OF, allow_debug=True)
