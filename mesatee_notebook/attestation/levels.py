"""The five security levels of the MesaTEE design, as an ordered enum."""

from __future__ import annotations

import enum

from mesatee_notebook.errors import LevelNotAvailableError

__all__ = ["Level", "LEVEL_DESCRIPTIONS"]


class Level(enum.IntEnum):
    """Security levels, weakest first: ``Level.SOFTTEE < Level.SGX``."""

    UNPROTECTED = 0
    SOFTTEE = 1
    TPM = 2
    SEV = 3
    SGX = 4

    @classmethod
    def parse(cls, value: str | int | Level) -> Level:
        """Accept ``"softtee"``, ``Level.SOFTTEE`` or ``1``; refuse anything else clearly."""
        if isinstance(value, Level):
            return value
        if isinstance(value, int):
            return cls(value)
        name = str(value).strip().lower()
        aliases = {"tdx": "sev", "sev-snp": "sev", "snp": "sev", "none": "unprotected"}
        name = aliases.get(name, name)
        try:
            return cls[name.upper()]
        except KeyError:
            names = ", ".join(m.label for m in cls)
            msg = f"unknown security level {value!r}; expected one of: {names}"
            raise ValueError(msg) from None

    @property
    def label(self) -> str:
        """The lower-case name used on the wire and in the CLI."""
        return self.name.lower()

    @property
    def is_hardware(self) -> bool:
        """True for levels whose trust rests on a hardware vendor's root."""
        return self >= Level.TPM

    @property
    def trust_note(self) -> str:
        """One honest sentence on what this level protects against."""
        return LEVEL_DESCRIPTIONS[self]

    def require_available(self, available: frozenset[Level]) -> None:
        """Raise :class:`LevelNotAvailableError` unless a provider exists here."""
        if self not in available:
            msg = (
                f"security level {self.label!r} is not available on this platform: "
                f"no {self.label} evidence provider is present (available: "
                f"{', '.join(sorted(lv.label for lv in available)) or 'none'})"
            )
            raise LevelNotAvailableError(msg, level=self.label)


LEVEL_DESCRIPTIONS: dict[Level, str] = {
    Level.UNPROTECTED: (
        "UNPROTECTED: no attestation at all. The host sees code and data in the clear. For development only."
    ),
    Level.SOFTTEE: (
        "softtee is SOFTWARE trust: a platform key you pinned vouches for the measured code, "
        "but the host operator can read the kernel's memory. No hardware isolation."
    ),
    Level.TPM: (
        "tpm: a TPM 2.0 quote vouches for the boot PCRs the policy pins and for the kernel's measurement in the "
        "application PCR; memory is not encrypted. With swtpm (a software TPM) it is software trust."
    ),
    Level.SEV: (
        "sev: an AMD SEV-SNP or Intel TDX guest; the CPU vendor vouches for the launch measurement, which covers "
        "this code only if the guest image contains it and the policy pins that measurement."
    ),
    Level.SGX: "sgx: an Intel SGX enclave; Intel's root vouches for MRENCLAVE/MRSIGNER.",
}
