"""ECC P-256 EKs (TCG L-2): the client's TPM2_MakeCredential by ECDH + KDFe, activated by a real TPM."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

import mesatee_notebook as mn
from mesatee_notebook.attestation.tpm import AkPublic, make_credential
from mesatee_notebook.enclave.tpm import Tpm, open_tpm
from tests.conftest import start_kernel, stop_kernel
from tests.tpm.conftest import Swtpm, tpm_info


@pytest.fixture
def ecc_tpm(ecc_swtpm: Swtpm) -> Iterator[Tpm]:
    """Per test: swtpm has three object slots, and the kernel test below needs two of them."""
    with open_tpm(ecc_swtpm.tcti, app_pcr=16, ek="ecc") as tpm:
        yield tpm


def test_the_ecc_ek_is_loaded_and_certified(ecc_tpm: Tpm, ecc_swtpm: Swtpm) -> None:
    assert ecc_tpm.ek_kind == "ecc"
    key = x509.load_der_x509_certificate(ecc_tpm.ek_cert).public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"


def test_make_credential_for_an_ecc_ek_is_activated_by_the_tpm(ecc_tpm: Tpm) -> None:
    key = x509.load_der_x509_certificate(ecc_tpm.ek_cert).public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    credential = secrets.token_bytes(32)
    blob, secret = make_credential(key, credential, AkPublic.parse(ecc_tpm.ak_public).name)
    assert ecc_tpm.activate_credential(blob, secret) == credential
    # bound to the AK's name: a credential made for another object's name does not activate
    blob, secret = make_credential(key, credential, b"\x00\x0b" + bytes(32))
    with pytest.raises(ecc_tpm.challenge_errors):
        ecc_tpm.activate_credential(blob, secret)


def test_ecc_matches_tpm2_pytss_make_credential(ecc_tpm: Tpm) -> None:
    """Cross-check: tpm2-pytss's own MakeCredential for the same EK is activated too (same TPM, same AK)."""
    from tpm2_pytss import TPM2B_PUBLIC
    from tpm2_pytss.utils import NVReadEK, create_ek_template
    from tpm2_pytss.utils import make_credential as pytss_make_credential

    _, template = create_ek_template("EK-ECC256", NVReadEK(ecc_tpm._esapi))
    key = x509.load_der_x509_certificate(ecc_tpm.ek_cert).public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    numbers = key.public_numbers()
    template.publicArea.unique.ecc.x = numbers.x.to_bytes(32, "big")
    template.publicArea.unique.ecc.y = numbers.y.to_bytes(32, "big")
    name = AkPublic.parse(ecc_tpm.ak_public).name
    blob, secret = pytss_make_credential(TPM2B_PUBLIC(publicArea=template.publicArea), b"x" * 16, name)
    assert ecc_tpm.activate_credential(bytes(blob), bytes(secret)) == b"x" * 16


@pytest.mark.slow
def test_a_kernel_with_an_ecc_ek_is_activated_on_connect(ecc_swtpm: Swtpm, tmp_path: object) -> None:
    from pathlib import Path

    assert isinstance(tmp_path, Path)
    k = start_kernel(tmp_path / "k", "--tcti", ecc_swtpm.tcti, "--tpm-app-pcr", "16", "--tpm-ek", "ecc", level="tpm")
    try:
        policy = mn.Policy(tpm_ek_roots=ecc_swtpm.ek_roots, measurements=[k.measurement], min_level="tpm")
        with mn.connect(k.url, policy=policy) as s:
            checks = {c.name: c.detail for c in s.attestation.checks}
            assert "EK chain" in checks and "credential activation" in checks
            assert "earlier connection" not in checks["credential activation"]
            assert s.attestation.tpm_kind == "software"
            assert s.run("6 * 7").value == 42
        assert tpm_info(ecc_swtpm.tcti)  # the AK is the same primary whatever the EK kind
    finally:
        stop_kernel(k)
