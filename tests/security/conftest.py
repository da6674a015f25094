"""The red-team setups: a real kernel started as root, and one started as an unprivileged user.

CI runs as root. The unprivileged kernel runs as a system user the fixture creates
(``useradd``), through ``setpriv``. The Python environment may live under a directory that
user cannot enter (``/root/.pyenv`` is 0700 there): the fixture then starts the kernel in a
private mount namespace (``unshare --mount``) where only those directories are re-bound at
the same paths and made traversable. The kernel itself, its data and its sandboxes see the
host exactly as a kernel installed for that user would.
"""

from __future__ import annotations

import fcntl
import json
import os
import pwd
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import KernelProc, start_kernel, stop_kernel

RT_USER = "mesatee-redteam"
#: The salary the red team's DP attacks try to recover (row 7 of :func:`salary_rows`).
TARGET = 123_457
#: small limits so the bombs end quickly
LIMITS = (
    "--max-processes",
    "64",
    "--cell-memory",
    "1G",
    "--tmp-size",
    "64M",
    "--max-file-size",
    "32M",
    "--cell-cpu",
    "8",  # a walk of the whole visible tree (the isolation test) takes ~2-3 CPU-s with every extra installed
)


def _ensure_user() -> pwd.struct_passwd:
    """The red-team user, created once; a host-wide lock, since pytest-xdist workers (or two runs) may ask at once."""
    lock = (Path("/run/lock") if os.path.isdir("/run/lock") else Path(tempfile.gettempdir())) / f"{RT_USER}.lock"
    with lock.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            return pwd.getpwnam(RT_USER)
        except KeyError:
            subprocess.run(
                ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", RT_USER],
                check=True,
                capture_output=True,
            )
            return pwd.getpwnam(RT_USER)


def _needed_paths() -> list[str]:
    import mesatee_notebook

    paths = {sys.prefix, sys.base_prefix, str(Path(mesatee_notebook.__file__).resolve().parent.parent)}
    paths |= {p for p in sys.path if p and os.path.isabs(p) and os.path.exists(p)}
    return sorted(paths)


def _blocked_ancestors(user: pwd.struct_passwd, paths: list[str]) -> list[str]:
    """Top-most directories on the way to ``paths`` that ``user`` cannot traverse."""
    out: list[str] = []
    for p in paths:
        parts = Path(p).parts
        for i in range(2, len(parts) + 1):
            d = str(Path(*parts[:i]))
            st = os.stat(d)
            ok = st.st_mode & 0o001 or (st.st_uid == user.pw_uid and st.st_mode & 0o100)
            if not ok:
                if not any(d == o or d.startswith(o + "/") for o in out):
                    out.append(d)
                break
    return out


def _wrapper(user: pwd.struct_passwd, argv: list[str]) -> list[str]:
    """A command that runs ``argv`` as ``user``, with the environment reachable."""
    paths = _needed_paths()
    blocked = _blocked_ancestors(user, paths)
    drop = [
        "setpriv",
        f"--reuid={user.pw_uid}",
        f"--regid={user.pw_gid}",
        "--clear-groups",
        "--",
        "env",
        "-i",
        "HOME=/tmp",
        "PATH=/usr/bin:/bin",
        f"PYTHONPATH={os.environ.get('PYTHONPATH', '')}",
        *argv,
    ]
    if not blocked:
        return drop
    script = ["set -e"]
    for i, b in enumerate(blocked):
        stash = f"/run/mesatee-rt-stash-{os.getpid()}-{i}"
        script += [
            f"mkdir -p {stash}",
            f"mount --bind {shlex.quote(b)} {stash}",
            f"mount -t tmpfs -o mode=0755 tmpfs {shlex.quote(b)}",
        ]
        for p in paths:
            if p.startswith(b + "/"):
                rel = p[len(b) + 1 :]
                script += [f"mkdir -p {shlex.quote(p)}", f"mount --bind {stash}/{shlex.quote(rel)} {shlex.quote(p)}"]
    script.append("exec " + shlex.join(drop))
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", "\n".join(script)]


def start_unprivileged_kernel(*extra: str) -> KernelProc:
    user = _ensure_user()
    data_dir = Path(tempfile.mkdtemp(prefix="mesatee-rt-"))
    os.chown(data_dir, user.pw_uid, user.pw_gid)
    data_dir.chmod(0o700)
    enclave = [sys.executable, "-m", "mesatee_notebook.cli", "enclave"]
    subprocess.run(
        _wrapper(user, [*enclave, "init-platform", "--data-dir", str(data_dir)]), check=True, capture_output=True
    )
    log_path = Path(tempfile.mkdtemp(prefix="mesatee-rt-log-")) / "serve.log"
    log = log_path.open("ab")
    proc = subprocess.Popen(
        _wrapper(user, [*enclave, "serve", "--port", "0", "--data-dir", str(data_dir), *extra]),
        stdout=log,
        stderr=log,
        stdin=subprocess.DEVNULL,
    )
    log.close()
    deadline = time.monotonic() + 120
    info_path = data_dir / "kernel.json"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"unprivileged kernel exited: {log_path.read_text()}")
        if info_path.exists():
            info = json.loads(info_path.read_text())
            fp = (data_dir / "platform" / "fingerprint").read_text().strip()
            k = KernelProc(
                f"mesatee://127.0.0.1:{info['port']}",
                "127.0.0.1",
                int(info["port"]),
                data_dir,
                fp,
                proc,
                str(info["measurement"]),
            )
            k.kernel_pid = int(info["pid"])  # type: ignore[attr-defined]
            k.log_path = log_path  # type: ignore[attr-defined]
            return k
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"unprivileged kernel did not start: {log_path.read_text()}")


@pytest.fixture(scope="module", params=["root", "user"])
def hostile_kernel(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KernelProc]:
    """A kernel with small sandbox limits, started as root and as an unprivileged user."""
    if os.geteuid() != 0:
        pytest.skip("the red-team setups need root to create the unprivileged user (CI runs as root)")
    if shutil.which("bwrap") is None:
        pytest.fail("bubblewrap is missing: scripts/_venv.sh installs it")
    if request.param == "root":
        k = start_kernel(tmp_path_factory.mktemp("rt-root"), *LIMITS)
        k.kernel_pid = k.proc.pid  # type: ignore[attr-defined]
    else:
        k = start_unprivileged_kernel(*LIMITS)
    k.setup = request.param  # type: ignore[attr-defined]
    yield k
    stop_kernel(k)
    if request.param == "user":
        shutil.rmtree(k.data_dir, ignore_errors=True)


def salary_rows(n: int, seed: int) -> Any:
    """``n`` rows of ``id`` and ``salary`` (a pandas DataFrame); row 7 earns :data:`TARGET`."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"id": np.arange(n, dtype=np.int64), "salary": rng.integers(20_000, 120_000, n)})
    df.loc[7, "salary"] = TARGET
    return df
