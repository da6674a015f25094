"""serve --level sev-snp|tdx|sgx end to end on a MIMIC configfs-tsm (Gramine) tree signed by a test-only chain.

These are NOT hardware tests. They run the file ABI (MimicTsm plays configfs's kernel side), the kernel's evidence and
the client's verifiers (the same ones a real SNP/TDX report meets) against reports a test "firmware" signs with keys
generated here (tests/hardware/mimic.py). Only a policy that trusts the test root explicitly accepts them, and every
display says TEST CHAIN / NOT hardware.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

import mesatee_notebook as mn
from mesatee_notebook.attestation.hardware import HardwarePolicy
from mesatee_notebook.attestation.hw_evidence import HW_TAG
from mesatee_notebook.attestation.policy import verify_certificate
from mesatee_notebook.attestation.ratls import build_ratls_certificate, evidence_from_certificate, load_certificate
from mesatee_notebook.enclave.hw_providers import MIMIC_ENV
from mesatee_notebook.errors import (
    EvidenceSignatureError,
    KeyBindingError,
    LevelTooLow,
    MalformedEvidence,
    MeasurementMismatch,
    ReplayedQuote,
    RootNotTrusted,
    UntrustedPlatform,
)
from tests.conftest import KernelProc, start_kernel, stop_kernel
from tests.hardware.mimic import MimicFirmware

TEES = ["sev-snp", "tdx", "sgx"]
LEVELS = {"sev-snp": "sev", "tdx": "sev", "sgx": "sgx"}
FLIP = {"sev-snp": 0x90, "tdx": 48 + 136, "sgx": 48 + 64}  # a signed byte: measurement, MRTD, MRENCLAVE


@dataclass
class HwKernel:
    kernel: KernelProc
    firmware: MimicFirmware
    tee: str

    def policy(self, *, trust_test_root: bool = True, **kw: Any) -> mn.Policy:
        roots = (self.firmware.root_pem,) if trust_test_root else ()
        kw.setdefault("measurements", [self.kernel.measurement])
        kw.setdefault("min_level", LEVELS[self.tee])
        return mn.Policy(hardware=HardwarePolicy(extra_trusted_roots=roots), **kw)

    def certificate(self) -> bytes:
        from mesatee_notebook.wire.comm import connect

        comm = connect(self.kernel.url, timeout=30)
        try:
            der = comm.peer_certificate()
            assert der
            return der
        finally:
            comm.close()


@pytest.fixture(scope="module", params=TEES)
def hw_kernel(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HwKernel]:
    """A real kernel serving at --level <tee> on a mimic tree whose firmware runs in this process."""
    tee = str(request.param)
    firmware = MimicFirmware(tmp_path_factory.mktemp(f"mimic-{tee}"), tee)
    old = os.environ.get(MIMIC_ENV)
    os.environ[MIMIC_ENV] = "1"
    try:
        k = start_kernel(tmp_path_factory.mktemp(f"kernel-{tee}"), "--hw-root", str(firmware.root), level=tee)
    finally:
        if old is None:
            os.environ.pop(MIMIC_ENV, None)
        else:
            os.environ[MIMIC_ENV] = old
    yield HwKernel(k, firmware, tee)
    stop_kernel(k)
    firmware.close()


def test_attested_runs_a_cell_and_the_receipt_names_the_level(hw_kernel: HwKernel) -> None:
    policy = hw_kernel.policy()
    s = mn.connect(hw_kernel.kernel.url, policy=policy)
    try:
        a = s.attestation
        assert a.level is mn.Level.parse(LEVELS[hw_kernel.tee]) and a.hw_tee == hw_kernel.tee
        assert a.hw_source == "mimic"
        assert a.hw_vendor_root is False
        assert "TEST CHAIN" in a.level_text and "NOT hardware" in a.level_text and "NOT a TEE" in a.trust_note
        names = [c.name for c in a.checks]
        for check in ("hardware report", "vendor root", "launch measurement", "measurement", "key binding"):
            assert check in names
        assert names[-1] == "fresh report"
        assert "NOT at AMD's or Intel's root" in {c.name: c.detail for c in a.checks}["vendor root"]
        r = s.run("x = 6 * 7\nx", outputs=["x"])
        assert r.value == 42 and r.outputs["x"] == 42
        pred = r.verified.predicate
        assert pred["level"] == LEVELS[hw_kernel.tee] and pred["tee"] == hw_kernel.tee and pred["hwSource"] == "mimic"
        v = mn.verify_receipt(r.receipt, policy, nonce=pred["nonce"])  # offline, from the receipt's certificate
        assert v.attestation.hw_tee == hw_kernel.tee
        from mesatee_notebook.magics.display import AttestationCard

        card = repr(AttestationCard(a))
        assert "TEST CHAIN" in card and "HARDWARE TRUST" not in card
    finally:
        s.close()
    # each connection asked the firmware for a report over its own nonce, beside the certificate's
    assert len(set(hw_kernel.firmware.inblobs)) >= 2


def test_banner_and_log_say_mimic_not_hardware(hw_kernel: HwKernel) -> None:
    log = (hw_kernel.kernel.data_dir / "serve.log").read_text()
    assert "MIMIC" in log and "NOT a TEE" in log and "NOT hardware" in log


def test_refused_when_the_test_chain_is_not_pinned(hw_kernel: HwKernel) -> None:
    with pytest.raises(RootNotTrusted, match="is not trusted") as info:
        mn.connect(hw_kernel.kernel.url, policy=hw_kernel.policy(trust_test_root=False))
    assert isinstance(info.value, UntrustedPlatform)


def test_refused_below_the_policy_minimum(hw_kernel: HwKernel) -> None:
    if hw_kernel.tee == "sgx":
        pytest.skip("sgx is the highest level")
    with pytest.raises(LevelTooLow, match="below the policy's minimum sgx"):
        mn.connect(hw_kernel.kernel.url, policy=hw_kernel.policy(min_level="sgx"))


def _reissue(cert_der: bytes, evidence: bytes) -> bytes:
    """A certificate for a NEW TLS key carrying ``evidence`` (what a relay holding another key would present)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = build_ratls_certificate(
        key, evidence, not_before=now - dt.timedelta(minutes=5), not_after=now + dt.timedelta(days=1)
    )
    return cert.public_bytes(Encoding.DER)


def _evidence(cert_der: bytes) -> list[bytes]:
    tagged = cbor2.loads(evidence_from_certificate(load_certificate(cert_der)))
    assert tagged.tag == HW_TAG
    return list(tagged.value)


def _tagged(parts: list[bytes]) -> bytes:
    return bytes(cbor2.dumps(cbor2.CBORTag(HW_TAG, parts)))


def test_certificate_checks_offline(hw_kernel: HwKernel) -> None:
    policy = hw_kernel.policy()
    cert = hw_kernel.certificate()
    assert verify_certificate(cert, policy).hw_tee == hw_kernel.tee
    statement, report, aux = _evidence(cert)
    # Another TLS key with the genuine evidence: the report data (through the statement) binds the kernel's key only.
    with pytest.raises(KeyBindingError, match="does not commit to this TLS key"):
        verify_certificate(_reissue(cert, _tagged([statement, report, aux])), policy)
    # A statement edited after the report was made: the report data no longer commits to it.
    edited = statement.replace(b'"source":"mimic"', b'"source":"configfs-tsm"')
    assert edited != statement
    with pytest.raises(KeyBindingError, match="report data"):
        verify_certificate(_reissue(cert, _tagged([edited, report, aux])), policy)
    # One bit of the signed report flipped: the hardware signature fails.
    flip = bytearray(report)
    flip[FLIP[hw_kernel.tee]] ^= 1
    with pytest.raises(EvidenceSignatureError, match="signature"):
        verify_certificate(_reissue(cert, _tagged([statement, bytes(flip), aux])), policy)


@pytest.mark.parametrize(
    ("mode", "error", "match"),
    [
        ("replay", ReplayedQuote, "does not commit to its nonce"),
        ("tamper", EvidenceSignatureError, "signature"),
        ("other-guest", MeasurementMismatch, "another guest answered"),
    ],
)
def test_fresh_report_refused(hw_kernel: HwKernel, mode: str, error: type[Exception], match: str) -> None:
    if hw_kernel.tee == "sgx" and mode == "replay":  # the kernel's Gramine provider already refuses a stale quote
        error, match = MalformedEvidence, "not the one just written"
    hw_kernel.firmware.mode = mode
    try:
        with pytest.raises(error, match=match):
            mn.connect(hw_kernel.kernel.url, policy=hw_kernel.policy())
    finally:
        hw_kernel.firmware.mode = "ok"
    mn.connect(hw_kernel.kernel.url, policy=hw_kernel.policy()).close()  # the kernel keeps serving


def _serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mesatee_notebook.cli", "enclave", "serve", "--port", "0", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def test_hw_root_needs_the_test_only_switch(tmp_path: Path) -> None:
    firmware = MimicFirmware(tmp_path / "tree", "sev-snp")
    try:
        env = {k: v for k, v in os.environ.items() if k != MIMIC_ENV}
        out = _serve("--level", "sev-snp", "--hw-root", str(firmware.root), "--data-dir", str(tmp_path / "d"), env=env)
        assert out.returncode == 2 and "TEST-ONLY" in out.stderr and MIMIC_ENV in out.stderr
        assert "Traceback" not in out.stderr and not firmware.inblobs
        # A TDX kernel asked for on an SNP tree: the refusal names the missing TDX device.
        out = _serve("--level", "tdx", "--hw-root", str(firmware.root), "--data-dir", str(tmp_path / "d"),
                     env={**env, MIMIC_ENV: "1"})  # fmt: skip
        assert out.returncode == 2 and "tdx_guest" in out.stderr and "MISSING" in out.stderr
        if not Path("/dev/attestation").exists():  # on this host, sgx names Gramine's files as missing
            out = _serve("--level", "sgx", "--data-dir", str(tmp_path / "d"), env=env)
            assert out.returncode == 2 and "/dev/attestation/quote" in out.stderr and "MISSING" in out.stderr
    finally:
        firmware.close()
