"""A real swtpm per test session: provisioned with an EK certificate by its own local CA, on loopback."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

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


def _free_port_pair() -> int:
    """P such that P and P+1 are free on loopback (swtpm's server and control ports)."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return int(port)
    raise RuntimeError("no two adjacent free loopback ports")


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
    port = _free_port_pair()
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
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"swtpm exited: {(root / 'swtpm.log').read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    return Swtpm(f"swtpm:host=127.0.0.1,port={port}", port, ca / "swtpm-localca-rootca-cert.pem",
                 ca / "issuercert.pem", proc)  # fmt: skip


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
