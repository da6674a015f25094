"""Evidence providers against temporary trees that mimic the configfs-tsm and Gramine file ABIs.

These are NOT hardware tests: no TEE is involved. They check that the providers speak the
file protocol (entry creation, inblob/outblob/generation, user_report_data/quote) and fail
with a clear LevelNotAvailableError when the interface is absent.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mesatee_notebook.attestation.levels import Level
from mesatee_notebook.enclave.hw_providers import (
    ConfigfsTsm,
    GramineAttestation,
    available_hardware_levels,
    get_hardware_evidence,
)
from mesatee_notebook.errors import LevelNotAvailableError, MalformedEvidence

from .conftest import vec


class FakeKernelTsm(ConfigfsTsm):
    """Plays the kernel's part of configfs-tsm in a temp dir: attribute files and generation bumps."""

    def __init__(self, root: Path, outblob: bytes, provider: str = "tdx_guest", racers: int = 0) -> None:
        super().__init__(root)
        self.outblob = outblob
        self.provider = provider
        self.racers = racers
        self.inblobs: list[bytes] = []
        self.entries: list[Path] = []

    def _new_entry(self) -> Path:
        entry = super()._new_entry()
        self.entries.append(entry)
        for name, value in {
            "generation": b"0\n",
            "provider": self.provider.encode() + b"\n",
            "auxblob": b"aux",
        }.items():
            (entry / name).write_bytes(value)
        return entry

    def _write_attr(self, entry: Path, name: str, data: bytes) -> None:
        super()._write_attr(entry, name, data)
        self.inblobs.append(data)
        gen = int((entry / "generation").read_bytes()) + 1
        if self.racers:  # another process writes inblob between our write and our read
            self.racers -= 1
            gen += 1
        (entry / "generation").write_bytes(b"%d\n" % gen)
        (entry / "outblob").write_bytes(self.outblob)

    def _remove_entry(self, entry: Path) -> None:
        for f in entry.iterdir():  # configfs removes attribute files itself; a plain dir needs help
            f.unlink()
        super()._remove_entry(entry)


def tsm_tree(tmp_path: Path, device: str | None = "dev/tdx_guest") -> Path:
    (tmp_path / "sys/kernel/config/tsm/report").mkdir(parents=True)
    if device:
        (tmp_path / device).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / device).touch()
    return tmp_path


def gramine_tree(tmp_path: Path, kind: str = "dcap", quote: bytes | None = None) -> Path:
    d = tmp_path / "dev/attestation"
    d.mkdir(parents=True)
    (d / "attestation_type").write_text(kind + "\n")
    (d / "user_report_data").write_bytes(b"\x00" * 64)
    (d / "quote").write_bytes(quote if quote is not None else vec("sgx/dcap_sample_quote.dat"))
    return tmp_path


def test_nothing_available_on_an_empty_root(tmp_path: Path) -> None:
    assert available_hardware_levels(tmp_path) == frozenset()
    with pytest.raises(LevelNotAvailableError, match="not inside a Gramine enclave"):
        get_hardware_evidence(Level.SGX, b"x", root=tmp_path)
    with pytest.raises(LevelNotAvailableError, match="configfs-tsm is not available"):
        get_hardware_evidence(Level.SEV, b"x", root=tmp_path)
    with pytest.raises(LevelNotAvailableError, match="no hardware evidence provider"):
        get_hardware_evidence(Level.TPM, b"x", root=tmp_path)


def test_tsm_levels_need_the_guest_device(tmp_path: Path) -> None:
    assert available_hardware_levels(tsm_tree(tmp_path, device=None)) == frozenset()
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev/sev-guest").touch()
    assert available_hardware_levels(tmp_path) == frozenset({Level.SEV})


def test_tsm_report_round_trip(tmp_path: Path) -> None:
    quote = vec("tdx/tdx_prod_quote_SPR_E4.dat")
    tsm = FakeKernelTsm(tsm_tree(tmp_path), quote)
    report = tsm.report(b"\x01" * 32)
    assert report.outblob == quote and report.tee == "tdx" and report.auxblob == b"aux"
    assert report.generation == 1
    assert tsm.inblobs == [b"\x01" * 32 + b"\x00" * 32]  # padded to the 64 bytes TEEs sign
    assert not tsm.entries[0].exists()  # the entry is removed afterwards


def test_tsm_generation_race_is_retried_then_refused(tmp_path: Path) -> None:
    root = tsm_tree(tmp_path)
    tsm = FakeKernelTsm(root, vec("snp/gosev_attestation.bin"), provider="sev_guest", racers=1)
    report = tsm.report(b"r")
    assert report.tee == "sev-snp" and len(tsm.inblobs) == 2
    always = FakeKernelTsm(root, b"x", racers=99)
    with pytest.raises(LevelNotAvailableError, match="generation raced"):
        always.report(b"r")


def test_tsm_unknown_provider(tmp_path: Path) -> None:
    with pytest.raises(LevelNotAvailableError, match="not a TDX or SEV-SNP guest"):
        FakeKernelTsm(tsm_tree(tmp_path), b"q", provider="arm_cca_guest").report(b"r")


def test_report_data_longer_than_64_bytes_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at most 64"):
        FakeKernelTsm(tsm_tree(tmp_path), b"q").report(b"x" * 65)


def test_gramine_dcap_quote(tmp_path: Path) -> None:
    root = gramine_tree(tmp_path)
    assert available_hardware_levels(root) == frozenset({Level.SGX})
    # The sample quote's report data is all zeros, so asking for zeros matches it.
    quote = get_hardware_evidence(Level.SGX, b"", root=root)
    assert quote == vec("sgx/dcap_sample_quote.dat")
    assert (root / "dev/attestation/user_report_data").read_bytes() == b"\x00" * 64


def test_gramine_quote_must_commit_to_our_report_data(tmp_path: Path) -> None:
    with pytest.raises(MalformedEvidence, match="not the one just written"):
        GramineAttestation(gramine_tree(tmp_path)).quote(b"\x07" * 64)


def test_gramine_without_dcap(tmp_path: Path) -> None:
    root = gramine_tree(tmp_path, kind="epid")
    assert available_hardware_levels(root) == frozenset()
    with pytest.raises(LevelNotAvailableError, match="remote_attestation"):
        get_hardware_evidence("sgx", b"", root=root)  # type: ignore[arg-type]


def test_gramine_returns_garbage(tmp_path: Path) -> None:
    with pytest.raises(MalformedEvidence, match="not a DCAP quote"):
        GramineAttestation(gramine_tree(tmp_path, quote=b"nonsense")).quote(b"")
