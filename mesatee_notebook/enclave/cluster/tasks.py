"""Functions the head sends to workers. Tasks travel as references to this measured module, never as code."""

from __future__ import annotations

import os
from typing import Any

__all__ = ["node_report"]


def node_report() -> dict[str, Any]:
    """What the worker running this task says about itself (the head checks it against what it verified)."""
    from distributed import get_worker

    worker = get_worker()
    node = getattr(worker.security, "node", None)
    if node is None:
        return {"address": worker.address, "attested": False}
    ident = node.identity
    return {
        "address": worker.address,
        "attested": True,
        "role": ident.role,
        "measurement": ident.measurement,
        "platform": ident.platform_fingerprint,
        "pid": os.getpid(),
    }
