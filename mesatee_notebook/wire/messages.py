"""Protocol version and message types of the client ↔ kernel channel (pure)."""

from __future__ import annotations

from typing import Any

from mesatee_notebook.errors import MalformedFrame, VersionMismatch
from mesatee_notebook.wire.protocol import REQUEST_TYPES as _REQUEST_TYPES

__all__ = [
    "PROTOCOL_VERSION",
    "SUPPORTED_VERSIONS",
    "REQUEST_TYPES",
    "negotiate",
    "require",
    "sealed_state_summary",
]

#: Bumped on any incompatible change of framing, message fields or codecs.
PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = frozenset({1})

#: Requests a client may send after the handshake (derived from the message classes of wire/protocol.py).
REQUEST_TYPES = _REQUEST_TYPES


def negotiate(offered: Any, *, client_version: str, server_version: str) -> int:
    """Pick the protocol version from the client's offer, or explain the mismatch in one sentence."""
    if not isinstance(offered, list) or not all(isinstance(v, int) for v in offered):
        msg = "hello must offer a list of integer protocol versions"
        raise MalformedFrame(msg)
    common = SUPPORTED_VERSIONS.intersection(offered)
    if not common:
        newer = max(offered, default=0) > max(SUPPORTED_VERSIONS)
        side = "the kernel" if newer else "the client"
        msg = (
            f"protocol mismatch: client mesatee_notebook {client_version} speaks {sorted(offered)}, "
            f"kernel mesatee_notebook {server_version} speaks {sorted(SUPPORTED_VERSIONS)}; "
            f"upgrade mesatee_notebook on {side} side."
        )
        raise VersionMismatch(msg)
    return max(common)


def require(header: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    """Return ``header[key]`` if it has the expected type, else raise MalformedFrame."""
    value = header.get(key)
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        msg = f"message {header.get('t')!r} needs field {key!r} of type {names}"
        raise MalformedFrame(msg)
    return value


def sealed_state_summary(status: dict[str, Any] | None) -> list[str]:
    """Sentences for a ``migration`` status reply: state sealed for other measurements (kernel log, attest, card)."""
    lines = []
    for s in (status or {}).get("stores", []):
        m = s["measurement"]
        what = (
            f"{s['datasets']} dataset{'s' if s['datasets'] != 1 else ''} of {s['owners']} "
            f"owner{'s' if s['owners'] != 1 else ''}"
        )
        if not s["known"]:
            lines.append(
                f"{s['files']} sealed files from a kernel before the migration index (measurement unknown) "
                f"are kept in sealed-parked/{m}; an owner who knows that measurement (from a receipt or "
                "`mesatee attest` of the old kernel) can approve a migration from it"
            )
            continue
        if not s["datasets"]:
            lines.append(
                f"{s['files']} sealed files remain for measurement {m} (no datasets: jobs, models or cell "
                "files waiting for their owners' grants, caches and bookkeeping that do not move)"
            )
            continue
        extra = f" ({s['files']} sealed files in all)"
        rollback = "; moving them here is a rollback to older code" if s["rollback"] else ""
        verb, them = ("is", "it needs") if s["datasets"] == 1 else ("are", "they need")
        lines.append(f"{what} {verb} sealed for measurement {m}{extra}; {them} a migration{rollback}")
    return lines
