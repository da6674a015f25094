"""Every CLI error is one clear line with a non-zero exit, never a traceback (issue 19, item 5 and 8)."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesatee_notebook.cli import client_main
from tests.conftest import KernelProc

VECTORS = Path(__file__).resolve().parents[1] / "hardware" / "vectors"


def _run(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mesatee_notebook.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def _one_line_refusal(run: subprocess.CompletedProcess[str], *words: str) -> str:
    err = run.stderr.strip()
    assert run.returncode == 2, (run.returncode, run.stdout, run.stderr)
    assert "Traceback" not in run.stderr + run.stdout, run.stderr
    assert len(err.splitlines()) == 1, err  # one sentence, not the usage or a trace
    for word in words:
        assert word in err, (word, err)
    return err


@pytest.fixture(scope="module")
def platform_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cli_platform")
    subprocess.run(
        [sys.executable, "-m", "mesatee_notebook.cli", "enclave", "init-platform", "--data-dir", str(d)],
        check=True,
        capture_output=True,
    )
    return d


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--level", "bogus"], ["--level", "unknown security level 'bogus'", "softtee"]),
        (["--executor-memory", "8Q"], ["--executor-memory", "'8Q' is not a size", "8g"]),
        (["--cell-memory=-1g"], ["--cell-memory", "negative"]),
        (["--port", "70000"], ["--port", "0 to 65535"]),
        (["--idle-connection-timeout", "soon"], ["--idle-connection-timeout", "not a number of seconds"]),
    ],
    ids=["level", "size", "negative-size", "port-range", "timeout"],
)
def test_serve_bad_arguments_are_one_line(platform_dir: Path, flags: list[str], words: list[str]) -> None:
    _one_line_refusal(_run("enclave", "serve", "--data-dir", str(platform_dir), *flags), *words)


@pytest.mark.slow  # starts a kernel (its sandbox self-test) before the refusal
def test_serve_on_a_port_in_use_says_so(platform_dir: Path, busy_port: int) -> None:
    run = _run("enclave", "serve", "--data-dir", str(platform_dir), "--port", str(busy_port))
    _one_line_refusal(run, f"port {busy_port} on 127.0.0.1 is already in use", "--port")


@pytest.mark.slow  # starts a kernel (its sandbox self-test) before the refusal
def test_serve_on_a_bad_host_says_so(platform_dir: Path) -> None:
    run = _run("enclave", "serve", "--data-dir", str(platform_dir), "--port", "0", "--host", "no-such-host.invalid")
    _one_line_refusal(run, "cannot resolve --host 'no-such-host.invalid'")
    run = _run("enclave", "serve", "--data-dir", str(platform_dir), "--port", "0", "--host", "192.0.2.7")
    _one_line_refusal(run, "--host 192.0.2.7 is not an address of this machine")


def test_attest_validates_measurement_and_reports_unreachable(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        client_main(["attest", "mesatee://127.0.0.1:1", "--measurement", "abc"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "'abc' is not a measurement: give 64 hex digits" in err
    assert client_main(["attest", "mesatee://127.0.0.1:1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mesatee: cannot reach") and "REFUSED" not in err


@pytest.mark.slow  # starts a kernel (its sandbox self-test) before the refusal
def test_attest_without_a_root_says_how_to_pin_one(kernel: KernelProc, capsys: pytest.CaptureFixture[str]) -> None:
    assert client_main(["attest", kernel.url]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("REFUSED [platform-root] (UntrustedPlatform)") and len(err.splitlines()) == 1, err
    assert f"--platform-root {kernel.fingerprint}" in err, err
    # with the hint followed, it attests
    assert client_main(["attest", kernel.url, "--platform-root", kernel.fingerprint]) == 0
    assert "SOFTWARE" in capsys.readouterr().out


def test_attest_refusals_name_the_cli_flags(capsys: pytest.CaptureFixture[str]) -> None:
    from mesatee_notebook.cli import _in_cli_words

    text = "send. Refused. Pass allow_unprotected=True only for development on a machine you control."
    assert "--allow-unprotected" in _in_cli_words(text) and "allow_unprotected=True" not in _in_cli_words(text)
    debug = "a debug TD, refused because the policy does not set allow_debug=True"
    assert _in_cli_words(debug).endswith("does not set --allow-debug")
    # a debug enclave through the real CLI: the refusal says --allow-debug, and the flag accepts it
    cert = VECTORS / "sgx" / "gramine-cert.pem"
    assert client_main(["attest", "--evidence", str(cert)]) == 1
    err = capsys.readouterr().err
    assert "REFUSED [debug]" in err and "does not set --allow-debug" in err and "allow_debug=True" not in err
    assert client_main(["attest", "--evidence", str(cert), "--allow-debug"]) == 0
    assert "accepted only because --allow-debug is given" in capsys.readouterr().out


def test_cert_chain_repeats_and_tdx_is_not_called_verified(capsys: pytest.CaptureFixture[str]) -> None:
    snp = VECTORS / "snp"
    argv = ["attest", "--evidence", str(snp / "virtee_report_milan.hex"), "--as-of", "2024-06-01"]
    chain = ["--cert-chain", str(snp / "virtee_vcek_milan.der"), "--cert-chain", str(snp / "virtee_cert_chain_milan")]
    assert client_main([*argv, *chain]) == 0  # the VCEK (DER) and the ASK/ARK chain (PEM), as two flags
    out = capsys.readouterr().out
    assert "AMD certificate chain: SEV-VCEK -> SEV-Milan -> ARK-Milan" in out
    assert client_main([*argv, *chain[2:]]) == 1  # the chain alone lacks the VCEK: refused, not silently kept
    assert "VCEK" in capsys.readouterr().err
    assert client_main(["attest", "--evidence", str(VECTORS / "tdx" / "tdx_prod_quote_SPR_E4.dat")]) == 0
    first, second = capsys.readouterr().out.splitlines()[:2]
    assert first.startswith("PARTLY VERIFIED TDX quote v4: tee=tdx, level=sev (the confidential-VM level")
    assert "checks are NOT CHECKED" in second
