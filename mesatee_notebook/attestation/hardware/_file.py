"""The one place in ``attestation/`` that reads files: the CLI's ``mesatee attest --evidence``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, date, datetime
from pathlib import Path

from mesatee_notebook.attestation.hardware._detect import verify_evidence
from mesatee_notebook.attestation.hardware._errors import malformed
from mesatee_notebook.attestation.hardware._verdict import Verdict
from mesatee_notebook.attestation.hardware.policy import HardwarePolicy

__all__ = ["parse_as_of", "verify_evidence_file"]

_AS_OF = "--as-of"

_MAX_FILE = 1 << 20


def parse_as_of(value: datetime | date | str | None) -> datetime | None:
    """``2024-06-01``, ``2024-06-01T12:00:00`` or a datetime; naive means UTC."""
    if value is None or isinstance(value, datetime):
        return value if value is None or value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise malformed(_AS_OF, f"{value!r} is not an ISO date such as 2024-06-01") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _read(path: str | os.PathLike[str], what: str) -> bytes:
    p = Path(path)
    try:
        with p.open("rb") as fh:
            data = fh.read(_MAX_FILE + 1)
    except OSError as exc:
        raise malformed(what, f"cannot read {p}: {exc.strerror or exc}") from exc
    if len(data) > _MAX_FILE:
        raise malformed(what, f"{p} is larger than {_MAX_FILE} bytes; evidence is a few kilobytes")
    return data


def verify_evidence_file(
    path: str | os.PathLike[str],
    cert_chain_path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
    as_of: datetime | date | str | None = None,
    policy: HardwarePolicy | None = None,
    *,
    allow_debug: bool | None = None,
) -> Verdict:
    """Read evidence (and optional endorsement certificates) from files and verify them.

    ``cert_chain_path`` may name several files (PEM or DER, e.g. the VCEK and the ASK/ARK chain); their
    certificates are read in order. ``as_of`` and ``allow_debug`` (when given) override the policy's fields;
    they are the CLI's ``--as-of`` and ``--allow-debug``.
    """
    policy = policy or HardwarePolicy()
    when = parse_as_of(as_of)
    if when is not None:
        policy = replace(policy, as_of=when)
    if allow_debug is not None:
        policy = replace(policy, allow_debug=allow_debug)
    data = _read(path, "evidence file")
    paths = [cert_chain_path] if isinstance(cert_chain_path, (str, os.PathLike)) else list(cert_chain_path or [])
    chain = b"\n".join(_read(c, "certificate chain file") for c in paths) if paths else None
    return verify_evidence(data, cert_chain=chain, policy=policy)
