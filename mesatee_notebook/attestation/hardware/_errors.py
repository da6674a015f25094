"""Specific refusals of the hardware verifiers, all inside the package's one error tree.

Every error raised here carries ``details["check"]``: the plain-words name of the
check that failed (e.g. ``"quote signature"``), and its message starts with it.
"""

from __future__ import annotations

from typing import Any, TypeVar

from mesatee_notebook.errors import (
    AttestationError,
    EvidenceSignatureError,
    MalformedEvidence,
    UntrustedPlatform,
)

__all__ = [
    "ChainBroken",
    "EndorsementMismatch",
    "MissingEndorsement",
    "RootNotTrusted",
    "TcbTooLow",
    "malformed",
    "refuse",
]

E = TypeVar("E", bound=AttestationError)


class ChainBroken(EvidenceSignatureError):
    """A certificate in the chain is not signed by the next one (or not a CA)."""

    code = "attestation.signature.chain"
    check = "certificate chain"


class RootNotTrusted(UntrustedPlatform):
    """The chain ends at a root that is not pinned for this kind of evidence."""

    code = "attestation.platform.root"
    check = "platform root"


class MissingEndorsement(UntrustedPlatform):
    """The certificate that would vouch for the evidence (e.g. the VCEK) was not supplied."""

    code = "attestation.platform.missing"
    check = "endorsement key"


class EndorsementMismatch(UntrustedPlatform):
    """The endorsement certificate was issued for another chip or another TCB."""

    code = "attestation.platform.mismatch"
    check = "endorsement match"


class TcbTooLow(UntrustedPlatform):
    """The platform's reported TCB is below the policy's minimum."""

    code = "attestation.platform.tcb"
    check = "minimum TCB"


def refuse(cls: type[E], check: str, reason: str, **details: Any) -> E:
    """Build ``cls`` with a message that starts with the failed check's name.

    The instance's ``check`` attribute (a class default in the error tree) is set to the
    specific check, so ``exc.check`` reads e.g. ``"quote signature"`` rather than ``"signature"``.
    """
    exc = cls(f"{check}: {reason}", check=check, **details)
    object.__setattr__(exc, "check", check)
    return exc


def malformed(check: str, reason: str) -> MalformedEvidence:
    """Shorthand for a parse failure naming what could not be parsed."""
    return refuse(MalformedEvidence, check, reason)
