"""A host without the sandbox's mechanisms is refused; --no-sandbox is loud and refused by default policies."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import mesatee_notebook as mn
from mesatee_notebook.magics.display import AttestationCard
from tests.conftest import start_kernel, stop_kernel


def _enclave(*args: str) -> list[str]:
    return [sys.executable, "-m", "mesatee_notebook.cli", "enclave", *args]


def test_a_host_without_bubblewrap_is_refused_and_told_what_is_missing(tmp_path: Path) -> None:
    subprocess.run(_enclave("init-platform", "--data-dir", str(tmp_path)), check=True, capture_output=True)
    env = {**os.environ, "PATH": str(tmp_path / "empty-bin")}
    res = subprocess.run(
        _enclave("serve", "--port", "0", "--data-dir", str(tmp_path)),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert res.returncode == 2
    assert "bubblewrap" in res.stderr and "apt-get install bubblewrap" in res.stderr
    assert "--no-sandbox" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "kernel.json").exists()


def test_a_data_dir_the_sandbox_would_see_is_refused(tmp_path: Path) -> None:
    import mesatee_notebook

    inside = Path(mesatee_notebook.__file__).resolve().parent / ".mesatee-test-data"
    try:
        res = subprocess.run(
            _enclave("serve", "--port", "0", "--level", "unprotected", "--data-dir", str(inside)),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert res.returncode == 2
        assert "data directory" in res.stderr and "read-only" in res.stderr
    finally:
        import shutil

        shutil.rmtree(inside, ignore_errors=True)


def test_no_sandbox_is_loud_and_refused_unless_the_policy_says_otherwise(tmp_path: Path) -> None:
    k = start_kernel(tmp_path / "k", "--no-sandbox")
    try:
        log = (tmp_path / "k" / "serve.log").read_text()
        assert "SANDBOX OFF" in log
        assert k.measurement == mn.expected_measurement(sandboxed=False) != mn.expected_measurement()
        with pytest.raises(mn.SandboxRequired, match="WITHOUT a sandbox"):
            mn.connect(k.url, policy=mn.Policy(platform_roots=[k.fingerprint], measurements=[k.measurement]))
        s = mn.connect(
            k.url,
            policy=mn.Policy(platform_roots=[k.fingerprint], measurements=[k.measurement], require_sandbox=False),
            identity=False,
        )
        try:
            assert s.run("1 + 1").value == 2
            att = s.attestation
            assert not att.sandboxed and att.sandbox_note.startswith("NONE")
            card = AttestationCard(att)
            assert "NONE (--no-sandbox)" in repr(card) and "NO SANDBOX" in card._repr_html_()
            assert any(c.name == "sandbox" and "not required" in c.detail for c in att.checks)
        finally:
            s.close()
    finally:
        stop_kernel(k)


def test_the_card_and_cli_show_the_sandbox(kernel) -> None:  # type: ignore[no-untyped-def]
    s = mn.connect(kernel.url, policy=kernel.policy(), identity=False)
    try:
        card = AttestationCard(s.attestation)
        text, html = repr(card), card._repr_html_()
        assert "bubblewrap" in text and "not from the host operator" in text
        assert "sandbox details" in html and "seccomp" in html
    finally:
        s.close()
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "mesatee_notebook.cli",
            "attest",
            kernel.url,
            "--platform-root",
            kernel.fingerprint,
            "--measurement",
            kernel.measurement,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert "sandbox" in res.stdout and "bubblewrap" in res.stdout


def test_policy_files_know_require_sandbox(tmp_path: Path) -> None:
    f = tmp_path / "p.toml"
    f.write_text("require_sandbox = false\nplatform_roots = []\n")
    assert mn.Policy.from_toml(f).require_sandbox is False
    assert mn.Policy().require_sandbox is True
