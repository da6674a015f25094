"""``cluster up --bwrap``: run the scheduler and each worker in bubblewrap (mount, PID, IPC and UTS namespaces).

A node sees a read-only view of the system, the Python environment and the package (the same binds as the kernel's
executor sandbox, ``enclave/sandbox.py``), the cluster's platform directory read-only, a private ``/tmp`` (its
work directory, gone with the namespace) and its own ``/proc``. It does not see the head's data directory, the
host's ``/tmp``, home directories or any other file. It keeps the network of its namespace (a node must listen and
connect on TCP) and the launcher's uid (it must read the platform key to sign its evidence). No seccomp filter: the
executor filter forbids the sockets a node needs. The head is not wrapped: it runs its own bubblewrap sandboxes for
cells, which need privileges a nested bubblewrap would drop.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from mesatee_notebook.enclave.sandbox import Sandbox
from mesatee_notebook.errors import ClusterSetupError

__all__ = ["BWRAP_PROFILE", "PROFILES", "bwrap_prefix", "require_bwrap"]

_PRIVATE = ("/tmp", "/dev/shm")

#: What a wrapped node's evidence states (``sandbox.cluster_node.profile``) and, at tpm, what the launcher measures
#: into PCR 16 before it starts the node (node_tpm.py). A change here is a new profile digest.
BWRAP_PROFILE: dict[str, object] = {
    "format": 1,
    "name": "bwrap",
    "namespaces": ["mount", "pid", "ipc", "uts", "cgroup (if the kernel allows)"],
    "read_only": "/usr, /lib*, /bin, the loader's /etc, the Python prefixes, PYTHONPATH, the package, the platform",
    "private": ["/tmp (work directory)", "/dev/shm", "/proc (own PID namespace)"],
    "not_there": "the head's data directory, the host's /tmp, home directories, every other file",
    "network": "the node's network namespace (loopback, or its own with --netns)",
    "uid": "the launcher's",
    "seccomp": False,
}
#: Profiles by the name a launcher passes to a node (``--confinement NAME``).
PROFILES: dict[str, dict[str, object]] = {"bwrap": BWRAP_PROFILE}


def require_bwrap() -> str:
    """The path of ``bwrap``; :class:`ClusterSetupError` when bubblewrap is not installed."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        msg = "--bwrap needs bubblewrap (Debian package bubblewrap)"
        raise ClusterSetupError(msg)
    return bwrap


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def bwrap_prefix(platform_dir: Path) -> list[str]:
    """The bubblewrap command line that a node's command follows (``--`` last)."""
    sb = Sandbox()
    binds = [*sb._binds(), str(Path(platform_dir).resolve())]  # the executor sandbox's own view
    sb.binds = binds
    under = [p for p in binds if any(_inside(p, t) for t in _PRIVATE)]
    made: set[str] = set()
    args = [require_bwrap(), "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    args += ["--die-with-parent", "--tmpfs", "/"]
    args += sb._bind_args([p for p in binds if p not in under], made)
    args += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--tmpfs", "/tmp", "--perms", "1777"]
    args += ["--tmpfs", "/dev/shm"]
    args += sb._bind_args(under, {*made, *_PRIVATE})
    args += ["--remount-ro", "/", "--chdir", "/tmp", "--setenv", "TMPDIR", "/tmp", "--setenv", "HOME", "/tmp"]
    if os.environ.get("PYTHONPATH"):
        args += ["--setenv", "PYTHONPATH", os.environ["PYTHONPATH"]]
    return [*args, "--"]
