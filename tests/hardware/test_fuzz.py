"""Hypothesis fuzz: on random and mutated bytes, parsers and verifiers raise only typed errors."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesatee_notebook.attestation.hardware import HardwarePolicy, verify_evidence
from mesatee_notebook.attestation.hardware._certs import load_certificates, parse_cert_view
from mesatee_notebook.attestation.hardware._dcap import parse_quote
from mesatee_notebook.attestation.hardware.ratls import read_ratls_certificate
from mesatee_notebook.attestation.hardware.snp import certs_from_cert_table, parse_snp_report
from mesatee_notebook.attestation.hardware.tdx import parse_tdx_quote
from mesatee_notebook.errors import AttestationError

from .conftest import AS_OF, snp_chain, vec

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
POLICY = HardwarePolicy(as_of=AS_OF, allow_debug=True)
SEEDS = {
    "tdx": vec("tdx/tdx_prod_quote_SPR_E4.dat"),
    "tdx5": vec("tdx/quote_v5_sample.dat"),
    "sgx": vec("sgx/dcap_sample_quote.dat"),
    "snp": vec("snp/gosev_attestation.bin"),
    "snphex": vec("snp/virtee_report_milan.hex"),
    "gramine": vec("sgx/gramine-cert.pem"),
    "sdk": vec("sgx/intel-sgxsdk-cert.pem"),
}


@st.composite
def mutated(draw: st.DrawFn, seed: bytes) -> bytes:
    """A seed vector with a few flipped, deleted, inserted or truncated bytes."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        op = draw(st.sampled_from(["flip", "delete", "insert", "truncate", "set"]))
        pos = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 16))]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "truncate":
            del data[pos:]
        else:
            data[pos] = draw(st.sampled_from([0x00, 0xFF, 0x30, 0x80, 0x82]))
    return bytes(data)


def only_typed(fn: Callable[[bytes], object], data: bytes) -> None:
    with contextlib.suppress(AttestationError):
        fn(data)


PARSERS: dict[str, Callable[[bytes], object]] = {
    "parse_quote": parse_quote,
    "parse_tdx_quote": parse_tdx_quote,
    "parse_snp_report": parse_snp_report,
    "read_ratls_certificate": read_ratls_certificate,
    "parse_cert_view": parse_cert_view,
    "load_certificates": lambda d: load_certificates(d, "fuzz"),
    "certs_from_cert_table": certs_from_cert_table,
    "verify_evidence": lambda d: verify_evidence(d, policy=POLICY),
}


@pytest.mark.parametrize("name", sorted(PARSERS))
@FUZZ
@given(data=st.binary(max_size=2048))
def test_random_bytes(name: str, data: bytes) -> None:
    only_typed(PARSERS[name], data)


@pytest.mark.parametrize("seed", sorted(SEEDS))
@FUZZ
@given(data=st.data())
def test_mutated_vectors_through_verify_evidence(seed: str, data: st.DataObject) -> None:
    blob = data.draw(mutated(SEEDS[seed]))
    chain = snp_chain("gosev" if seed == "snp" else "virtee") if seed.startswith("snp") else None
    only_typed(lambda d: verify_evidence(d, cert_chain=chain, policy=POLICY), blob)


@FUZZ
@given(data=st.data())
def test_mutated_snp_chains(data: st.DataObject) -> None:
    chain = data.draw(mutated(snp_chain("virtee")))
    only_typed(lambda d: verify_evidence(d, cert_chain=chain, policy=POLICY), vec("snp/virtee_report_milan.hex"))


@FUZZ
@given(data=st.data())
def test_mutated_der_certificates(data: st.DataObject) -> None:
    from mesatee_notebook.attestation.hardware.ratls import certificate_der

    der = certificate_der(SEEDS["gramine"])
    blob = data.draw(mutated(der))
    only_typed(parse_cert_view, blob)
    only_typed(lambda d: verify_evidence(d, policy=POLICY), blob)


@pytest.mark.parametrize("value", [b"\xd9", b"\xd8\x40\x82\x41", b"\xc1\x82\x41x\x41\xff", b"\x1c"])
def test_broken_cbor_in_a_tcg_extension_is_malformed_evidence(value: bytes) -> None:
    """cbor2 6's CBORDecodeError is no longer a ValueError: it must still become a typed AttestationError."""
    import cbor2

    from mesatee_notebook.attestation.hardware._certs import CertExtension
    from mesatee_notebook.attestation.hardware.ratls import _decode_tcg

    with pytest.raises(cbor2.CBORError):  # truncated, or a reserved/invalid item: broken CBOR to cbor2 itself
        cbor2.loads(value)
    with pytest.raises(AttestationError, match="cannot be parsed"):
        _decode_tcg(CertExtension("2.23.133.5.4.9", False, value))
