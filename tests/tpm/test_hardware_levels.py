"""serve --level sgx|tdx|sev-snp: no TEE here, so a typed refusal naming what was looked for; never a fallback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mesatee_notebook.enclave.hw_providers import hardware_level_error
from mesatee_notebook.errors import HardwareLevelUnavailable, LevelNotAvailableError


@pytest.mark.parametrize(
    ("level", "device"),
    [("sgx", "/dev/attestation/quote"), ("tdx", "/dev/tdx_guest"), ("sev-snp", "/dev/sev-guest")],
)
def test_no_hardware_names_each_path(level: str, device: str) -> None:
    if Path(device).exists():
        pytest.skip(f"{device} exists: this host has the hardware")
    err = hardware_level_error(level)
    assert isinstance(err, LevelNotAvailableError)
    assert err.code == "level-unavailable.hardware"
    assert device in err.message and "MISSING" in err.message
    assert device in err.details["missing"]
    assert err.details["found"] == []


def test_sev_means_either_tee() -> None:
    err = hardware_level_error("sev")
    assert err.details["tee"] == ["sev-snp", "tdx"]
    assert {"/dev/sev-guest", "/dev/tdx_guest"} <= set(err.details["looked_for"])


def test_gramine_without_dcap_is_refused_as_unusable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A mimic Gramine tree whose attestation type is epid: present, but it makes no DCAP quotes; no fallback."""
    from mesatee_notebook.enclave.hw_providers import MIMIC_ENV, open_hardware_reporter

    (tmp_path / "dev/attestation").mkdir(parents=True)
    (tmp_path / "dev/attestation/attestation_type").write_text("epid\n")
    (tmp_path / "dev/attestation/quote").write_bytes(b"")
    err = hardware_level_error("sgx", root=tmp_path)
    assert err.details["found"] == ["sgx"] and err.details["missing"] == []
    assert "cannot make reports" in err.message and "dcap" in err.message
    monkeypatch.setenv(MIMIC_ENV, "1")
    with pytest.raises(HardwareLevelUnavailable, match="dcap"):
        open_hardware_reporter("sgx", tmp_path)
    (tmp_path / "dev/attestation/attestation_type").write_text("dcap\n")
    reporter = open_hardware_reporter("sgx", tmp_path)
    assert reporter.tee == "sgx" and reporter.mimic and "NOT hardware" in reporter.description


def test_present_snp_tree_is_served_only_as_a_test_mimic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A mimic SNP guest tree is found, but only the test-only switch lets a kernel use it, and then says MIMIC."""
    from mesatee_notebook.enclave.hw_providers import MIMIC_ENV, open_hardware_reporter

    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "sev-guest").write_bytes(b"")
    (tmp_path / "sys/kernel/config/tsm/report").mkdir(parents=True)
    monkeypatch.delenv(MIMIC_ENV, raising=False)
    with pytest.raises(HardwareLevelUnavailable, match="TEST-ONLY"):
        open_hardware_reporter("sev-snp", tmp_path)
    monkeypatch.setenv(MIMIC_ENV, "1")
    reporter = open_hardware_reporter("sev", tmp_path)
    assert reporter.tee == "sev-snp" and reporter.mimic and reporter.source == "mimic"
    assert "NOT a TEE" in reporter.description and "NOT hardware" in reporter.description
    with pytest.raises(HardwareLevelUnavailable, match="MISSING"):
        open_hardware_reporter("tdx", tmp_path)


def test_serve_refuses_with_the_typed_message(tmp_path: Path) -> None:
    if Path("/dev/tdx_guest").exists():
        pytest.skip("this host is a TDX guest")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mesatee_notebook.cli",
            "enclave",
            "serve",
            "--level",
            "tdx",
            "--data-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "security level 'tdx' is not available on this platform" in out.stderr
    assert "/dev/tdx_guest" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "kernel.json").exists()


def test_kernel_class_refuses_too(tmp_path: Path) -> None:
    from mesatee_notebook.attestation.levels import Level
    from mesatee_notebook.enclave.kernel import Kernel, KernelConfig

    with pytest.raises(HardwareLevelUnavailable, match="sev"):
        Kernel(KernelConfig(data_dir=tmp_path, level=Level.SEV))
