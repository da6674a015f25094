"""A real kernel at --level tpm on a real swtpm: attested, runs cells, and each bad case refused by its own error."""

from __future__ import annotations

import dataclasses
import socket
import ssl
import subprocess
import sys
from typing import Any

import cbor2
import pytest

import mesatee_notebook as mn
from mesatee_notebook.attestation.policy import check_tpm_hello, tpm_hello_request, verify_certificate
from mesatee_notebook.attestation.ratls import evidence_from_certificate, load_certificate
from mesatee_notebook.attestation.tpm import TPM_TAG
from mesatee_notebook.errors import (
    BootPcrMismatch,
    CredentialActivationFailed,
    EkChainError,
    MeasurementMismatch,
    ReplayedQuote,
    SoftwareTpmNotAllowed,
    UntrustedAttestationKey,
)
from mesatee_notebook.wire.framing import Limits
from mesatee_notebook.wire.messages import PROTOCOL_VERSION
from mesatee_notebook.wire.stream import recv_message, send_message
from tests.tpm.conftest import Swtpm, TpmKernel


def raw_hello(tk: TpmKernel, extra: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
    """One TLS connection to the kernel: its certificate, and its reply to a hello carrying ``extra``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with ctx.wrap_socket(socket.create_connection((tk.kernel.host, tk.kernel.port), timeout=30)) as sock:
        cert = sock.getpeercert(binary_form=True)
        assert cert
        send_message(sock, {"t": "hello", "id": 1, "versions": [PROTOCOL_VERSION], "client": "test", **extra}, [])
        reply = recv_message(sock, Limits())
    assert reply.type == "hello.ok", reply.header
    return cert, reply.header


def test_tpm_kernel_is_attested_and_runs_a_cell_with_a_receipt(tpm_kernel: TpmKernel) -> None:
    policy = tpm_kernel.policy()
    s = mn.connect(tpm_kernel.kernel.url, policy=policy)
    try:
        a = s.attestation
        assert a.level is mn.Level.TPM and a.tpm_kind == "software" and a.platform == tpm_kernel.ak
        assert "software TPM" in a.level_text and "SOFTWARE TPM" in a.trust_note
        names = [c.name for c in a.checks]
        for check in ("quote signature", "attestation key", "qualifying data", "PCR digest", "PCRs", "fresh quote"):
            assert check in names
        assert "credential activation" not in names  # the AK is pinned; no EK CA in this policy
        r = s.run("x = 6 * 7\nx", outputs=["x"])
        assert r.value == 42 and r.outputs["x"] == 42
        pred = r.verified.predicate
        assert pred["level"] == "tpm" and pred["tpmKind"] == "software"
        v = mn.verify_receipt(r.receipt, policy, nonce=pred["nonce"])  # offline, from the receipt's certificate
        assert v.attestation.tpm_kind == "software"
        from mesatee_notebook.magics.display import AttestationCard

        card = repr(AttestationCard(a))
        assert "SOFTWARE TPM" in card and "TPM 2.0 (software TPM)" in card
        assert s.audit() is not None  # the audit log's key is the one the quoted statement names
    finally:
        s.close()


def test_mesatee_attest_cli_says_software_tpm(tpm_kernel: TpmKernel) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "mesatee_notebook.cli", "client", "attest", tpm_kernel.kernel.url,
         "--platform-root", tpm_kernel.ak, "--measurement", tpm_kernel.kernel.measurement, "--min-level", "tpm"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "SOFTWARE TPM" in out.stdout and "fresh quote" in out.stdout
    refused = subprocess.run(
        [sys.executable, "-m", "mesatee_notebook.cli", "client", "attest", tpm_kernel.kernel.url,
         "--platform-root", tpm_kernel.ak, "--measurement", tpm_kernel.kernel.measurement, "--refuse-software-tpm"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert refused.returncode == 1 and "SoftwareTpmNotAllowed" in refused.stderr and "Traceback" not in refused.stderr


def test_ek_certified_by_the_pinned_ca_and_activated_needs_no_ak_pin(tpm_kernel: TpmKernel) -> None:
    policy = tpm_kernel.policy(platform_roots=[], tpm_ek_roots=tpm_kernel.swtpm.ek_roots)
    s = mn.connect(tpm_kernel.kernel.url, policy=policy)
    try:
        names = [c.name for c in s.attestation.checks]
        assert "EK chain" in names and "credential activation" in names and "fresh quote" in names
        assert s.attestation.tpm_kind == "software"  # the EK chains to swtpm's local CA: still a software TPM
        assert s.run("1 + 1").value == 2
    finally:
        s.close()
    # The AK-EK binding is permanent: a later connection under the same policy needs only the fresh quote.
    fields, _ = tpm_hello_request(s.attestation, policy)
    assert "tpm_credential" not in fields and "tpm_nonce" in fields
    again = mn.connect(tpm_kernel.kernel.url, policy=policy)
    try:
        detail = {c.name: c.detail for c in again.attestation.checks}["credential activation"]
        assert "earlier connection" in detail
    finally:
        again.close()


def test_ek_from_another_ca_is_refused(tpm_kernel: TpmKernel, other_swtpm: Swtpm) -> None:
    policy = tpm_kernel.policy(platform_roots=[], tpm_ek_roots=other_swtpm.ek_roots)
    with pytest.raises(EkChainError, match="not a CA this policy pins"):
        mn.connect(tpm_kernel.kernel.url, policy=policy)


def test_unpinned_ak_is_refused(tpm_kernel: TpmKernel) -> None:
    with pytest.raises(UntrustedAttestationKey, match="does not pin"):
        mn.connect(tpm_kernel.kernel.url, policy=tpm_kernel.policy(platform_roots=["ab" * 32]))


def test_boot_pcrs_checked_against_the_policy(tpm_kernel: TpmKernel) -> None:
    zeros = "00" * 32  # swtpm has no firmware: its boot PCRs stay at zero
    s = mn.connect(tpm_kernel.kernel.url, policy=tpm_kernel.policy(tpm_pcrs={0: zeros, 7: zeros}))
    s.close()
    with pytest.raises(BootPcrMismatch, match="boot PCR 7"):
        mn.connect(tpm_kernel.kernel.url, policy=tpm_kernel.policy(tpm_pcrs={0: zeros, 7: "11" * 32}))
    with pytest.raises(BootPcrMismatch, match="does not cover"):
        mn.connect(tpm_kernel.kernel.url, policy=tpm_kernel.policy(tpm_pcrs={10: zeros}))


def test_a_different_measurement_is_refused(tpm_kernel: TpmKernel) -> None:
    with pytest.raises(MeasurementMismatch):
        mn.connect(tpm_kernel.kernel.url, policy=tpm_kernel.policy(measurements=["cd" * 32]))


def test_policy_can_refuse_software_tpms(tpm_kernel: TpmKernel) -> None:
    with pytest.raises(SoftwareTpmNotAllowed, match="software TPM"):
        mn.connect(tpm_kernel.kernel.url, policy=tpm_kernel.policy(allow_software_tpm=False))
    ek_policy = tpm_kernel.policy(allow_software_tpm=False, tpm_ek_roots=tpm_kernel.swtpm.ek_roots)
    with pytest.raises(SoftwareTpmNotAllowed):  # certified, but by swtpm's local CA
        mn.connect(tpm_kernel.kernel.url, policy=ek_policy)


def test_quote_replayed_from_another_connection_is_refused(tpm_kernel: TpmKernel) -> None:
    policy = tpm_kernel.policy()
    fields, kept = tpm_hello_request(verify_certificate(raw_hello(tpm_kernel, {})[0], policy, live=True))
    cert, reply = raw_hello(tpm_kernel, fields)  # connection A
    report = verify_certificate(cert, policy, live=True)
    assert "fresh quote" in [c.name for c in check_tpm_hello(report, kept, reply).checks]
    _, kept_b = tpm_hello_request(report)  # connection B's own nonce; A's quote replayed to it
    with pytest.raises(ReplayedQuote, match="replayed"):
        check_tpm_hello(report, kept_b, reply)
    with pytest.raises(ReplayedQuote, match="no quote"):
        check_tpm_hello(report, kept_b, {k: v for k, v in reply.items() if k != "tpm_quote"})


def test_ak_that_is_not_in_the_certified_tpm_fails_activation(tpm_kernel: TpmKernel, local_tpm: Any) -> None:
    """A kernel showing another TPM's AK beside this TPM's certified EK: the credential cannot be activated."""
    policy = tpm_kernel.policy(platform_roots=[], tpm_ek_roots=tpm_kernel.swtpm.ek_roots)
    cert, _ = raw_hello(tpm_kernel, {})
    report = verify_certificate(cert, policy, live=True)
    value = list(cbor2.loads(evidence_from_certificate(load_certificate(cert))).value)
    value[3] = local_tpm.ak_public  # another TPM's AK: the client's credential is bound to its name
    forged = dataclasses.replace(report, evidence=cbor2.dumps(cbor2.CBORTag(TPM_TAG, value)))
    fields, kept = tpm_hello_request(forged)
    _, reply = raw_hello(tpm_kernel, fields)
    assert "tpm_activated" not in reply
    with pytest.raises(CredentialActivationFailed, match="does not live in the TPM"):
        check_tpm_hello(forged, kept, reply)
    fields, kept = tpm_hello_request(report)  # the genuine AK on the same kernel: activated
    _, reply = raw_hello(tpm_kernel, fields)
    assert "credential activation" in [c.name for c in check_tpm_hello(report, kept, reply).checks]


def test_offline_receipts_need_the_ak_pinned(tpm_kernel: TpmKernel, tmp_path: Any) -> None:
    s = mn.connect(tpm_kernel.kernel.url, policy=tpm_kernel.policy())
    try:
        r = s.run("2 + 3")
    finally:
        s.close()
    mn.verify_receipt(r.receipt, tpm_kernel.policy())
    path = r.receipt.save(tmp_path / "receipt.json")
    out = subprocess.run(
        [sys.executable, "-m", "mesatee_notebook.cli", "client", "verify-receipt", str(path),
         "--platform-root", tpm_kernel.ak, "--measurement", tpm_kernel.kernel.measurement],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 0 and "TPM 2.0 (software TPM)" in out.stdout, out.stderr
    with pytest.raises(UntrustedAttestationKey, match="live connection"):
        mn.verify_receipt(r.receipt, tpm_kernel.policy(platform_roots=[], tpm_ek_roots=tpm_kernel.swtpm.ek_roots))


def test_tpm_level_without_a_working_tpm_is_refused_clearly(tmp_path: Any) -> None:
    from mesatee_notebook.enclave.kernel import Kernel, KernelConfig

    with pytest.raises(mn.LevelNotAvailableError, match="no TPM was given"):
        Kernel(KernelConfig(data_dir=tmp_path, level=mn.Level.TPM))
    with socket.socket() as s:  # a port nothing listens on: held (bound, not listening) so nothing else takes it
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
        out = subprocess.run(
            [sys.executable, "-m", "mesatee_notebook.cli", "enclave", "serve", "--level", "tpm", "--port", "0",
             "--data-dir", str(tmp_path), "--tcti", f"swtpm:host=127.0.0.1,port={dead}"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    assert out.returncode == 2
    assert "not available on this platform" in out.stderr and "cannot be used" in out.stderr
    assert "Traceback" not in out.stderr


def test_the_kernels_quotes_pass_tpm2_checkquote(tpm_kernel: TpmKernel, tmp_path: Any) -> None:
    import json
    import shutil

    from mesatee_notebook.attestation.tpm import fresh_qualifying_data, statement_qualifying_data
    from tests.tpm.test_quotes import _checkquote, _flip, _tools_pcr_file

    if shutil.which("tpm2_checkquote") is None:
        pytest.skip("tpm2-tools (tpm2_checkquote) is not installed: no cross-check")
    fields, kept = tpm_hello_request(verify_certificate(raw_hello(tpm_kernel, {})[0], tpm_kernel.policy(), live=True))
    cert, reply = raw_hello(tpm_kernel, fields)
    value = list(cbor2.loads(evidence_from_certificate(load_certificate(cert))).value)
    statement = json.loads(value[0])
    order = sorted(int(i) for i in statement["pcrs"])
    pcrs = _tools_pcr_file(order, [bytes.fromhex(statement["pcrs"][str(i)]) for i in order])
    qual = statement_qualifying_data(value[0])
    assert _checkquote(tmp_path, value[3], value[1], value[2], pcrs, qual) == 0
    fresh = reply["tpm_quote"]
    fresh_qual = fresh_qualifying_data(statement["report_data"], kept["nonce"])
    assert _checkquote(tmp_path, value[3], fresh["attest"], fresh["signature"], pcrs, fresh_qual) == 0
    assert _checkquote(tmp_path, value[3], fresh["attest"], fresh["signature"], pcrs, _flip(fresh_qual, 3)) != 0
    assert _checkquote(tmp_path, value[3], _flip(fresh["attest"], 30), fresh["signature"], pcrs, fresh_qual) != 0


def test_garbage_tpm_fields_in_hello_get_a_clean_answer(tpm_kernel: TpmKernel) -> None:
    for extra in (
        {"tpm_nonce": b"short", "tpm_credential": {"blob": b"\x00" * 500, "secret": b"\x01" * 300}},
        {"tpm_nonce": "not bytes", "tpm_credential": {"blob": b"", "secret": b""}},
        {"tpm_credential": "nonsense"},
    ):
        _, reply = raw_hello(tpm_kernel, extra)
        assert "tpm_quote" not in reply and "tpm_activated" not in reply
    log = (tpm_kernel.kernel.data_dir / "serve.log").read_text()
    assert "Traceback" not in log
    s = mn.connect(tpm_kernel.kernel.url, policy=tpm_kernel.policy())  # the kernel keeps serving others
    s.close()


def test_tpm_info_beside_a_serving_kernel_prints_the_same_ak(tpm_kernel: TpmKernel) -> None:
    from tests.tpm.conftest import tpm_info

    assert tpm_info(tpm_kernel.swtpm.tcti) == tpm_kernel.ak  # a primary key: the same TPM gives the same AK
    s = mn.connect(tpm_kernel.kernel.url, policy=tpm_kernel.policy())  # and the kernel's TPM objects are intact
    s.close()
    with pytest.raises(ValueError, match="tpm_ek_roots entry"):
        mn.Policy(tpm_ek_roots=["/nonexistent/ca.pem"])


@pytest.mark.slow
def test_tpm_kernel_without_a_sandbox_is_refused_by_default(tmp_path: Any) -> None:
    """The TPM path checks the sandbox report like softtee's (a TPM measures; it does not isolate parties)."""
    from mesatee_notebook.errors import SandboxRequired
    from tests.conftest import start_kernel, stop_kernel
    from tests.tpm.conftest import start_swtpm, stop_swtpm, tpm_info

    tpm = start_swtpm(tmp_path / "swtpm")  # its own TPM: this kernel's launch resets PCR 16
    try:
        ak = tpm_info(tpm.tcti)
        k = start_kernel(tmp_path / "k", "--tcti", tpm.tcti, "--tpm-app-pcr", "16", "--no-sandbox", level="tpm")
        try:
            pins: dict[str, Any] = {"platform_roots": [ak], "measurements": [k.measurement], "min_level": "tpm"}
            with pytest.raises(SandboxRequired, match="WITHOUT a sandbox"):
                mn.connect(k.url, policy=mn.Policy(**pins))
            mn.connect(k.url, policy=mn.Policy(require_sandbox=False, **pins)).close()
        finally:
            stop_kernel(k)
    finally:
        stop_swtpm(tpm)
