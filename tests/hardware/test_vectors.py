"""Every public vector verifies, and its claims are read exactly (dates fixed by ``as_of``)."""

from __future__ import annotations

import pytest

from mesatee_notebook.attestation.hardware import HardwarePolicy, detect_format, verify_evidence
from mesatee_notebook.attestation.hardware._certs import der_sha256, load_certificates
from mesatee_notebook.attestation.hardware._dcap import parse_quote
from mesatee_notebook.attestation.hardware.roots import INTEL_SGX_ROOT_CA_SHA256, intel_anchors
from mesatee_notebook.attestation.levels import Level
from mesatee_notebook.errors import DebugNotAllowed, UntrustedPlatform

from .conftest import AS_OF, AS_OF_RATS_TLS, snp_chain, vec

NOT_CHECKED_DCAP = {"TCB status", "QE identity", "certificate revocation"}


def _passed(verdict_checks: tuple[object, ...]) -> set[str]:
    return {c.name for c in verdict_checks if c.passed is True}  # type: ignore[attr-defined]


def test_pinned_intel_root_is_the_provenance_root() -> None:
    root = load_certificates(vec("tdx/trusted_root.pem"), "root")[0]
    assert der_sha256(root) == INTEL_SGX_ROOT_CA_SHA256
    assert INTEL_SGX_ROOT_CA_SHA256.startswith("44a0196b") and INTEL_SGX_ROOT_CA_SHA256.endswith("d3")
    assert intel_anchors()[0].sha256 == INTEL_SGX_ROOT_CA_SHA256


def test_tdx_v4_prod_quote(policy: HardwarePolicy) -> None:
    v = verify_evidence(vec("tdx/tdx_prod_quote_SPR_E4.dat"), policy=policy)
    assert (v.level, v.tee, v.format) == (Level.SEV, "tdx", "TDX quote v4")
    c = v.claims
    assert (c["quote_version"], c["tee_type"], c["body_type"], c["body_size"]) == (4, "0x81", 2, 584)
    assert c["mrtd"] == (
        "6363b8043668a3ad953278e10389574d326c6749fb78aa810ecd9336923db86f22fc00b8dcd404bc10d5e119d7215cbb"
    )
    assert c["rtmr0"].startswith("2927da70461cd632") and c["rtmr3"] == "00" * 48
    assert c["mrseam"].startswith("2fd279c16164a93d")
    assert c["td_attributes"] == "0000000040000000" and c["debug"] is False
    assert c["report_data"].startswith("6c62dec1b8191749")
    assert c["fmspc"] == "50806f000000"
    assert c["qe_vendor_id"] == "939a7233f79c4ca9940a0db3957f0607"
    assert {"PCK certificate chain", "QE report signature", "QE report binding", "quote signature", "debug"} <= _passed(
        v.checks
    )
    assert {ch.name for ch in v.not_checked} >= NOT_CHECKED_DCAP
    # The go-tdx-guest sample carries 39 unsigned trailing bytes; they are reported, not trusted.
    assert "+39 unsigned trailing bytes ignored" in v.check("quote structure").detail


def test_tdx_v4_cos_quote_zero_padded(policy: HardwarePolicy) -> None:
    data = vec("tdx/cos-113-tdx-quote.dat")
    assert len(data) == 8000
    v = verify_evidence(data, policy=policy)
    c = v.claims
    assert (c["quote_version"], c["tee_type"], c["body_size"]) == (4, "0x81", 584)
    assert c["mrtd"].startswith("dae67181d3d65e07")
    assert c["mrseam"].startswith("ffc97a88587660fb")
    assert c["report_data"] == "00" * 64
    assert c["fmspc"] == "00806f050000"
    assert c["sept_ve_disable"] is True


def test_tdx_v5_quote_tdx15_body(policy: HardwarePolicy) -> None:
    v = verify_evidence(vec("tdx/quote_v5_sample.dat"), policy=policy)
    c = v.claims
    assert (v.format, c["quote_version"], c["body_type"], c["body_size"]) == ("TDX quote v5", 5, 3, 648)
    assert c["mrtd"].startswith("7348651a34b2d2d3")
    assert c["tee_tcb_svn2"] == "0d010400000000000000000000000000"
    assert c["mrservicetd"] == "00" * 48
    assert c["debug"] is False
    assert "body descriptor" in v.check("quote signature").detail


def test_sgx_dcap_sample_refused_under_production_root(debug_policy: HardwarePolicy) -> None:
    with pytest.raises(UntrustedPlatform, match="not trusted") as info:
        verify_evidence(vec("sgx/dcap_sample_quote.dat"), policy=debug_policy)
    assert info.value.details["root_sha256"].startswith("6b389606")
    assert info.value.details["check"] == "PCK certificate chain"


def _dcap_test_root() -> bytes:
    quote = parse_quote(vec("sgx/dcap_sample_quote.dat"))
    root = load_certificates(quote.cert_chain_pem.rstrip(b"\x00"), "chain")[-1]
    assert der_sha256(root).startswith("6b389606")
    from cryptography.hazmat.primitives.serialization import Encoding

    return root.public_bytes(Encoding.PEM)


def test_sgx_dcap_sample_verifies_with_explicit_test_root() -> None:
    policy = HardwarePolicy(as_of=AS_OF, allow_debug=True, extra_trusted_roots=(_dcap_test_root(),))
    v = verify_evidence(vec("sgx/dcap_sample_quote.dat"), policy=policy)
    c = v.claims
    assert (v.level, v.tee, c["quote_version"], c["tee_type"], c["body_size"]) == (Level.SGX, "sgx", 3, "0x00", 384)
    assert c["mrenclave"] == "4f8822f11d5d689ef195c55811bcf8ef88241db6795e4d1f69498d1ab4713953"
    assert c["mrsigner"] == "d412a4f07ef83892a5915fb2ab584be31e186e5a4f95ab5f6950fd4eb8694d7b"
    assert (c["isv_prod_id"], c["isv_svn"], c["debug"]) == (0, 0, True)
    assert c["fmspc"] == "00808e300000"
    assert "explicitly trusted root" in v.check("PCK certificate chain").detail


def test_sgx_dcap_sample_debug_refused_even_with_test_root() -> None:
    policy = HardwarePolicy(as_of=AS_OF, extra_trusted_roots=(_dcap_test_root(),))
    with pytest.raises(DebugNotAllowed, match="debug"):
        verify_evidence(vec("sgx/dcap_sample_quote.dat"), policy=policy)


RATLS = {
    "sgx/gramine-cert.pem": (
        "0866e7ca11b9f4efe4bf39b2607f4e1299f111920d96d95719080f01b62b7585",
        "adc53501f21ced9b998e37a7a18e061c63e00315045fa57a49c18ef0a30d02ca",
        "lenient DER walker",
        "TCG DICE tagged evidence + Gramine legacy extension",
    ),
    "sgx/intel-sgxsdk-cert.pem": (
        "09e218a4be9dadbf7cdc82c45497d6d4f676d3b75445fc37a376f0b65b47de6a",
        "e0c86c51e05ad8592673db348155bddf4bcad6131a5205ce4265c0d795803ba2",
        "cryptography",
        "TCG DICE tagged evidence + Intel SGX SDK extension",
    ),
    "sgx/rats-tls-cert.pem": (
        "38e1b40b8c68186f359c97ecb6a89965d9d8638f2df06fbe18e84d79a266c041",
        "83d719e77deaca1470f6baf62a4d774303c899db69020f9c70ee1dfc08c7ce9e",
        "cryptography",
        "TCG DICE tagged evidence",
    ),
}


@pytest.mark.parametrize("name", sorted(RATLS))
def test_ratls_certificates(name: str) -> None:
    mrenclave, mrsigner, parser, carriers = RATLS[name]
    as_of = AS_OF_RATS_TLS if "rats-tls" in name else AS_OF
    data = vec(name)
    assert detect_format(data) == "ratls"
    v = verify_evidence(data, policy=HardwarePolicy(as_of=as_of, allow_debug=True))
    c = v.claims
    assert (v.level, v.tee, c["quote_version"]) == (Level.SGX, "sgx", 3)
    assert (c["mrenclave"], c["mrsigner"], c["debug"]) == (mrenclave, mrsigner, True)
    assert c["ratls_parser"] == parser
    assert c["ratls_tcg_tag"] == 60000
    assert v.format == f"RA-TLS certificate ({carriers}) with SGX DCAP quote v3"
    assert {"public key hash", "RA-TLS key binding", "certificate signature", "quote signature"} <= _passed(v.checks)
    # The claims carry [1 (sha-256), SHA-256(SPKI)] and the quote commits to SHA-256(claims).
    assert c["ratls_claims"]["pubkey-hash"] == "820158" + "20" + c["ratls_spki_sha256"]


def test_rats_tls_extra_claims_are_reported() -> None:
    v = verify_evidence(vec("sgx/rats-tls-cert.pem"), policy=HardwarePolicy(as_of=AS_OF_RATS_TLS, allow_debug=True))
    assert v.claims["ratls_claims"]["key_0"] == b"value_0\x00".hex()
    assert v.claims["ratls_claims"]["key_1"] == b"value_1\x00".hex()


def test_gramine_legacy_binding_is_sha256_of_spki(debug_policy: HardwarePolicy) -> None:
    v = verify_evidence(vec("sgx/gramine-cert.pem"), policy=debug_policy)
    assert "report_data[0:32] == SHA-256(DER SPKI)" in v.check("Gramine legacy extension").detail


def test_intel_sdk_legacy_extension_is_the_tcg_quote(debug_policy: HardwarePolicy) -> None:
    v = verify_evidence(vec("sgx/intel-sgxsdk-cert.pem"), policy=debug_policy)
    assert "same quote as the TCG extension" in v.check("Intel SGX SDK extension").detail


@pytest.mark.parametrize("name", [*sorted(RATLS), "sgx/dcap_sample_quote.dat"])
def test_debug_sgx_samples_refused_by_default(name: str) -> None:
    as_of = AS_OF_RATS_TLS if "rats-tls" in name else AS_OF
    extra = (_dcap_test_root(),) if name.endswith(".dat") else ()
    with pytest.raises(DebugNotAllowed) as info:
        verify_evidence(vec(name), policy=HardwarePolicy(as_of=as_of, extra_trusted_roots=extra))
    assert info.value.details["check"] == "debug"
    assert "allow_debug" in str(info.value)


def test_snp_gosev_milan_report(debug_policy: HardwarePolicy) -> None:
    v = verify_evidence(vec("snp/gosev_attestation.bin"), cert_chain=snp_chain("gosev"), policy=debug_policy)
    c = v.claims
    assert (v.level, v.tee, c["report_version"], c["product"]) == (Level.SEV, "sev-snp", 2, "Milan")
    assert c["report_data"] == "0102030405" + "00" * 59
    assert c["measurement"].startswith("b07af9620f3b839b")
    assert c["chip_id"].startswith("3ac3fe21e13fb099")
    assert c["reported_tcb"] == "4405000000000002"
    assert c["reported_tcb_parts"] == {"bl": 2, "tee": 0, "snp": 5, "ucode": 68}
    assert (c["policy"], c["debug"], c["policy_smt"]) == ("00000000000b0000", True, True)
    assert c["signing_key"] == "vcek"
    assert {"AMD certificate chain", "report signature", "chip id", "reported TCB"} <= _passed(v.checks)


def test_snp_gosev_debug_guest_refused_by_default(policy: HardwarePolicy) -> None:
    with pytest.raises(DebugNotAllowed, match="debug guest"):
        verify_evidence(vec("snp/gosev_attestation.bin"), cert_chain=snp_chain("gosev"), policy=policy)


def test_snp_virtee_milan_hex_report(policy: HardwarePolicy) -> None:
    data = vec("snp/virtee_report_milan.hex")
    assert len(data) == 2 * 0x4A0 and detect_format(data) == "sev-snp"
    v = verify_evidence(data, cert_chain=snp_chain("virtee"), policy=policy)
    c = v.claims
    assert (c["report_version"], c["product"], c["debug"]) == (2, "Milan", False)
    assert c["measurement"] == (
        "7a1e5c266c0108dbc9bb94fa926951320940915d0aafb42464bd88b579ea158d3e1a0dc39b2c60bd95b9c480cd81841f"
    )
    assert c["chip_id"].startswith("d49554ec717f4e5b")
    assert c["reported_tcb_parts"] == {"bl": 3, "tee": 0, "snp": 8, "ucode": 115}
    assert c["current_firmware"] == "1.52.4"
    assert "ARK-Milan" in v.check("AMD certificate chain").detail
    assert {"TCB status", "certificate revocation"} <= {ch.name for ch in v.not_checked}


def test_snp_vcek_alone_uses_shipped_ask_and_pinned_ark(policy: HardwarePolicy) -> None:
    v = verify_evidence(vec("snp/virtee_report_milan.hex"), cert_chain=vec("snp/virtee_vcek_milan.der"), policy=policy)
    assert v.check("AMD certificate chain").detail.startswith("SEV-VCEK -> SEV-Milan -> ARK-Milan")


def test_snp_policy_values_checked(policy: HardwarePolicy) -> None:
    from dataclasses import replace

    base = verify_evidence(vec("snp/virtee_report_milan.hex"), cert_chain=snp_chain("virtee"), policy=policy)
    strict = replace(
        policy,
        snp_measurement=base.claims["measurement"],
        snp_host_data="00" * 32,
        snp_min_tcb={"bl": 3, "snp": 8, "ucode": 115},
        report_data=base.claims["report_data"][:64],
    )
    v = verify_evidence(vec("snp/virtee_report_milan.hex"), cert_chain=snp_chain("virtee"), policy=strict)
    assert {"measurement", "host data", "minimum TCB", "report data"} <= _passed(v.checks)


def test_render_text_lists_not_checked(policy: HardwarePolicy) -> None:
    text = verify_evidence(vec("tdx/quote_v5_sample.dat"), policy=policy).render_text()
    assert text.startswith("PARTLY VERIFIED TDX quote v5: tee=tdx, level=sev")
    assert "checks are NOT CHECKED (below): this result does not vouch for them" in text
    assert "[NOT CHECKED] TCB status" in text
    assert "mrtd: 7348651a34b2d2d3" in text
