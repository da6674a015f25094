"""The JSON statement inside softtee and TPM evidence: one parser for both (pure).

Both evidence kinds carry ``canonical_json(statement)`` as a CBOR byte string. A verifier parses it before it
trusts anything; every shape error is :class:`~mesatee_notebook.errors.MalformedEvidence`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from mesatee_notebook.errors import MalformedEvidence

__all__ = ["parse_statement"]


def parse_statement(body: bytes, required: Mapping[str, type], fmt: str, what: str) -> dict[str, Any]:
    """``body`` as a JSON object holding every ``required`` field with its type, and ``format == fmt``.

    ``what`` names the evidence in messages ("softtee", "TPM evidence").
    """
    try:
        statement = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        msg = f"{what} statement is not JSON"
        raise MalformedEvidence(msg) from exc
    if not isinstance(statement, dict):
        msg = f"{what} statement must be a JSON object"
        raise MalformedEvidence(msg)
    for key, kind in required.items():
        if not isinstance(statement.get(key), kind):
            msg = f"{what} statement lacks a valid {key!r}"
            raise MalformedEvidence(msg)
    if statement["format"] != fmt:
        msg = f"unsupported evidence format {statement['format']!r} (this client reads {fmt})"
        raise MalformedEvidence(msg)
    return statement
