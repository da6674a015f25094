"""Datasets in sealed storage: how a table and its owner's policy are kept (shared by supervisor and services).

Each dataset ``NAME`` is two sealed objects under the service prefix ``svc/``:

* ``svc/datasets/NAME/meta``: JSON ``{name, owner, policy, columns, dtypes, rows, sha256, created}``
* ``svc/datasets/NAME/data``: the table as an Arrow IPC stream.
"""

from __future__ import annotations

import json
import re
from typing import Any

from mesatee_notebook.errors import NotFound

__all__ = ["data_name", "load_meta", "meta_name", "validate_dataset_name"]

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")


def validate_dataset_name(name: str) -> str:
    """Dataset names: letters, digits, ``_.-``; at most 100 characters."""
    if not isinstance(name, str) or not _NAME.match(name):
        msg = f"invalid dataset name {name!r}: use letters, digits and _.- (at most 100 characters)"
        raise ValueError(msg)
    return name


def meta_name(name: str, *, prefix: str = "svc/") -> str:
    """Sealed name of a dataset's metadata (``prefix=""`` inside a service context)."""
    return f"{prefix}datasets/{validate_dataset_name(name)}/meta"


def data_name(name: str, *, prefix: str = "svc/") -> str:
    """Sealed name of a dataset's Arrow data."""
    return f"{prefix}datasets/{validate_dataset_name(name)}/data"


def load_meta(store: Any, name: str) -> dict[str, Any]:
    """Read a dataset's metadata from a SealedStore (supervisor side)."""
    try:
        raw = store.get(meta_name(name))
    except NotFound:
        msg = f"no dataset named {name!r} in this kernel"
        raise NotFound(msg, dataset=name) from None
    meta = json.loads(bytes(raw))
    if not isinstance(meta, dict):
        msg = f"dataset {name!r} has malformed metadata"
        raise NotFound(msg)
    return meta
