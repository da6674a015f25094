"""A minimal, strict-enough DER walker: enough to read X.509 extensions and the SPKI.

This is parsing, not cryptography. It exists because cryptography >= 49 refuses some
certificates produced by old mbedTLS (NULL parameters in an ECDSA AlgorithmIdentifier),
and RA-TLS evidence must still be read from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from mesatee_notebook.attestation.hardware._errors import malformed

__all__ = ["Tlv", "children", "decode_oid", "decode_time", "read_tlv", "read_single"]

SEQUENCE = 0x30
SET = 0x31
OID = 0x06
OCTET_STRING = 0x04
BIT_STRING = 0x03
BOOLEAN = 0x01
INTEGER = 0x02
UTC_TIME = 0x17
GENERALIZED_TIME = 0x18
_MAX_DEPTH = 64


@dataclass(frozen=True, slots=True)
class Tlv:
    """One DER element inside ``buf``: tag, where it starts, where its content starts and ends."""

    buf: bytes
    tag: int
    start: int
    content_start: int
    end: int

    @property
    def content(self) -> bytes:
        """The element's content octets."""
        return self.buf[self.content_start : self.end]

    @property
    def raw(self) -> bytes:
        """The whole encoded element (tag, length and content)."""
        return self.buf[self.start : self.end]


def read_tlv(buf: bytes, pos: int, limit: int, what: str = "DER") -> Tlv:
    """Read the element at ``pos`` that must end by ``limit``."""
    if pos + 2 > limit:
        raise malformed(what, f"truncated DER element at offset {pos}")
    tag = buf[pos]
    if tag & 0x1F == 0x1F:
        raise malformed(what, f"multi-byte DER tag at offset {pos} is not supported")
    first = buf[pos + 1]
    off = pos + 2
    if first < 0x80:
        length = first
    else:
        n = first & 0x7F
        if n == 0 or n > 4:
            raise malformed(what, f"unsupported DER length form at offset {pos}")
        if off + n > limit:
            raise malformed(what, f"truncated DER length at offset {pos}")
        length = int.from_bytes(buf[off : off + n], "big")
        off += n
    end = off + length
    if end > limit:
        raise malformed(what, f"DER element at offset {pos} runs past its container")
    return Tlv(buf, tag, pos, off, end)


def read_single(buf: bytes, what: str = "DER") -> Tlv:
    """Read exactly one element spanning the whole of ``buf``."""
    tlv = read_tlv(buf, 0, len(buf), what)
    if tlv.end != len(buf):
        raise malformed(what, f"{len(buf) - tlv.end} unexpected bytes after the DER element")
    return tlv


def children(tlv: Tlv, what: str = "DER") -> list[Tlv]:
    """Return the elements inside a constructed element, in order."""
    if not tlv.tag & 0x20:
        raise malformed(what, f"expected a constructed DER element, got tag 0x{tlv.tag:02x}")
    out: list[Tlv] = []
    pos = tlv.content_start
    while pos < tlv.end:
        child = read_tlv(tlv.buf, pos, tlv.end, what)
        out.append(child)
        pos = child.end
    return out


def expect(tlv: Tlv, tag: int, what: str) -> Tlv:
    """Return ``tlv`` if its tag is ``tag``; refuse it otherwise."""
    if tlv.tag != tag:
        raise malformed(what, f"expected DER tag 0x{tag:02x}, got 0x{tlv.tag:02x}")
    return tlv


def decode_oid(content: bytes, what: str = "OID") -> str:
    """Dotted form of an OBJECT IDENTIFIER's content octets."""
    if not content or content[-1] & 0x80:
        raise malformed(what, "empty or unterminated OBJECT IDENTIFIER")
    arcs: list[int] = []
    value = 0
    for byte in content:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    first = arcs[0]
    head = [min(first // 40, 2), first - 40 * min(first // 40, 2)]
    return ".".join(str(a) for a in head + arcs[1:])


def decode_time(tlv: Tlv, what: str = "certificate validity") -> datetime:
    """Decode a UTCTime or GeneralizedTime (``Z`` form) to an aware datetime."""
    formats = {UTC_TIME: "%y%m%d%H%M%SZ", GENERALIZED_TIME: "%Y%m%d%H%M%SZ"}
    fmt = formats.get(tlv.tag)
    if fmt is None:
        raise malformed(what, f"unexpected time tag 0x{tlv.tag:02x}")
    try:
        parsed = datetime.strptime(tlv.content.decode("ascii"), fmt)
    except (UnicodeDecodeError, ValueError):
        parsed = None
    if parsed is None:
        raise malformed(what, f"unreadable time {tlv.content!r}")
    return parsed.replace(tzinfo=UTC)
