"""The head's child process running xgboost's federated server (``python -m`` this module; see ``gbdt_fed.py``).

It reads one JSON line on stdin (world size, the server's key and certificate, the client-root bundle), puts them in
anonymous memfds (never on disk, argv or environment), starts xgboost's federated tracker (the C API behind
``xgboost.federated.FederatedTracker``) with mutual TLS on a free port, prints ``{"port": N}`` and serves until
stdin closes (the head finished, or died), then exits. The head SIGKILLs it to end a failed training (xgboost's
server cannot be stopped while a handler waits for a lost rank).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import json
import os
import sys
import time
from pathlib import Path


def _listening_port(timeout: float = 30.0) -> int:
    """The port of the TCP listener this process opened (gRPC's server), from /proc.

    Not ``tracker.worker_args()``: it also looks for a host address, and fails ("Network is unreachable") in a
    network namespace without a default route, as in ``cluster up --netns``.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        mine = set()
        for fd in Path("/proc/self/fd").iterdir():
            with contextlib.suppress(OSError):
                target = str(fd.readlink())
                if target.startswith("socket:["):
                    mine.add(target[8:-1])
        for table in ("tcp", "tcp6"):
            with contextlib.suppress(OSError):
                for line in Path("/proc/self/net", table).read_text().splitlines()[1:]:
                    fields = line.split()
                    if fields[3] == "0A" and fields[9] in mine:  # LISTEN, one of our sockets
                        return int(fields[1].rsplit(":", 1)[1], 16)
        time.sleep(0.05)
    msg = f"xgboost's federated server opened no listener within {timeout:g} s"
    raise OSError(msg)


def _libxgboost() -> ctypes.CDLL:
    """The xgboost library itself, through its C API as ``xgboost.federated.FederatedTracker`` drives it.

    Not ``import xgboost``: the package imports scikit-learn, SciPy and pandas first (about 2 s of CPU, 6 s wall on
    a loaded host, at every training), and the server needs none of them.
    """
    spec = importlib.util.find_spec("xgboost")
    if spec is None or not spec.submodule_search_locations:
        msg = "xgboost is not installed"
        raise OSError(msg)
    lib = ctypes.CDLL(str(Path(next(iter(spec.submodule_search_locations))) / "lib" / "libxgboost.so"))
    lib.XGBGetLastError.restype = ctypes.c_char_p
    return lib


def _check(lib: ctypes.CDLL, status: int) -> None:
    if status != 0:
        raise OSError(str(lib.XGBGetLastError().decode(errors="replace")))


def main() -> None:
    """Serve one training's collective (see the module's docstring); any failure ends the process at once."""
    try:
        _serve()
    except BaseException as exc:  # the gRPC thread would keep a raising interpreter alive: exit now
        sys.stderr.write(f"federated server: {type(exc).__name__}: {exc}\n")
        sys.stderr.flush()
        os._exit(1)


def _serve() -> None:
    from mesatee_notebook.enclave.hardening import harden_process

    harden_process()  # no core dumps, not dumpable: it holds the head's TLS key
    request = json.loads(sys.stdin.readline())
    paths = []
    for blob in (request["key"], request["cert"], request["clients"]):
        fd = os.memfd_create("mesatee-fed", os.MFD_CLOEXEC)
        os.write(fd, blob.encode())
        paths.append(f"/proc/self/fd/{fd}")
    lib = _libxgboost()
    handle = ctypes.c_void_p()
    config = {
        "n_workers": int(request["n_workers"]),
        "port": 0,
        "dmlc_communicator": "federated",
        "federated_secure": True,
        "server_key_path": paths[0],
        "server_cert_path": paths[1],
        "client_cert_path": paths[2],
        "timeout": 300,
    }
    _check(lib, lib.XGTrackerCreate(json.dumps(config).encode(), ctypes.byref(handle)))  # FederatedTracker(...)
    _check(lib, lib.XGTrackerRun(handle, b"{}"))  # .start()
    sys.stdout.write(json.dumps({"port": _listening_port()}) + "\n")
    sys.stdout.flush()
    sys.stdin.read()  # until the head closes the pipe (or dies)
    # Exit while the tracker is still referenced: freeing it would wait for the handlers of a broken group.
    os._exit(0)


if __name__ == "__main__":
    main()
