"""The head's child process running xgboost's federated server (``python -m`` this module; see ``gbdt_fed.py``).

It reads one JSON line on stdin (world size, the server's key and certificate, the client-root bundle), puts them in
anonymous memfds (never on disk, argv or environment), starts ``xgboost.federated.FederatedTracker`` with mutual TLS
on a free port, prints ``{"port": N}`` and serves until stdin closes (the head finished, or died), then exits. The
head SIGKILLs it to end a failed training (xgboost's server cannot be stopped while a handler waits for a lost rank).
"""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    """Serve one training's collective (see the module's docstring)."""
    from mesatee_notebook.enclave.hardening import harden_process

    harden_process()  # no core dumps, not dumpable: it holds the head's TLS key
    request = json.loads(sys.stdin.readline())
    paths = []
    for blob in (request["key"], request["cert"], request["clients"]):
        fd = os.memfd_create("mesatee-fed", os.MFD_CLOEXEC)
        os.write(fd, blob.encode())
        paths.append(f"/proc/self/fd/{fd}")
    from xgboost.federated import FederatedTracker

    tracker = FederatedTracker(
        n_workers=int(request["n_workers"]),
        port=0,
        secure=True,
        server_key_path=paths[0],
        server_cert_path=paths[1],
        client_cert_path=paths[2],
    )
    tracker.start()
    port = int(tracker.worker_args()["dmlc_tracker_port"])
    sys.stdout.write(json.dumps({"port": port}) + "\n")
    sys.stdout.flush()
    sys.stdin.read()  # until the head closes the pipe (or dies)
    os._exit(0)  # not tracker.free(): it would wait for handlers of a broken group


if __name__ == "__main__":
    main()
