"""Attestation refusals: each a typed AttestationError naming the check, before any request byte is sent."""

from __future__ import annotations

import datetime as dt
import ssl
import time

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

import mesatee_notebook as mn
from mesatee_notebook.attestation.evidence import make_evidence, parse_evidence
from mesatee_notebook.attestation.ratls import build_ratls_certificate, evidence_from_certificate, load_certificate
from mesatee_notebook.enclave.platform import load_platform
from mesatee_notebook.errors import (
    CertificateExpired,
    EvidenceSignatureError,
    KeyBindingError,
    LevelTooLow,
    MeasurementMismatch,
    StaleEvidence,
    UnprotectedNotAllowed,
    UntrustedPlatform,
)
from tests.core.fakes import FakeKernel, now
from tests.waiting import PATIENCE

pytestmark = pytest.mark.process


def _kernel_cert(kernel) -> bytes:
    pem = ssl.get_server_certificate((kernel.host, kernel.port))
    return ssl.PEM_cert_to_DER_cert(pem)


def _cert_with(evidence: bytes, key=None, *, not_before=None, not_after=None):
    key = key or ec.generate_private_key(ec.SECP256R1())
    nb = not_before or now() - dt.timedelta(minutes=1)
    na = not_after or now() + dt.timedelta(days=1)
    cert = build_ratls_certificate(key, evidence, not_before=nb, not_after=na)
    return cert, key


_REAL = object()


def _genuine_evidence(kernel, key, *, time_=None, manifest=None, receipt_key=b"\x01" * 32, sandbox=_REAL):
    platform = load_platform(kernel.data_dir)
    real = parse_evidence(evidence_from_certificate(load_certificate(_kernel_cert(kernel)))).statement
    if manifest is None:  # the manifest the real kernel attests, so only the tested field differs
        manifest = real["manifest"]
    spki = key.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return make_evidence(
        level=mn.Level.SOFTTEE,
        manifest=manifest,
        tls_spki_der=spki,
        receipt_key=receipt_key,
        time=int(time_ or time.time()),
        platform_key=platform.key,
        sandbox=real["sandbox"] if sandbox is _REAL else sandbox,
    )


def _refused_before_any_byte(fake: FakeKernel, policy, exc_type) -> Exception:
    with pytest.raises(exc_type) as info:
        mn.connect(fake.url, policy=policy)
    assert fake.done.wait(PATIENCE), "the fake kernel never saw the client hang up"
    assert fake.handshakes == 1, "the TLS handshake itself must have completed"
    assert bytes(fake.received) == b"", "no request byte may be sent before attestation passes"
    return info.value


def test_genuine_fake_is_accepted_then_bytes_flow(kernel):
    """Control: the same fake with genuine evidence passes attestation, and only then does the client send."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert, _ = _cert_with(_genuine_evidence(kernel, key), key)
    fake = FakeKernel(cert.public_bytes(Encoding.PEM), key)
    with pytest.raises(mn.MesateeError):  # the fake never answers hello
        mn.connect(fake.url, policy=kernel.policy(), timeout=5)
    assert fake.done.wait(PATIENCE), "the fake kernel never saw the client hang up"
    assert fake.received.startswith(b"MTEE")


def test_unsandboxed_kernel_is_refused_before_any_byte(kernel):
    """Genuine platform, measurement and keys, but no sandbox in the signed statement: SandboxRequired, no byte sent."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert, _ = _cert_with(_genuine_evidence(kernel, key, sandbox=None), key)
    fake = FakeKernel(cert.public_bytes(Encoding.PEM), key)
    exc = _refused_before_any_byte(fake, kernel.policy(), mn.SandboxRequired)
    assert "WITHOUT a sandbox" in str(exc)


def test_wrong_measurement(kernel):
    err = _refused_before_any_byte_real(kernel, kernel.policy(measurements=["00" * 32]), MeasurementMismatch)
    assert err.check == "measurement"


def _refused_before_any_byte_real(kernel, policy, exc_type):
    with pytest.raises(exc_type) as info:
        mn.connect(kernel.url, policy=policy)
    return info.value


def test_untrusted_platform_root(kernel):
    err = _refused_before_any_byte_real(kernel, mn.Policy(platform_roots=["ab" * 32]), UntrustedPlatform)
    assert "does not pin" in str(err)


def test_level_below_minimum(kernel):
    err = _refused_before_any_byte_real(kernel, kernel.policy(min_level="sgx"), LevelTooLow)
    assert "below the policy's minimum sgx" in str(err)


def test_relay_presenting_another_key_is_refused(kernel):
    """A MITM copies the kernel's genuine evidence into its own certificate: the key binding fails."""
    genuine = load_certificate(_kernel_cert(kernel))
    evidence = evidence_from_certificate(genuine)
    cert, key = _cert_with(evidence)
    fake = FakeKernel(cert.public_bytes(Encoding.PEM), key)
    err = _refused_before_any_byte(fake, kernel.policy(), KeyBindingError)
    assert "man-in-the-middle" in str(err)


def test_tampered_evidence_bytes(kernel):
    key = ec.generate_private_key(ec.SECP256R1())
    evidence = bytearray(_genuine_evidence(kernel, key))
    i = evidence.index(b'"time":') + len(b'"time":') + 3  # a digit of the signed time
    evidence[i] = ord("0") if evidence[i] != ord("0") else ord("1")
    cert, _ = _cert_with(bytes(evidence), key)
    fake = FakeKernel(cert.public_bytes(Encoding.PEM), key)
    _refused_before_any_byte(fake, kernel.policy(), EvidenceSignatureError)


def test_stale_evidence(kernel):
    key = ec.generate_private_key(ec.SECP256R1())
    cert, _ = _cert_with(_genuine_evidence(kernel, key, time_=time.time() - 3 * 86400), key)
    fake = FakeKernel(cert.public_bytes(Encoding.PEM), key)
    err = _refused_before_any_byte(fake, kernel.policy(), StaleEvidence)
    assert err.check == "freshness"


def test_expired_certificate(kernel):
    key = ec.generate_private_key(ec.SECP256R1())
    cert, _ = _cert_with(
        _genuine_evidence(kernel, key),
        key,
        not_before=now() - dt.timedelta(days=3),
        not_after=now() - dt.timedelta(days=1),
    )
    fake = FakeKernel(cert.public_bytes(Encoding.PEM), key)
    _refused_before_any_byte(fake, kernel.policy(), CertificateExpired)


@pytest.mark.slow
def test_unprotected_needs_opt_in_and_warns_every_time(tmp_path):
    from tests.conftest import start_kernel, stop_kernel

    k = start_kernel(tmp_path / "u", level="unprotected")
    try:
        with pytest.raises(UnprotectedNotAllowed, match="UNPROTECTED"):
            mn.connect(k.url, policy=mn.Policy(measurements=[k.measurement]))
        for _ in range(2):
            with pytest.warns(mn.UnprotectedWarning, match="UNPROTECTED"):
                s = mn.connect(k.url, policy=mn.Policy(measurements=[k.measurement]), allow_unprotected=True)
            assert s.attestation.level is mn.Level.UNPROTECTED
            assert "UNPROTECTED" in repr(s.attestation)
            assert s.run("1 + 1").value == 2
            with pytest.raises(mn.PolicyViolation, match="sealing"):
                s.run("mesatee.open('x', 'w').close()")
            s.close()
    finally:
        stop_kernel(k)


def test_hardware_levels_are_not_available_here(tmp_path):
    from mesatee_notebook.enclave.kernel import Kernel, KernelConfig

    for level in (mn.Level.TPM, mn.Level.SEV, mn.Level.SGX):
        with pytest.raises(mn.LevelNotAvailableError, match="not available on this platform"):
            Kernel(KernelConfig(data_dir=tmp_path, level=level))


def test_tampered_receipt_and_wrong_nonce_are_refused(kernel):
    s = mn.connect(kernel.url, policy=kernel.policy())
    try:
        r = s.run("x = 5\nx * 2", outputs=["x"])
    finally:
        s.close()
    mn.verify_receipt(r.receipt, kernel.policy(), nonce=r.verified.predicate["nonce"])
    with pytest.raises(mn.ReceiptError, match="nonce"):
        mn.verify_receipt(r.receipt, kernel.policy(), nonce="f" * 32)
    import base64
    import json

    bundle = json.loads(r.receipt.to_json())
    payload = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    payload["subject"][0]["digest"]["sha256"] = "0" * 64
    bundle["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
    with pytest.raises(mn.ReceiptError, match="signature"):
        mn.verify_receipt(bundle, kernel.policy())
    with pytest.raises(UntrustedPlatform):
        mn.verify_receipt(r.receipt, mn.Policy(platform_roots=["cd" * 32]))
    with pytest.raises(mn.ReceiptError, match="output 'out/x'"):
        mn.verify_receipt(r.receipt, kernel.policy(), outputs={**r.receipt.subjects, "out/x": "1" * 64})


def test_measured_tree_walk_lists_what_sorted_rglob_lists(tmp_path):
    """The manifest's file walk (os.scandir) keeps the order and choices of ``sorted(rglob("*"))`` + ``is_file``."""
    from mesatee_notebook.attestation.measurement import _tree_files

    base = tmp_path / "tree"
    for rel in ("a/b/x.so", "a-c/y.so", "a/z", ".hidden.so", "a/b/c/d.so.1", "A/upper.so", "a b/space.so"):
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        (base / rel).write_bytes(rel.encode())
    (base / "link.so").symlink_to(base / "a" / "b" / "x.so")  # a symlink to a file counts
    (base / "dirlink").symlink_to(base / "a")  # a symlinked directory is not entered
    (base / "broken.so").symlink_to(base / "nowhere")  # a dangling symlink is no file
    expected = [p for p in sorted(base.rglob("*")) if p.is_file()]
    assert _tree_files(base) == expected and len(expected) == 8
    assert _tree_files(base, lambda name: ".so" in name) == [p for p in expected if ".so" in p.name]


def test_measurement_changes_when_one_byte_of_enclave_code_changes(tmp_path):
    import shutil

    from mesatee_notebook.attestation.measurement import expected_measurement

    pkg = tmp_path / "pkg"
    src = __import__("mesatee_notebook").__path__[0]
    shutil.copytree(src, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    before = expected_measurement(pkg)
    assert before == expected_measurement(pkg)
    target = pkg / "enclave" / "kernel.py"
    data = bytearray(target.read_bytes())
    data[100] ^= 0x20
    target.write_bytes(bytes(data))
    assert expected_measurement(pkg) != before
    # files outside the measured subpackages do not change it
    (pkg / "cli.py").write_text("# changed\n")
    target.write_bytes(bytes(data))
    assert expected_measurement(pkg) == expected_measurement(pkg)
