"""What a caller expects of hardware evidence: identities, minimum versions, debug and time."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType

__all__ = ["HardwarePolicy", "SNP_TCB_COMPONENTS"]

SNP_TCB_COMPONENTS = ("fmc", "bl", "tee", "snp", "ucode")


def _hex(value: str | bytes | None, name: str, size: int) -> str | None:
    if value is None:
        return None
    text = value.hex() if isinstance(value, bytes) else value.strip().lower().removeprefix("0x")
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        msg = f"HardwarePolicy.{name} must be hex, got {value!r}"
        raise ValueError(msg) from None
    if len(raw) != size:
        msg = f"HardwarePolicy.{name} must be {size} bytes, got {len(raw)}"
        raise ValueError(msg)
    return text


@dataclass(frozen=True)
class HardwarePolicy:
    """Expectations checked after the evidence's signatures and chain verify.

    Every field left ``None`` is reported as NOT CHECKED in the verdict, never as passed.
    Hex fields accept ``str`` (any case, optional ``0x``) or ``bytes``; they are stored as
    lower-case hex.
    """

    allow_debug: bool = False
    """Accept debug enclaves/guests (their memory is readable by the host). Off by default."""
    as_of: datetime | None = None
    """The time certificates must be valid at; ``None`` means now. Naive values are UTC."""
    report_data: str | bytes | None = None
    """Expected report data: the whole 64 bytes, or a prefix of it (e.g. a 32-byte key hash)."""
    mrenclave: str | bytes | None = None
    mrsigner: str | bytes | None = None
    isv_prod_id: int | None = None
    min_isv_svn: int | None = None
    mrtd: str | bytes | None = None
    rtmrs: tuple[str | bytes | None, ...] = ()
    """Expected RTMR0..RTMR3 in order; ``None`` entries are not checked."""
    snp_measurement: str | bytes | None = None
    snp_host_data: str | bytes | None = None
    snp_min_tcb: Mapping[str, int] | None = None
    """Minimum reported TCB per component: keys from ``bl, tee, snp, ucode`` (and ``fmc`` on Turin)."""
    extra_trusted_roots: tuple[bytes, ...] = field(default=())
    """Root certificates (PEM or DER) trusted *in addition to* the pinned vendor roots, e.g. a test CA."""

    def __post_init__(self) -> None:
        sets = object.__setattr__
        for name, size in (("mrenclave", 32), ("mrsigner", 32), ("mrtd", 48), ("snp_measurement", 48)):
            sets(self, name, _hex(getattr(self, name), name, size))
        sets(self, "snp_host_data", _hex(self.snp_host_data, "snp_host_data", 32))
        if self.report_data is not None:
            raw = self.report_data if isinstance(self.report_data, bytes) else bytes.fromhex(self.report_data)
            if not 0 < len(raw) <= 64:
                msg = "HardwarePolicy.report_data must be 1 to 64 bytes"
                raise ValueError(msg)
            sets(self, "report_data", raw.hex())
        if len(self.rtmrs) > 4:
            msg = "HardwarePolicy.rtmrs holds at most four values (RTMR0..RTMR3)"
            raise ValueError(msg)
        sets(self, "rtmrs", tuple(_hex(v, f"rtmrs[{i}]", 48) for i, v in enumerate(self.rtmrs)))
        if self.snp_min_tcb is not None:
            unknown = set(self.snp_min_tcb) - set(SNP_TCB_COMPONENTS)
            if unknown:
                msg = f"HardwarePolicy.snp_min_tcb has unknown components {sorted(unknown)}"
                raise ValueError(msg)
            sets(self, "snp_min_tcb", MappingProxyType(dict(self.snp_min_tcb)))
        if self.as_of is not None and self.as_of.tzinfo is None:
            sets(self, "as_of", self.as_of.replace(tzinfo=UTC))
        sets(self, "extra_trusted_roots", tuple(self.extra_trusted_roots))

    def expected(self, name: str) -> str | None:
        """Return a hex field as lower-case text (``None`` when the policy does not set it)."""
        value = getattr(self, name)
        if value is None:
            return None
        return value.hex() if isinstance(value, bytes) else str(value)

    def expected_rtmr(self, index: int) -> str | None:
        """Return the expected RTMR ``index`` as hex, or ``None`` when not set."""
        value = self.rtmrs[index] if index < len(self.rtmrs) else None
        return value.hex() if isinstance(value, bytes) else value

    def when(self) -> datetime:
        """Return the instant certificate validity is judged at."""
        return self.as_of if self.as_of is not None else datetime.now(UTC)
