"""Specific refusals of the hardware verifiers, all inside the package's one error tree.

Every error raised here carries ``details["check"]``: the plain-words name of the
check that failed (e.g. ``"quote signature"``), and its message starts with it.
"""

from __future__ import annotations

from typing import Any, TypeVar

from mesatee_notebook.errors import (  # the leaves live in the one drawn tree, so they rebuild from the wire
    AttestationError,
    ChainBroken,
    EndorsementMismatch,
    MalformedEvidence,
    MissingEndorsement,
    RootNotTrusted,
    TcbTooLow,
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
