"""A real swtpm per test session: provisioned with an EK certificate by its own local CA, on loopback."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mesatee_notebook.enclave.cluster.node_tpm import free_port_pair, swtpm_listening
from tests.conftest import KernelProc, start_kernel, stop_kernel

_MISSING = [tool for tool in ("swtpm", "swtpm_setup", "swtpm_localca") if shutil.which(tool) is None]
try:
    import tpm2_pytss  # noqa: F401
except ImportError:
    _MISSING.append("tpm2-pytss (pip install 'mesatee_notebook[tpm]')")

if _MISSING:
    pytest.skip(
        f"TPM tests need swtpm and tpm2-pytss; missing: {', '.join(_MISSING)} "
        "(Debian: apt-get install swtpm swtpm-tools tpm2-tools libtss2-dev)",
        allow_module_level=True,
    )


@dataclass
class Swtpm:
    """A running swtpm and the local CA that certified its EK."""

    tcti: str
    port: int
    ca_root: Path
    ca_issuer: Path
    proc: subprocess.Popen[bytes]

    @property
    def ek_roots(self) -> list[str]:
        return [str(self.ca_root), str(self.ca_issuer)]


def start_swtpm(root: Path) -> Swtpm:
    """Manufacture a TPM (EK + EK certificate from a fresh local CA) with swtpm_setup, then serve it on TCP."""
    state, ca = root / "state", root / "ca"
    state.mkdir(parents=True)
    ca.mkdir()
    (root / "localca.conf").write_text(
        f"statedir = {ca}\nsigningkey = {ca}/signkey.pem\nissuercert = {ca}/issuercert.pem\n"
        f"certserial = {ca}/certserial\n"
    )
    (root / "setup.conf").write_text(
        "create_certs_tool = swtpm_localca\n"
        f"create_certs_tool_config = {root}/localca.conf\n"
        f"create_certs_tool_options = {root}/localca.options\n"
        "active_pcr_banks = sha256\n"
    )
    (root / "localca.options").write_text("--platform-manufacturer mesatee-tests\n--platform-version 1\n")
    subprocess.run(
        ["swtpm_setup", "--tpm2", "--tpmstate", str(state), "--create-ek-cert", "--config", str(root / "setup.conf")],
        check=True,
        capture_output=True,
        timeout=60,
    )
    for _ in range(5):  # a port found free can be taken before swtpm binds it (another worker, a kernel on port 0)
        port = free_port_pair()
        proc = _serve_swtpm(root, state, port)
        if proc is not None:
            return Swtpm(f"swtpm:host=127.0.0.1,port={port}", port, ca / "swtpm-localca-rootca-cert.pem",
                         ca / "issuercert.pem", proc)  # fmt: skip
    raise RuntimeError(f"swtpm did not start: {(root / 'swtpm.log').read_text()}")


def _serve_swtpm(root: Path, state: Path, port: int) -> subprocess.Popen[bytes] | None:
    """swtpm serving ``state`` on ``port`` and ``port + 1``, once it listens on both itself; None if it exits."""
    log = (root / "swtpm.log").open("ab")
    proc = subprocess.Popen(
        [
            "swtpm", "socket", "--tpm2",
            "--tpmstate", f"dir={state}",
            "--server", f"type=tcp,port={port},bindaddr=127.0.0.1",
            "--ctrl", f"type=tcp,port={port + 1},bindaddr=127.0.0.1",
            "--flags", "not-need-init,startup-clear",
        ],
        stdout=log,
        stderr=log,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    log.close()
    if swtpm_listening(proc, port, time.monotonic() + 30):
        return proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    return None


def stop_swtpm(tpm: Swtpm) -> None:
    tpm.proc.terminate()
    try:
        tpm.proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        tpm.proc.kill()
        tpm.proc.wait()


@pytest.fixture(scope="session")
def swtpm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swtpm]:
    """The TPM the TPM-level kernel uses."""
    tpm = start_swtpm(tmp_path_factory.mktemp("swtpm"))
    yield tpm
    stop_swtpm(tpm)


@pytest.fixture(scope="session")
def other_swtpm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swtpm]:
    """A second TPM with its own EK CA: for in-process quotes and "another CA / another AK" refusals."""
    tpm = start_swtpm(tmp_path_factory.mktemp("swtpm-other"))
    yield tpm
    stop_swtpm(tpm)


@dataclass
class TpmKernel:
    kernel: KernelProc
    swtpm: Swtpm
    ak: str  # AK fingerprint, as `mesatee-enclave tpm-info` prints it

    def policy(self, **kw: object) -> object:
        import mesatee_notebook as mn

        kw.setdefault("measurements", [self.kernel.measurement])
        kw.setdefault("platform_roots", [self.ak])
        kw.setdefault("min_level", "tpm")
        return mn.Policy(**kw)  # type: ignore[arg-type]


def tpm_info(tcti: str) -> str:
    """The AK fingerprint, the way an operator gets it: `mesatee-enclave tpm-info`."""
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "mesatee_notebook.cli", "enclave", "tpm-info", "--tcti", tcti, "--tpm-app-pcr", "16"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ},
    ).stdout
    line = next(x for x in out.splitlines() if x.startswith("attestation key fingerprint"))
    return line.rsplit(" ", 1)[1]


@pytest.fixture(scope="session")
def tpm_kernel(swtpm: Swtpm, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TpmKernel]:
    """A real kernel serving at --level tpm on the session's swtpm (application PCR 16)."""
    ak = tpm_info(swtpm.tcti)
    k = start_kernel(tmp_path_factory.mktemp("tpm-kernel"), "--tcti", swtpm.tcti, "--tpm-app-pcr", "16", level="tpm")
    yield TpmKernel(k, swtpm, ak)
    stop_kernel(k)


@pytest.fixture(scope="session")
def local_tpm(other_swtpm: Swtpm) -> Iterator[object]:
    """An in-process TPM (the kernel's own class) on the second swtpm, application PCR 16."""
    from mesatee_notebook.enclave.tpm import open_tpm

    with open_tpm(other_swtpm.tcti, app_pcr=16) as tpm:
        yield tpm


ECC_EK_CERT_INDEX = 0x01C0000A  # TCG EK credential profile, low range L-2: ECC NIST P-256 EK certificate


def provision_ecc_ek(tpm: Swtpm) -> bytes:
    """Certify the TPM's TCG L-2 ECC P-256 EK with the swtpm's local CA and store the certificate at 0x01c0000a.

    swtpm_setup 0.7 certifies an RSA 2048 EK (L-1) and an ECC P-384 EK of the high range (H-3), not the L-2 one;
    this does what a manufacturer (or a newer swtpm_setup) does for L-2, with the same CA. The EK itself is the TPM's,
    created from the TCG template; only the certificate is made here. Returns the certificate (DER).
    """
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from tpm2_pytss import ESAPI, ESYS_TR, TPM2_ALG, TPM2B_NV_PUBLIC, TPMA_NV, TPMS_NV_PUBLIC
    from tpm2_pytss.utils import NVReadEK, create_ek_template

    with ESAPI(tpm.tcti) as esapi:
        _, template = create_ek_template("EK-ECC256", NVReadEK(esapi))
        handle, public, *_ = esapi.create_primary(None, template, ESYS_TR.ENDORSEMENT)
        esapi.flush_context(handle)
        point = public.publicArea.unique.ecc
        key = ec.EllipticCurvePublicNumbers(
            int.from_bytes(bytes(point.x), "big"), int.from_bytes(bytes(point.y), "big"), ec.SECP256R1()
        ).public_key()
        ca_key = serialization.load_pem_private_key((tpm.ca_issuer.parent / "signkey.pem").read_bytes(), None)
        issuer = x509.load_pem_x509_certificate(tpm.ca_issuer.read_bytes())
        now = dt.datetime.now(dt.UTC)
        tpm_name = x509.Name([x509.NameAttribute(x509.ObjectIdentifier("2.23.133.2.1"), "id:00001014")])
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(issuer.subject)
            .public_key(key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.SubjectAlternativeName([x509.DirectoryName(tpm_name)]), critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
            .public_bytes(serialization.Encoding.DER)
        )
        attrs = TPMA_NV.PPWRITE | TPMA_NV.PPREAD | TPMA_NV.OWNERREAD | TPMA_NV.AUTHREAD | TPMA_NV.NO_DA
        attrs |= TPMA_NV.PLATFORMCREATE | TPMA_NV.WRITEDEFINE
        nv_public = TPMS_NV_PUBLIC(
            nvIndex=ECC_EK_CERT_INDEX, nameAlg=TPM2_ALG.SHA256, attributes=attrs, dataSize=len(cert)
        )
        nv = esapi.nv_define_space(None, TPM2B_NV_PUBLIC(nvPublic=nv_public), auth_handle=ESYS_TR.PLATFORM)
        for offset in range(0, len(cert), 512):
            esapi.nv_write(nv, cert[offset : offset + 512], offset, auth_handle=ESYS_TR.PLATFORM)
    return cert


@pytest.fixture(scope="session")
def ecc_swtpm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swtpm]:
    """A TPM whose ECC P-256 EK (TCG L-2) is certified by its local CA, beside the RSA one."""
    tpm = start_swtpm(tmp_path_factory.mktemp("swtpm-ecc"))
    provision_ecc_ek(tpm)
    yield tpm
    stop_swtpm(tpm)
