"""At --level tpm the sealing secret is sealed in the TPM (PolicyPCR over boot + application PCRs); owners' data stays.

Real kernels on a real swtpm of their own (the application PCR changes with the measurement here, so not the
session's swtpm, which other tests quote).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import mesatee_notebook as mn
from mesatee_notebook.errors import SealingError
from tests.conftest import KernelProc, start_kernel, stop_kernel
from tests.tpm.conftest import Swtpm, start_swtpm, stop_swtpm, tpm_info

POLICY = mn.DataPolicy(min_group_size=2)


@pytest.fixture(scope="module")
def seal_tpm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swtpm]:
    tpm = start_swtpm(tmp_path_factory.mktemp("swtpm-seal"))
    yield tpm
    stop_swtpm(tpm)


@pytest.fixture(scope="module")
def upgraded() -> Iterator[Path]:
    """The next release: a copy of the package with one measured byte changed (as tests/parties/test_migration)."""
    src = Path(mn.__file__).resolve().parent
    root = Path(tempfile.mkdtemp(prefix=".upgraded-tpm-", dir=src.parent))
    root.chmod(0o755)
    try:
        shutil.copytree(src, root / "mesatee_notebook", ignore=shutil.ignore_patterns("__pycache__"))
        measured = root / "mesatee_notebook" / "wire" / "__init__.py"
        measured.write_bytes(measured.read_bytes() + b"\n")
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def _from(copy: Path | None) -> Iterator[None]:
    old, cwd = os.environ.get("PYTHONPATH"), Path.cwd()
    if copy is not None:
        os.environ["PYTHONPATH"] = str(copy)
        os.chdir(copy)
    try:
        yield
    finally:
        os.chdir(cwd)
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


@contextlib.contextmanager
def _tpm_kernel(tpm: Swtpm, data_dir: Path, copy: Path | None = None) -> Iterator[KernelProc]:
    with _from(copy):
        k = start_kernel(data_dir, "--tcti", tpm.tcti, "--tpm-app-pcr", "16", level="tpm")
    try:
        yield k
    finally:
        stop_kernel(k)


def _connect(k: KernelProc, ak: str, who: Path) -> mn.Session:
    pol = mn.Policy(platform_roots=[ak], measurements=[k.measurement], min_level="tpm")
    return mn.connect(k.url, policy=pol, identity=who)


def _enclave(*args: str, copy: Path | None = None) -> subprocess.CompletedProcess[str]:
    with _from(copy):
        return subprocess.run(
            [sys.executable, "-m", "mesatee_notebook.cli", "enclave", *args],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ},
        )


@pytest.mark.slow
def test_file_secret_moves_into_the_tpm_and_an_upgrade_keeps_the_data(
    seal_tpm: Swtpm, upgraded: Path, tmp_path: Path
) -> None:
    data_dir = tmp_path / "kernel"
    frame = pd.DataFrame({"g": ["a", "b"] * 20, "x": np.arange(40.0)})
    soft = start_kernel(data_dir)  # the data directory's history starts at softtee, with a file-sealed secret
    try:
        owner = mn.connect(soft.url, policy=soft.policy(), identity=tmp_path / "owner")
        owner.upload(frame, "sales", policy=POLICY)
        digest = owner.call("dataset.info", {"name": "sales"}).info["sha256"]
        owner.close()
    finally:
        stop_kernel(soft)
    secret_file = data_dir / "platform" / "sealing.key"
    assert secret_file.exists()
    ak = tpm_info(seal_tpm.tcti)

    with _tpm_kernel(seal_tpm, data_dir) as ka:  # first start at tpm: the secret moves into the TPM
        assert not secret_file.exists()
        blobs = sorted((data_dir / "platform" / "tpm-sealed").glob("*.json"))
        assert [b.stem for b in blobs] == [ka.measurement]
        assert b"sealing.key" not in blobs[0].read_bytes()
        assert "sealing secret moved from" in (data_dir / "serve.log").read_text()
        s = _connect(ka, ak, tmp_path / "owner")
        assert s.call("dataset.info", {"name": "sales"}).info["sha256"] == digest
        total = s.dataframe("sales").groupby("g").agg(t=("x", "sum")).collect()
        assert sorted(total["t"]) == [380.0, 400.0]
        s.close()
    a = ka.measurement

    with _tpm_kernel(seal_tpm, data_dir) as again:  # second start: unsealed from the TPM
        s = _connect(again, ak, tmp_path / "owner")
        assert s.call("dataset.info", {"name": "sales"}).info["sha256"] == digest
        s.close()

    refused = _enclave("serve", "--port", "0", "--data-dir", str(data_dir))  # softtee: no file secret any more
    assert refused.returncode == 2 and "sealed in a TPM" in refused.stderr and "Traceback" not in refused.stderr

    # The next release cannot unseal A's blob (application PCR differs): a typed refusal that says what to run.
    with pytest.raises(RuntimeError, match="tpm-reseal --for"):
        with _tpm_kernel(seal_tpm, data_dir, upgraded):
            pass
    b = _measurement_of(upgraded)
    assert b != a
    out = _enclave(
        "tpm-reseal", "--for", b, "--tcti", seal_tpm.tcti, "--tpm-app-pcr", "16", "--data-dir", str(data_dir)
    )
    assert out.returncode == 0, out.stderr
    assert "SOFTWARE trust" in out.stdout

    with _tpm_kernel(seal_tpm, data_dir, upgraded) as kb:
        assert kb.measurement == b
        s = _connect(kb, ak, tmp_path / "owner")
        pending = {d["name"]: d for d in s.datasets()}
        assert pending["sales"]["pending_migration"] and pending["sales"]["sha256"] == digest
        s.approve_migration("*", from_=a)
        listed = {d["name"]: d for d in s.datasets()}
        assert "pending_migration" not in listed["sales"] and listed["sales"]["sha256"] == digest
        total = s.dataframe("sales").groupby("g").agg(t=("x", "sum")).collect()
        assert sorted(total["t"]) == [380.0, 400.0]
        s.close()


def _measurement_of(copy: Path) -> str:
    with _from(copy):
        return subprocess.run(
            [sys.executable, "-c", "from mesatee_notebook.attestation.measurement import expected_measurement as m;"
             "print(m())"],
            capture_output=True, text=True, check=True, timeout=60, env={**os.environ},
        ).stdout.strip()  # fmt: skip


def test_unseal_needs_the_sealed_pcrs(local_tpm: object, tmp_path: Path) -> None:
    """In process, on the second swtpm: another value in the application PCR and the TPM refuses to unseal."""
    from mesatee_notebook.enclave.tpm import Tpm
    from mesatee_notebook.enclave.tpm_secret import tpm_sealing_secret

    assert isinstance(local_tpm, Tpm)
    pdir = tmp_path / "platform"
    pdir.mkdir()
    (pdir / "sealing.key").write_bytes(b"\x07" * 32)
    here, other = "11" * 32, "22" * 32
    local_tpm.measured_launch(here)
    assert tpm_sealing_secret(local_tpm, tmp_path, here) == b"\x07" * 32  # moved in
    assert not (pdir / "sealing.key").exists()
    assert tpm_sealing_secret(local_tpm, tmp_path, here) == b"\x07" * 32  # unsealed
    (pdir / "tpm-sealed" / f"{here}.json").rename(pdir / "tpm-sealed" / f"{other}.json")
    with pytest.raises(SealingError, match="tpm-reseal --for"):  # no blob for `here` any more
        tpm_sealing_secret(local_tpm, tmp_path, here)
    # The file name is not what protects it: the TPM checks the PCRs. Sealed to `here`'s PCR 16, it unseals
    # while PCR 16 holds `here`, and not once `other` is launched.
    assert tpm_sealing_secret(local_tpm, tmp_path, other) == b"\x07" * 32
    local_tpm.measured_launch(other)
    with pytest.raises(SealingError, match=r"PCRs \[16\] differ") as err:
        tpm_sealing_secret(local_tpm, tmp_path, other)
    assert err.value.details["changed_pcrs"] == [16]
