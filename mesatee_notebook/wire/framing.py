"""Frame layout of the mesatee wire protocol (pure: no I/O).

A message is one fixed prefix, one msgpack header and zero or more raw payloads::

    +------+-------------+----------------+------------------+----------------------+
    | MTEE | header_len  | payload_total  | header (msgpack) | payload bytes ...    |
    | 4 B  | u32 BE      | u64 BE         | header_len bytes | payload_total bytes  |
    +------+-------------+----------------+------------------+----------------------+

The header is a map with at least ``t`` (message type) and ``p`` (the list of
payload lengths, summing to ``payload_total``). Payloads follow back to back and
are never copied or parsed by the framing layer: large ones are received
straight into their final buffer.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import msgpack

from mesatee_notebook.errors import FrameTooLarge, MalformedFrame

__all__ = [
    "MAGIC",
    "PREFIX",
    "Limits",
    "pack_header",
    "unpack_header",
    "unpack_prefix",
]

MAGIC = b"MTEE"
PREFIX = struct.Struct("!4sIQ")


@dataclass(frozen=True, slots=True)
class Limits:
    """Size limits enforced before any byte of a header or payload is read."""

    max_header: int = 1 << 20
    max_payload: int = 16 << 30
    max_payloads: int = 4096
    #: Why these limits apply, appended to a refusal (e.g. "before 'hello'"); empty for the plain limit.
    scope: str = ""

    def reason(self) -> str:
        """The scope, as a suffix for a refusal message."""
        return f" {self.scope}" if self.scope else ""

    def check_prefix(self, header_len: int, payload_total: int) -> None:
        """Refuse a frame whose declared sizes exceed the limits."""
        if header_len > self.max_header:
            msg = f"frame header of {header_len} bytes is over the limit of {self.max_header} bytes{self.reason()}"
            raise FrameTooLarge(msg, limit=self.max_header, size=header_len)
        if payload_total > self.max_payload:
            msg = f"payload of {payload_total} bytes is over the limit of {self.max_payload} bytes{self.reason()}"
            raise FrameTooLarge(msg, limit=self.max_payload, size=payload_total)


def pack_header(header: dict[str, Any], payload_sizes: list[int]) -> bytes:
    """Return prefix + msgpack header for a message with the given payload sizes."""
    body = dict(header)
    body["p"] = list(payload_sizes)
    raw = msgpack.packb(body, use_bin_type=True)
    return PREFIX.pack(MAGIC, len(raw), sum(payload_sizes)) + raw


def unpack_prefix(prefix: bytes, limits: Limits) -> tuple[int, int]:
    """Parse the fixed prefix; return (header_len, payload_total)."""
    if len(prefix) != PREFIX.size:
        msg = f"truncated frame prefix ({len(prefix)} of {PREFIX.size} bytes)"
        raise MalformedFrame(msg)
    magic, header_len, payload_total = PREFIX.unpack(prefix)
    if magic != MAGIC:
        msg = "the peer did not send a mesatee frame (bad magic bytes); is this a mesatee kernel?"
        raise MalformedFrame(msg)
    limits.check_prefix(header_len, payload_total)
    return header_len, payload_total


def unpack_header(raw: bytes, payload_total: int, limits: Limits) -> dict[str, Any]:
    """Decode and structurally check a header against the prefix it came with."""
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        msg = f"frame header is not valid msgpack: {type(exc).__name__}"
        raise MalformedFrame(msg) from exc
    if not isinstance(header, dict) or not isinstance(header.get("t"), str):
        msg = "frame header must be a map with a string message type 't'"
        raise MalformedFrame(msg)
    if "p" not in header:
        msg = "frame header has no payload length list 'p'"
        raise MalformedFrame(msg)
    sizes = header["p"]
    if not isinstance(sizes, list) or not all(isinstance(s, int) and s >= 0 for s in sizes):
        msg = "frame header 'p' must be a list of payload lengths"
        raise MalformedFrame(msg)
    if len(sizes) > limits.max_payloads:
        msg = f"{len(sizes)} payloads in one frame is over the limit of {limits.max_payloads}{limits.reason()}"
        raise FrameTooLarge(msg, limit=limits.max_payloads, size=len(sizes))
    if sum(sizes) != payload_total:
        msg = "payload lengths in the header do not add up to the prefix's total"
        raise MalformedFrame(msg)
    return header
