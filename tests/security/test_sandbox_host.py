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


@pytest.mark.slow
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


def test_binds_under_tmp_are_mounted_after_the_private_tmp() -> None:
    from mesatee_notebook.enclave.sandbox import Sandbox

    sb = Sandbox(binds=["/usr", "/tmp/checkout/.venv", "/dev/shm/env"])
    args = sb._args(service=False, uid=None)
    tmp_fs = args.index("/tmp", args.index("--tmpfs", args.index("--tmpfs") + 1))  # the second --tmpfs: /tmp
    shm_fs = args.index("/dev/shm", tmp_fs)
    bind_venv = args.index("/tmp/checkout/.venv")
    bind_shm = args.index("/dev/shm/env")
    assert args[bind_venv - 1] == "--ro-bind" and bind_venv > tmp_fs and bind_shm > shm_fs
    assert args.index("/tmp/checkout") > tmp_fs  # the directory leading to it is made inside the private /tmp
    assert args.index("/usr") < tmp_fs


@pytest.mark.slow
def test_a_package_installed_under_tmp_still_runs_sandboxed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkout or venv under /tmp (the sandbox mounts its own /tmp) is still what the sandbox imports."""
    import shutil

    src = tmp_path / "src"  # pytest's tmp_path is under /tmp
    shutil.copytree(Path(mn.__file__).parent, src / "mesatee_notebook", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setenv("PYTHONPATH", f"{src}{os.pathsep}{Path(__file__).resolve().parents[2]}")
    k = start_kernel(tmp_path / "data")
    try:
        s = mn.connect(k.url, policy=mn.Policy(platform_roots=[k.fingerprint], measurements=[k.measurement]))
        try:
            r = s.run("import mesatee_notebook, os\nos.path.dirname(mesatee_notebook.__file__)")
        finally:
            s.close()
        assert r.value == str(src / "mesatee_notebook")  # the copy under /tmp, seen inside the sandbox
    finally:
        stop_kernel(k)
