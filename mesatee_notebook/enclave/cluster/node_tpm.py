"""Cluster nodes at ``--level tpm``: one swtpm (a SOFTWARE TPM) per node, and the confinement PCR.

A tpm node quotes with the kernel's own TPM code (``enclave/tpm.py``) and evidence format (``attestation/tpm.py``):
it resets the application PCR (23) and extends the *cluster* measurement into it (the measured launch), and each
certificate carries a quote by the TPM's attestation key over the boot PCRs, the confinement PCR and the
application PCR, whose qualifying data commits to the statement and so to the TLS key. Peers verify it with
``attestation.policy.verify_certificate``, pinning the AK fingerprint as the single-node tpm level does.

**The confinement PCR** (16, resettable from locality 0): before it starts a node that it wraps in bubblewrap, the
launcher resets PCR 16 and extends SHA-256 of the confinement profile into it (:func:`prepare`). The node states
the profile in its quoted statement; a peer checks that the quoted PCR 16 is SHA-256(0³² ‖ SHA-256(profile))
(``node_identity.check_confinement``). That proves the profile was measured into the node's TPM by whoever held
the TPM before the node served (the launcher: the operator's software), and that the measured node code saw
itself under bubblewrap (``node._check_bwrapped``). With swtpm, whoever runs the host holds the TPM's keys and can
set any PCR: a software TPM is software trust.

``python -m mesatee_notebook.enclave.cluster.node_tpm prepare --tcti T [--profile JSON]`` is what the launcher runs
(inside the node's network namespace with ``--netns``): it waits for swtpm, measures the profile, prints the AK.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import psutil

from mesatee_notebook.attestation.measurement import canonical_json
from mesatee_notebook.attestation.tpm import app_pcr_value
from mesatee_notebook.errors import ClusterSetupError, LevelNotAvailableError

if TYPE_CHECKING:
    from mesatee_notebook.enclave.tpm import Tpm

__all__ = [
    "CONFINEMENT_PCR",
    "NODE_APP_PCR",
    "NODE_BOOT_PCRS",
    "SOFTWARE_TPM_NOTE",
    "SwtpmProc",
    "confinement_digest",
    "confinement_pcr_value",
    "free_port_pair",
    "open_node_tpm",
    "prepare",
    "start_swtpm",
    "swtpm_listening",
]

NODE_APP_PCR: Final = 23
CONFINEMENT_PCR: Final = 16
NODE_BOOT_PCRS: Final = (0, 1, 2, 3, 4, 5, 6, 7)
SOFTWARE_TPM_NOTE: Final = (
    "each node quotes with its own swtpm, a SOFTWARE TPM: whoever runs this host holds its keys and can set its PCRs"
)
_SWTPM_PORT_IN_NETNS: Final = 2321


def confinement_digest(profile: dict[str, Any]) -> str:
    """SHA-256 (hex) of a confinement profile's canonical JSON: what the launcher extends into PCR 16."""
    return hashlib.sha256(canonical_json(profile)).hexdigest()


def confinement_pcr_value(profile: dict[str, Any]) -> str:
    """PCR 16 after a reset and one extend with the profile's digest."""
    return app_pcr_value(confinement_digest(profile))


def open_node_tpm(tcti: str) -> Tpm:
    """A node's TPM: measured launch into PCR 23; quotes cover the boot PCRs, PCR 16 and PCR 23. No EK is loaded."""
    from mesatee_notebook.enclave.tpm import open_tpm

    return open_tpm(tcti, app_pcr=NODE_APP_PCR, boot_pcrs=(*NODE_BOOT_PCRS, CONFINEMENT_PCR), with_ek=False)


def prepare(tcti: str, profile: dict[str, Any] | None, wait: float = 30.0) -> dict[str, str]:
    """Wait for the TPM; with a profile, reset PCR 16 and extend its digest; return the AK fingerprint and kind."""
    # A node's TPM needs no EK certificate (peers pin its AK): do not warn about a missing one for each node.
    quiet = logging.getLogger("mesatee.enclave")
    level = quiet.level
    quiet.setLevel(max(level, logging.ERROR))
    try:
        return _prepare(tcti, profile, wait)
    finally:
        quiet.setLevel(level)


def _prepare(tcti: str, profile: dict[str, Any] | None, wait: float) -> dict[str, str]:
    from mesatee_notebook.attestation.tpm import ak_fingerprint
    from mesatee_notebook.enclave.tpm import open_tpm

    deadline = time.monotonic() + wait
    while True:
        try:
            # Tpm.measured_launch on PCR 16 is exactly "reset, extend once, check": the launcher's measurement.
            tpm = open_tpm(tcti, app_pcr=CONFINEMENT_PCR, boot_pcrs=(), with_ek=False)
            break
        except LevelNotAvailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    with tpm:
        if profile is not None:
            tpm.measured_launch(confinement_digest(profile))
        return {"ak": ak_fingerprint(tpm.ak_public), "kind": tpm.kind, "vendor": tpm.vendor}


# -- swtpm processes (the launcher's) ------------------------------------------------------------------------------


class SwtpmProc:
    """One node's swtpm: its process, TCTI and state directory."""

    def __init__(self, proc: subprocess.Popen[bytes], tcti: str, state: Path) -> None:
        self.proc, self.tcti, self.state = proc, tcti, state

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def free_port_pair() -> int:
    """P such that P and P+1 are free on loopback (swtpm's server and control ports); tests/tpm uses it too."""
    import socket

    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = int(a.getsockname()[1])
            if port >= 65535:
                continue
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port
    msg = "no two adjacent free ports on 127.0.0.1 for a node's swtpm"
    raise ClusterSetupError(msg)


def swtpm_listening(proc: subprocess.Popen[bytes], port: int, deadline: float) -> bool:
    """True once ``proc`` itself listens on ``port`` and ``port + 1``; False if it exits or ``deadline`` passes."""
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            ports = {c.laddr.port for c in psutil.Process(proc.pid).net_connections("tcp") if c.status == "LISTEN"}
        except psutil.Error:
            ports = set()
        if {port, port + 1} <= ports:
            return True
        time.sleep(0.05)
    return False


def start_swtpm(
    state: Path, log: Path, prefix: list[str], preexec: Callable[[], None] | None, *, in_netns: bool
) -> SwtpmProc:
    """Start swtpm on TCP (state in ``state``, persistent: the same AK every start).

    On the host's loopback a free port pair is chosen and tried again if swtpm cannot bind it (another process took
    it first), as tests/tpm does; in a node's own network namespace port 2321 is free by construction.
    """
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    for _ in range(5):
        port = _SWTPM_PORT_IN_NETNS if in_netns else free_port_pair()
        with log.open("ab") as fh:
            proc = subprocess.Popen(
                [
                    *prefix, "swtpm", "socket", "--tpm2", "--tpmstate", f"dir={state}",
                    "--server", f"type=tcp,port={port},bindaddr=127.0.0.1",
                    "--ctrl", f"type=tcp,port={port + 1},bindaddr=127.0.0.1",
                    "--flags", "not-need-init,startup-clear",
                ],
                stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                preexec_fn=preexec,  # noqa: PLW1509 (the launcher runs no threads)
            )  # fmt: skip
        if in_netns or swtpm_listening(proc, port, time.monotonic() + 20):
            return SwtpmProc(proc, f"swtpm:host=127.0.0.1,port={port}", state)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    msg = f"swtpm did not start (log: {log}): {log.read_text(errors='replace').strip()[-300:]}"
    raise ClusterSetupError(msg)


def run_prepare(tcti: str, profile: dict[str, Any] | None, prefix: list[str]) -> subprocess.Popen[str]:
    """Start :func:`prepare` in a subprocess (under ``prefix``: the node's namespace); its stdout is one JSON line."""
    args = [*prefix, sys.executable, "-m", "mesatee_notebook.enclave.cluster.node_tpm", "prepare", "--tcti", tcti]
    if profile is not None:
        args += ["--profile", json.dumps(profile)]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def prepared(proc: subprocess.Popen[str], name: str, timeout: float = 90.0) -> dict[str, str]:
    """The AK fingerprint and kind that :func:`run_prepare` printed; ClusterSetupError with its error otherwise."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    if proc.returncode != 0:
        msg = f"the TPM of {name} did not answer: {(err or out).strip().splitlines()[-1:] or ['no output']}"
        raise ClusterSetupError(msg)
    with contextlib.suppress(ValueError):
        answer = json.loads(out.strip().splitlines()[-1])
        if isinstance(answer, dict) and "ak" in answer:
            return {str(k): str(v) for k, v in answer.items()}
    msg = f"the TPM of {name} gave no attestation key: {out.strip()[-200:]}"
    raise ClusterSetupError(msg)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="node_tpm")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--tcti", required=True)
    p.add_argument("--profile", default=None)
    args = parser.parse_args(argv)
    profile = json.loads(args.profile) if args.profile else None
    try:
        answer = prepare(args.tcti, profile)
    except LevelNotAvailableError as exc:
        print(f"node_tpm: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(answer), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
