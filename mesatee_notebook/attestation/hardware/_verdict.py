"""The result of verifying hardware evidence: level, TEE, parsed claims and every check made."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mesatee_notebook.attestation.levels import Level

__all__ = ["Check", "Verdict"]


@dataclass(frozen=True)
class Check:
    """One named check: ``passed`` is True, False, or None for NOT CHECKED."""

    name: str
    passed: bool | None
    detail: str

    @property
    def mark(self) -> str:
        """A short status label for text output."""
        return {True: "ok", False: "FAILED", None: "NOT CHECKED"}[self.passed]


@dataclass(frozen=True)
class Verdict:
    """Verified evidence. It is only returned when no check failed; unchecked items stay ``None``."""

    level: Level
    tee: str
    """``"sgx"``, ``"tdx"`` or ``"sev-snp"``."""
    format: str
    """What was verified, e.g. ``"SGX DCAP quote v3"`` or ``"RA-TLS certificate (TCG DICE)"``."""
    claims: Mapping[str, Any]
    checks: tuple[Check, ...] = field(default=())

    @property
    def not_checked(self) -> tuple[Check, ...]:
        """The checks this verdict does not vouch for (missing collateral, unset policy)."""
        return tuple(c for c in self.checks if c.passed is None)

    @property
    def debug(self) -> bool:
        """True if the evidence comes from a debug enclave or guest."""
        return bool(self.claims.get("debug", False))

    def check(self, name: str) -> Check:
        """Return the first check called ``name``."""
        for item in self.checks:
            if item.name == name:
                return item
        raise KeyError(name)

    def render_text(self) -> str:
        """Render a plain-text report for the CLI: verdict line, every check, then the claims."""
        level = self.level.label + (" (the confidential-VM level: SEV-SNP or TDX)" if self.level is Level.SEV else "")
        lines = [f"VERIFIED {self.format}: tee={self.tee}, level={level}"]
        if self.not_checked:
            lines[0] = f"PARTLY VERIFIED {self.format}: tee={self.tee}, level={level}"
            lines.append(
                f"  {len(self.not_checked)} of {len(self.checks)} checks are NOT CHECKED (below): this result does not "
                "vouch for them; supply the collateral or the policy values they name"
            )
        if self.debug:
            lines.append("WARNING: debug enclave/guest - the host can read its memory (allowed by policy)")
        width = max((len(c.mark) for c in self.checks), default=2)
        for item in self.checks:
            lines.append(f"  [{item.mark:^{width}}] {item.name}: {item.detail}")
        lines.append("claims:")
        for key, value in self.claims.items():
            lines.append(f"  {key}: {_show(value)}")
        return "\n".join(lines)


def _show(value: Any) -> str:
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={_show(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value)
