"""Payload digests: BLAKE3 for every byte a receipt names, SHA-256 where a standard fixes the hash.

Both ends hash every payload byte they move (the client while sending, the kernel while receiving, and
the other way round for results), so the digest's speed bounds an upload. On the reference machine
SHA-256 (SHA-NI) runs at about 1.8 GB/s and BLAKE3 (the ``blake3`` package, one thread) at about
4.6 GB/s, so payload digests are BLAKE3, named ``"blake3"`` in the in-toto DigestSet of each receipt
subject. SHA-256 stays where a standard or an identity fixes it: the measurement and its manifest, the
key binding in ``report_data``, TPM PCRs and quotes, the code digest in the predicate (``code.sha256``),
and at-rest digests of sealed objects. See docs/attestation.md ("Digests").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import blake3

PAYLOAD_DIGEST = "blake3"
"""The in-toto DigestSet algorithm name of payload and subject digests."""

LEGACY_DIGESTS = ("sha256",)
"""Algorithms a receipt made by an earlier release may name for its subjects (read, never written)."""


class Hasher(Protocol):
    """What :func:`payload_hasher` returns (the hashlib interface)."""

    def update(self, data: Any, /) -> object: ...

    def hexdigest(self) -> str: ...


def payload_hasher() -> Hasher:
    """A fresh incremental payload hasher (BLAKE3, one thread; it releases the GIL on large buffers)."""
    return blake3.blake3()


def payload_digest(data: bytes | bytearray | memoryview) -> str:
    """The payload digest (BLAKE3 hex) of one buffer."""
    return str(blake3.blake3(data).hexdigest())


def digest_set(hexdigest: str) -> dict[str, str]:
    """The in-toto DigestSet of a payload digest."""
    return {PAYLOAD_DIGEST: hexdigest}


def from_digest_set(digests: Mapping[str, Any]) -> str | None:
    """The payload digest a DigestSet names: BLAKE3, or the SHA-256 of a receipt made before BLAKE3."""
    for alg in (PAYLOAD_DIGEST, *LEGACY_DIGESTS):
        value = digests.get(alg)
        if isinstance(value, str):
            return value
    return None


__all__ = [
    "LEGACY_DIGESTS",
    "PAYLOAD_DIGEST",
    "Hasher",
    "digest_set",
    "from_digest_set",
    "payload_digest",
    "payload_hasher",
]
