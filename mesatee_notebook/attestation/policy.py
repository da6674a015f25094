"""The client's verification policy and the verdict it produces (pure).

:func:`verify_certificate` runs every check on the peer's RA-TLS certificate *before*
the client sends a byte, and raises the :class:`~mesatee_notebook.errors.AttestationError`
subclass that names the first check that failed.

Why this module is over ~500 lines: the client's verifier: every attestation check in order, before any user byte is
sent; one file so that the order can be audited top to bottom.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import html
import secrets
import tomllib
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_public_key

from mesatee_notebook.attestation.evidence import fingerprint, parse_evidence, report_data_for
from mesatee_notebook.attestation.hw_evidence import HwEvidence
from mesatee_notebook.attestation.levels import Level
from mesatee_notebook.attestation.measurement import expected_measurement
from mesatee_notebook.attestation.ratls import evidence_from_certificate, load_certificate, spki_der
from mesatee_notebook.attestation.tpm import TpmEvidence, ak_fingerprint, tpm_kind_of, verify_ek_chain
from mesatee_notebook.errors import (
    CertificateExpired,
    CredentialActivationFailed,
    EkChainError,
    KeyBindingError,
    LevelTooLow,
    MalformedEvidence,
    MeasurementMismatch,
    ReplayedQuote,
    SandboxRequired,
    SoftwareTpmNotAllowed,
    StaleEvidence,
    UnprotectedNotAllowed,
    UntrustedAttestationKey,
    UntrustedPlatform,
)

if TYPE_CHECKING:  # the hardware verifiers load only when a sev kernel is met
    from mesatee_notebook.attestation.hardware.policy import HardwarePolicy

__all__ = [
    "AttestationReport",
    "Check",
    "Policy",
    "UnprotectedWarning",
    "check_tpm_hello",
    "tpm_hello_request",
    "verify_certificate",
]

_CLOCK_SKEW = 300.0


class UnprotectedWarning(UserWarning):
    """Emitted on every connection to an unprotected kernel."""


def _root_fingerprint(root: str) -> str:
    """A pinned root as a fingerprint: hex SHA-256 of the raw key, a PEM key, or a path to one."""
    text = root.strip()
    if len(text) == 64 and all(c in "0123456789abcdef" for c in text.lower()):
        return text.lower()
    data = text.encode()
    if "BEGIN" not in text:
        path = Path(text).expanduser()
        if not path.is_file():
            msg = f"platform root {root!r} is neither a 64-hex fingerprint, a PEM public key, nor a file"
            raise ValueError(msg)
        data = path.read_bytes()
        if b"BEGIN" not in data:
            return data.decode().strip().lower()
    key = load_pem_public_key(data)
    if not isinstance(key, Ed25519PublicKey):
        msg = "a softtee platform root must be an Ed25519 public key"
        raise ValueError(msg)
    return fingerprint(key.public_bytes(Encoding.Raw, PublicFormat.Raw))


def _ek_roots(items: Iterable[str | bytes | Path]) -> tuple[bytes, ...]:
    from cryptography import x509

    out: list[bytes] = []
    for item in items:
        data: bytes
        try:
            if isinstance(item, bytes):
                data = item
            elif isinstance(item, Path) or "BEGIN CERTIFICATE" not in item:
                data = Path(item).expanduser().read_bytes()
            else:
                data = item.encode()
            certs = (
                x509.load_pem_x509_certificates(data)
                if b"BEGIN CERTIFICATE" in data
                else [x509.load_der_x509_certificate(data)]
            )
        except (OSError, ValueError) as exc:
            msg = f"tpm_ek_roots entry {str(item)[:80]!r} is not a CA certificate (PEM, DER, or a file of one): {exc}"
            raise ValueError(msg) from exc
        out.extend(c.public_bytes(Encoding.DER) for c in certs)
    return tuple(out)


def _golden_pcrs(pcrs: Mapping[int | str, str] | Iterable[tuple[int, str]]) -> tuple[tuple[int, str], ...]:
    out: dict[int, str] = {}
    for index, value in pcrs.items() if isinstance(pcrs, Mapping) else pcrs:
        i = int(index)
        text = str(value).lower().removeprefix("0x")
        if not 0 <= i <= 23 or len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
            msg = f"tpm_pcrs needs PCR indices 0..23 mapped to 64-hex SHA-256 values; got {index!r}: {value!r}"
            raise ValueError(msg)
        out[i] = text
    return tuple(sorted(out.items()))


@dataclass(frozen=True)
class Policy:
    """What a client accepts from a kernel.

    ``measurements=None`` means "the measurement of the mesatee_notebook installed here"
    (:func:`~mesatee_notebook.attestation.measurement.expected_measurement`).
    ``platform_roots`` are fingerprints (hex SHA-256 of the raw Ed25519 key), PEM keys or
    paths to either; for a ``tpm`` kernel, the fingerprint of its attestation key
    (``mesatee-enclave tpm-info`` prints it). ``unprotected`` kernels are refused unless
    ``allow_unprotected``. ``tpm_pcrs`` maps boot PCR indices to their golden SHA-256 values;
    ``allow_software_tpm=False`` refuses swtpm and any TPM no manufacturer certificate vouches for.
    ``tpm_ek_roots`` are EK CA certificates (PEM text, DER bytes or paths to PEM files: the TPM
    manufacturer's root and intermediates, or swtpm's local CA). With them, a TPM kernel's AK need
    not be pinned: its EK must chain to one, and the AK is proved to sit beside that EK by credential
    activation on the live connection. ``hardware`` is what a ``sev`` kernel (SEV-SNP or TDX guest) must show:
    its launch measurement and the roots trusted besides the pinned AMD and Intel ones (a test chain).
    """

    measurements: tuple[str, ...] | None = None
    platform_roots: tuple[str, ...] = ()
    min_level: Level = Level.SOFTTEE
    max_evidence_age: float = 24 * 3600.0
    allow_unprotected: bool = False
    tpm_pcrs: tuple[tuple[int, str], ...] = ()
    allow_software_tpm: bool = True
    tpm_ek_roots: tuple[bytes, ...] = ()
    # (AK fingerprint, EK certificate SHA-256) pairs proven by credential activation on an earlier connection
    # under this policy. The binding is permanent (both keys derive from the TPM's endorsement seed), so
    # later connections only need the fresh quote.
    _tpm_activated: set[tuple[str, str]] = field(default_factory=set, init=False, compare=False, repr=False)
    require_sandbox: bool = True
    hardware: HardwarePolicy | None = None

    def __init__(
        self,
        measurements: Iterable[str] | None = None,
        platform_roots: Iterable[str] = (),
        min_level: Level | str = Level.SOFTTEE,
        max_evidence_age: float | dt.timedelta = 24 * 3600.0,
        allow_unprotected: bool = False,
        tpm_pcrs: Mapping[int | str, str] | Iterable[tuple[int, str]] | None = None,
        allow_software_tpm: bool = True,
        tpm_ek_roots: Iterable[str | bytes | Path] = (),
        require_sandbox: bool = True,
        hardware: HardwarePolicy | None = None,
    ) -> None:
        object.__setattr__(
            self, "measurements", None if measurements is None else tuple(m.lower() for m in measurements)
        )
        object.__setattr__(self, "platform_roots", tuple(_root_fingerprint(r) for r in platform_roots))
        object.__setattr__(self, "min_level", Level.parse(min_level))
        age = (
            max_evidence_age.total_seconds() if isinstance(max_evidence_age, dt.timedelta) else float(max_evidence_age)
        )
        object.__setattr__(self, "max_evidence_age", age)
        object.__setattr__(self, "allow_unprotected", bool(allow_unprotected))
        object.__setattr__(self, "tpm_pcrs", _golden_pcrs(tpm_pcrs if tpm_pcrs is not None else {}))
        object.__setattr__(self, "allow_software_tpm", bool(allow_software_tpm))
        object.__setattr__(self, "tpm_ek_roots", _ek_roots(tpm_ek_roots))
        object.__setattr__(self, "_tpm_activated", set())
        object.__setattr__(self, "require_sandbox", bool(require_sandbox))
        object.__setattr__(self, "hardware", hardware)

    def with_roots(self, *roots: str) -> Policy:
        """A copy that also pins ``roots``."""
        return replace(self, platform_roots=(*self.platform_roots, *roots))

    @classmethod
    def from_toml(cls, path: str | Path) -> Policy:
        """Read a policy TOML file.

        Keys ``measurements``, ``platform_roots``, ``min_level``, ``max_evidence_age`` (seconds),
        ``allow_unprotected``, ``require_sandbox``, ``tpm_pcrs`` (a table of index = hex),
        ``allow_software_tpm`` and ``tpm_ek_roots``, at top level or under ``[policy]``.
        """
        data = tomllib.loads(Path(path).expanduser().read_text())
        data = data.get("policy", data)
        known = {
            "measurements",
            "platform_roots",
            "min_level",
            "max_evidence_age",
            "allow_unprotected",
            "require_sandbox",
            "tpm_pcrs",
            "allow_software_tpm",
            "tpm_ek_roots",
        }
        unknown = set(data) - known
        if unknown:
            msg = (
                f"unknown keys in policy file {path}: {', '.join(sorted(unknown))} (known: {', '.join(sorted(known))})"
            )
            raise ValueError(msg)
        return cls(**data)


@dataclass(frozen=True, slots=True)
class Check:
    """One verification step and its outcome."""

    name: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class AttestationReport:
    """The verified claims of a kernel, and every check that passed."""

    level: Level
    measurement: str
    expected_measurement: str | None
    platform: str
    manifest: dict[str, Any]
    evidence_time: dt.datetime
    receipt_key: bytes
    certificate_der: bytes
    evidence: bytes
    checks: tuple[Check, ...] = field(default=())
    verified_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))
    tpm_kind: str | None = None
    tpm_vendor: str | None = None
    audit_key: str | None = None
    tpm_activation: bool = False
    hw_tee: str | None = None
    hw_vendor_root: bool | None = None
    hw_source: str | None = None
    hw_claims: Mapping[str, Any] = field(default_factory=dict)  # the verified report's claims (sev, sgx)

    @property
    def level_text(self) -> str:
        """The level for people: ``tpm`` names its kind (``TPM 2.0 (software TPM)``), ``sev`` its TEE and root."""
        if self.level is Level.TPM:
            return f"tpm — {_tpm_kind_text(self.tpm_kind)}"
        if self.hw_tee is not None:
            from mesatee_notebook.attestation.hw_policy import tee_text

            return f"{self.level.label} — {tee_text(self.hw_tee, self.hw_vendor_root)}"
        return self.level.label

    @property
    def trust_label(self) -> str:
        """What the trust rests on, in a display's words: ``SOFTWARE TRUST``, ``SOFTWARE TPM``, ``HARDWARE TRUST``..."""
        if self.level is Level.TPM:  # a software TPM is a software TPM
            return {"software": "SOFTWARE TPM", "hardware": "TPM CHIP, EK CERTIFIED"}.get(
                str(self.tpm_kind), "UNCERTIFIED TPM"
            )
        if self.hw_tee is not None and not self.hw_vendor_root:
            return "TEST CHAIN, NOT HARDWARE"  # the mimic configfs-tsm tree: a root the policy trusts, not a vendor
        return {Level.UNPROTECTED: "UNPROTECTED", Level.SOFTTEE: "SOFTWARE TRUST"}.get(self.level, "HARDWARE TRUST")

    @property
    def audit_signer(self) -> str:
        """Fingerprint of the key that signs the kernel's audit log (the platform key, or one the TPM quoted)."""
        return self.audit_key or self.platform

    sandbox: dict[str, Any] = field(default_factory=dict)

    @property
    def sandboxed(self) -> bool:
        """True when the kernel runs every executor in its measured sandbox."""
        return bool(self.sandbox.get("active")) and bool((self.manifest.get("sandbox") or {}).get("enabled"))

    @property
    def sandbox_note(self) -> str:
        """One honest sentence on what isolates parties from each other in this kernel."""
        return sandbox_note(self.sandbox, self.manifest)

    @property
    def measurement_matches_local(self) -> bool:
        """True when the kernel runs exactly the mesatee_notebook installed here.

        ``expected_measurement`` is only filled in when the policy needed it; otherwise it is
        computed here, on demand (it walks and hashes the installed package).
        """
        local = self.expected_measurement if self.expected_measurement is not None else _local_measurement()
        return local is not None and self.measurement == local

    @property
    def unsafe_components(self) -> list[dict[str, Any]]:
        """Native engines in the measurement, with versions."""
        comps = self.manifest.get("unsafe_components", [])
        return [c for c in comps if isinstance(c, dict) and c.get("present")]

    @property
    def trust_note(self) -> str:
        """One honest sentence on what this level protects."""
        if self.level is Level.TPM and self.tpm_kind == "software":
            return SOFTWARE_TPM_NOTE
        if self.level is Level.TPM and self.tpm_kind == "hardware":
            return CERTIFIED_TPM_NOTE
        if self.level is Level.TPM:
            return UNCERTIFIED_TPM_NOTE
        if self.hw_tee is not None and not self.hw_vendor_root:
            return TEST_CHAIN_NOTE
        return self.level.trust_note

    def age(self, now: dt.datetime | None = None) -> dt.timedelta:
        """How old the evidence is."""
        return (now or dt.datetime.now(dt.UTC)) - self.evidence_time

    def __repr__(self) -> str:
        lines = [
            f"mesatee attestation: level {self.level_text.upper()}",
            f"  {self.trust_note}",
            f"  measurement  {self.measurement}",
            "  local code   "
            + (
                "matches this install"
                if self.measurement_matches_local
                else "DIFFERS from this install (pinned by policy)"
            ),
            f"  platform     {self.platform}",
            f"  evidence age {int(self.age().total_seconds())} s",
            f"  sandbox      {self.sandbox_note}",
            "  native (unsafe) components: "
            + ", ".join(f"{c['name']} {c.get('version') or '?'}" for c in self.unsafe_components),
            "  checks:",
        ]
        lines += [f"    {'✓' if c.passed else '✗'} {c.name}: {c.detail}" for c in self.checks]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        software = self.level is Level.SOFTTEE or (self.level is Level.TPM and self.tpm_kind != "hardware")
        colour = "#b00020" if self.level is Level.UNPROTECTED else "#b26a00" if software else "#1b5e20"
        rows = "".join(
            f"<tr><td>{'✓' if c.passed else '✗'}</td><td>{html.escape(c.name)}</td>"
            f"<td>{html.escape(c.detail)}</td></tr>"
            for c in self.checks
        )
        comps = ", ".join(html.escape(f"{c['name']} {c.get('version') or '?'}") for c in self.unsafe_components)
        match = (
            "✓ matches this install"
            if self.measurement_matches_local
            else "✗ differs from this install (pinned by policy)"
        )
        return (
            "<div class='mesatee-attestation' style='border:1px solid #ccc;padding:8px;font-family:sans-serif'>"
            f"<div style='font-weight:bold;color:{colour}'>mesatee attestation: "
            f"{html.escape(self.level_text.upper())}</div>"
            f"<div style='color:{colour}'>{html.escape(self.trust_note)}</div>"
            "<table>"
            f"<tr><td>measurement</td><td><code>{self.measurement}</code> {match}</td></tr>"
            f"<tr><td>platform</td><td><code>{html.escape(self.platform)}</code></td></tr>"
            f"<tr><td>evidence age</td><td>{int(self.age().total_seconds())} s</td></tr>"
            f"<tr><td>sandbox</td><td>{html.escape(self.sandbox_note)}</td></tr>"
            f"<tr><td>native components</td><td>{comps}</td></tr></table>"
            f"<table>{rows}</table></div>"
        )


SOFTWARE_TPM_NOTE = (
    "tpm with a SOFTWARE TPM (swtpm): real TPM 2.0 quotes, but whoever runs swtpm holds its keys and can "
    "reset its PCRs, so this is software trust like softtee; memory is not encrypted."
)
UNCERTIFIED_TPM_NOTE = (
    "tpm: a TPM that says it is a chip quotes the boot PCRs and the application PCR with the AK you pinned; "
    "no EK CA is pinned, so nothing tells it from a software TPM. The host can still read the kernel's memory."
)
TEST_CHAIN_NOTE = (
    "on a TEST CHAIN: the report is SEV-SNP/TDX/SGX-shaped and verifies, but under a root this policy trusts "
    "explicitly, not AMD's or Intel's (the mimic tree of the tests). NOT a TEE: no memory is protected."
)
CERTIFIED_TPM_NOTE = (
    "tpm: a TPM chip whose EK chains to the CA you pinned quotes the boot PCRs and the application PCR; the "
    "boot PCRs you pin are what it proves. The host OS can still read the kernel's memory."
)


def sandbox_note(sandbox: dict[str, Any], manifest: dict[str, Any]) -> str:
    """What the kernel's sandbox report says, in one sentence (never more than it proves)."""
    profile = manifest.get("sandbox") or {}
    if not sandbox.get("active") or not profile.get("enabled"):
        return (
            "NONE (--no-sandbox): every cell runs with the kernel's uid and can read its keys and other parties' data"
        )
    landlock = sandbox.get("landlock") or "no Landlock"
    uid = "own uid" if "own unprivileged uid" in str(sandbox.get("uid_mode", "")) else "own user namespace"
    return (
        f"every session and service worker in its own bubblewrap sandbox ({uid}, seccomp, Landlock "
        f"{landlock}, no network): isolates parties from each other, not from the host operator"
    )


def _local_measurement() -> str | None:
    try:
        return expected_measurement()
    except OSError:
        return None


def verify_certificate(
    cert_der: bytes,
    policy: Policy,
    *,
    now: dt.datetime | None = None,
    check_freshness: bool = True,
    live: bool = False,
) -> AttestationReport:
    """Verify a kernel's RA-TLS certificate under ``policy``; raise the failing check's error.

    ``live`` says a connection follows on which the client completes a TPM kernel's checks
    (credential activation, fresh quote: :func:`check_tpm_hello`); offline, a TPM's AK must be pinned.
    """
    now = now or dt.datetime.now(dt.UTC)
    checks: list[Check] = []
    cert = load_certificate(cert_der)
    if not (cert.not_valid_before_utc <= now <= cert.not_valid_after_utc):
        msg = (
            f"the kernel's certificate is not valid at {now:%Y-%m-%d %H:%M:%S} UTC "
            f"(valid {cert.not_valid_before_utc:%Y-%m-%d %H:%M} to {cert.not_valid_after_utc:%Y-%m-%d %H:%M})"
        )
        raise CertificateExpired(msg)
    checks.append(Check("certificate validity", True, f"valid until {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"))
    raw = evidence_from_certificate(cert)
    evidence = parse_evidence(raw)
    if isinstance(evidence, TpmEvidence):
        return _verify_tpm(cert_der, spki_der(cert), evidence, policy, now, check_freshness, checks, live)
    if isinstance(evidence, HwEvidence):
        from mesatee_notebook.attestation.hw_policy import verify_hw

        return verify_hw(cert_der, spki_der(cert), evidence, policy, now, check_freshness, checks)
    level = evidence.level
    checks.append(Check("evidence format", True, f"{evidence.statement['format']} in TCG DICE extension"))

    if level is Level.UNPROTECTED:
        if not policy.allow_unprotected:
            msg = (
                "the kernel is UNPROTECTED: it offers no attestation at all, so its host can read every byte you "
                "send. Refused. Pass allow_unprotected=True only for development on a machine you control."
            )
            raise UnprotectedNotAllowed(msg)
        warnings.warn(
            "connected to an UNPROTECTED mesatee kernel: no attestation, the host sees all code and data",
            UnprotectedWarning,
            stacklevel=3,
        )
        checks.append(Check("level", True, "UNPROTECTED accepted by explicit opt-in (allow_unprotected=True)"))
    else:
        if level.is_hardware:
            msg = f"software evidence claims hardware level {level.label}; only a vendor quote can"
            raise MalformedEvidence(msg)
        if level < policy.min_level:
            msg = f"the kernel's level {level.label} is below the policy's minimum {policy.min_level.label}"
            raise LevelTooLow(msg)
        checks.append(Check("level", True, f"{level.label} ≥ minimum {policy.min_level.label} (software trust)"))
        evidence.verify_signature()
        checks.append(Check("platform signature", True, "Ed25519 signature over the statement verifies"))
        platform = fingerprint(evidence.platform_key)
        if platform not in policy.platform_roots:
            msg = (
                f"the evidence is signed by platform key {platform[:16]}…, which this policy does not pin "
                f"(pinned: {', '.join(r[:16] + '…' for r in policy.platform_roots) or 'none'})"
            )
            raise UntrustedPlatform(msg, platform=platform)
        checks.append(Check("platform root", True, f"platform key {platform[:16]}… is pinned"))
    evidence.check_manifest()
    sandbox = _check_sandbox(evidence.statement, level, policy, checks)
    measurement, local = _check_measurement(evidence.statement, policy, checks)
    t = _check_freshness(evidence.statement, policy, now, check_freshness, checks)
    _check_key_binding(evidence.statement, spki_der(cert), evidence.receipt_key, checks)
    return AttestationReport(
        level=level,
        measurement=measurement,
        expected_measurement=local,
        platform=fingerprint(evidence.platform_key) if evidence.platform_key else "none (unprotected)",
        manifest=evidence.statement["manifest"],
        evidence_time=t,
        receipt_key=evidence.receipt_key,
        certificate_der=cert_der,
        evidence=raw,
        checks=tuple(checks),
        sandbox=sandbox,
    )


def _check_sandbox(statement: dict[str, Any], level: Level, policy: Policy, checks: list[Check]) -> dict[str, Any]:
    sandbox = statement.get("sandbox")
    sandbox = sandbox if isinstance(sandbox, dict) else {}
    manifest = statement["manifest"]
    if level is not Level.UNPROTECTED:
        note = sandbox_note(sandbox, manifest)
        if policy.require_sandbox and not (sandbox.get("active") and (manifest.get("sandbox") or {}).get("enabled")):
            msg = (
                "the kernel runs cells WITHOUT a sandbox (--no-sandbox): any party's cell could read the kernel's "
                "platform key and sealing secret and every other party's data. Refused: this policy requires a "
                "sandbox. Policy(require_sandbox=False) accepts such a kernel, for one that only you use."
            )
            raise SandboxRequired(msg)
        checks.append(Check("sandbox", True, note if policy.require_sandbox else f"not required; {note}"))
    return sandbox


def _check_measurement(statement: dict[str, Any], policy: Policy, checks: list[Check]) -> tuple[str, str | None]:
    measurement = str(statement["measurement"])
    # A policy that pins measurements does not need this install's: skip the package walk on connect.
    local = _local_measurement() if policy.measurements is None else None
    accepted = policy.measurements if policy.measurements is not None else ((local,) if local else ())
    if measurement not in accepted:
        msg = (
            f"the kernel runs code with measurement {measurement[:16]}…, which the policy does not accept "
            f"(accepted: {', '.join(a[:16] + '…' for a in accepted) or 'none'}). The kernel's code differs "
            "from what you expect."
        )
        raise MeasurementMismatch(msg, measurement=measurement)
    checks.append(Check("measurement", True, f"{measurement[:16]}… is accepted"))
    return measurement, local


def _check_freshness(
    statement: dict[str, Any], policy: Policy, now: dt.datetime, check_freshness: bool, checks: list[Check]
) -> dt.datetime:
    t = dt.datetime.fromtimestamp(int(statement["time"]), dt.UTC)
    age = (now - t).total_seconds()
    if check_freshness and (age > policy.max_evidence_age or age < -_CLOCK_SKEW):
        msg = f"the evidence is {int(age)} s old; the policy accepts at most {int(policy.max_evidence_age)} s"
        raise StaleEvidence(msg, age=age)
    checks.append(Check("freshness", True, f"evidence {int(age)} s old (max {int(policy.max_evidence_age)} s)"))
    return t


def _check_key_binding(statement: dict[str, Any], spki: bytes, receipt_key: bytes, checks: list[Check]) -> None:
    if statement["report_data"] != report_data_for(spki, receipt_key):
        msg = (
            "the evidence's report data does not commit to this TLS key: the certificate was swapped "
            "(a relay or man-in-the-middle is presenting someone else's evidence)"
        )
        raise KeyBindingError(msg)
    checks.append(Check("key binding", True, "report data = SHA-256(TLS SPKI ‖ receipt key)"))


def _verify_tpm(
    cert_der: bytes,
    spki: bytes,
    evidence: TpmEvidence,
    policy: Policy,
    now: dt.datetime,
    check_freshness: bool,
    checks: list[Check],
    live: bool,
) -> AttestationReport:
    """The TPM path, in order: EK chain, AK signature, AK pinned (or to be activated), the rest.

    Then qualifying data, PCR digest, TPM kind, measurement, PCRs, freshness, key binding.
    Activation and the fresh quote follow on the live connection (:func:`check_tpm_hello`).
    """
    checks.append(Check("evidence format", True, f"{evidence.statement['format']} in TCG DICE extension"))
    if policy.min_level > Level.TPM:
        msg = f"the kernel's level tpm is below the policy's minimum {policy.min_level.label}"
        raise LevelTooLow(msg)
    chain = None
    if policy.tpm_ek_roots:
        if not evidence.ek_cert:
            msg = "the kernel's TPM shows no EK certificate, but this policy trusts TPMs by their EK CA (tpm_ek_roots)"
            raise EkChainError(msg)
        evidence.check_ek_binding()
        chain = verify_ek_chain(evidence.ek_cert, policy.tpm_ek_roots, now)
        checks.append(Check("EK chain", True, f"EK certificate chains to pinned {chain[-1].subject.rfc4514_string()}"))
    kind = tpm_kind_of(evidence.tpm_kind, chain)
    checks.append(Check("level", True, f"tpm ≥ minimum {policy.min_level.label} ({_tpm_kind_text(kind)})"))
    ak = evidence.ak()
    ak.verify(evidence.attest, evidence.signature)
    checks.append(Check("quote signature", True, "ECDSA P-256 signature by the restricted AK verifies"))
    platform = ak_fingerprint(evidence.ak_public)
    activate = False
    if platform in policy.platform_roots:
        checks.append(Check("attestation key", True, f"AK {platform[:16]}… is pinned"))
    elif chain is not None and live:
        activate = True
        checks.append(Check("attestation key", True, f"AK {platform[:16]}… to be activated against the certified EK"))
    else:
        why = (
            "and credential activation against the certified EK needs a live connection; pin the AK to verify offline"
            if chain is not None
            else "`mesatee-enclave tpm-info --tcti …` on the kernel's host prints it; or pin the TPM's EK CA "
            "(tpm_ek_roots)"
        )
        msg = (
            f"the TPM quote is signed by attestation key {platform[:16]}…, which this policy does not pin "
            f"(pinned: {', '.join(r[:16] + '…' for r in policy.platform_roots) or 'none'}), {why}"
        )
        raise UntrustedAttestationKey(msg, platform=platform)
    quote = evidence.verify_quote()
    checks.append(Check("qualifying data", True, "the quote commits to the statement (report data, keys, code)"))
    checks.append(Check("PCR digest", True, f"PCRs {list(quote.sha256_pcrs)} are the quoted values"))
    if kind == "software" and not policy.allow_software_tpm:
        msg = (
            f"the kernel's TPM is a software TPM ({evidence.statement['tpm_vendor']}): whoever runs it holds "
            "its keys and can set its PCRs. This policy refuses software TPMs (allow_software_tpm=False)."
        )
        raise SoftwareTpmNotAllowed(msg, tpm_kind=kind)
    if kind == "uncertified" and not policy.allow_software_tpm:
        msg = (
            f"the kernel's TPM reports itself as {evidence.statement['tpm_vendor']!r}, but this policy pins no EK "
            "CA (tpm_ek_roots), so it cannot be told from a software TPM; this policy refuses those "
            "(allow_software_tpm=False)"
        )
        raise SoftwareTpmNotAllowed(msg, tpm_kind="uncertified")
    evidence.check_manifest()
    sandbox = _check_sandbox(evidence.statement, Level.TPM, policy, checks)
    measurement, local = _check_measurement(evidence.statement, policy, checks)
    events = evidence.replay_event_log()
    checks.append(
        Check(
            "event log",
            True,
            f"{events} launch event(s) replay to the quoted application PCR; boot PCRs: no firmware event log "
            "replayed (golden values only)",
        )
    )
    golden = dict(policy.tpm_pcrs)
    evidence.check_pcrs(measurement, golden)
    app = int(evidence.statement["app_pcr"])
    checks.append(
        Check(
            "PCRs",
            True,
            f"application PCR {app} = SHA-256(0³² ‖ measurement); boot PCRs "
            + (", ".join(str(i) for i in sorted(golden) if i != app) or "none")
            + " as pinned",
        )
    )
    t = _check_freshness(evidence.statement, policy, now, check_freshness, checks)
    _check_key_binding(evidence.statement, spki, evidence.receipt_key, checks)
    return AttestationReport(
        level=Level.TPM,
        measurement=measurement,
        expected_measurement=local,
        platform=platform,
        manifest=evidence.statement["manifest"],
        evidence_time=t,
        receipt_key=evidence.receipt_key,
        certificate_der=cert_der,
        evidence=evidence.raw,
        checks=tuple(checks),
        tpm_kind=kind,
        tpm_vendor=str(evidence.statement["tpm_vendor"]),
        audit_key=str(evidence.statement.get("audit_key") or "") or None,
        tpm_activation=activate or chain is not None,
        sandbox=sandbox,
    )


def tpm_hello_request(
    report: AttestationReport, policy: Policy | None = None
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """What a client adds to ``hello`` for a TPM kernel; returns (fields, secrets kept for the reply).

    A fresh nonce and, when the EK is certified, a credential challenge for the AK
    (``TPM2_MakeCredential`` in software).
    """
    from mesatee_notebook.attestation.tpm import make_credential

    if report.hw_tee is not None:
        from mesatee_notebook.attestation.hw_policy import hw_hello_request

        return hw_hello_request(report)
    if report.level is not Level.TPM:
        return {}, {}
    nonce = secrets.token_bytes(32)
    fields: dict[str, Any] = {"tpm_nonce": nonce}
    kept = {"nonce": nonce}
    if report.tpm_activation and not (policy is not None and _binding(report) in policy._tpm_activated):
        evidence = _tpm_evidence_of(report)
        credential = secrets.token_bytes(32)
        blob, secret = make_credential(evidence.ek_key(), credential, evidence.ak().name)
        fields["tpm_credential"] = {"blob": blob, "secret": secret}
        kept["credential"] = credential
    return fields, kept


def _binding(report: AttestationReport) -> tuple[str, str]:
    evidence = _tpm_evidence_of(report)
    return report.platform, hashlib.sha256(evidence.ek_cert).hexdigest()


def _tpm_evidence_of(report: AttestationReport) -> TpmEvidence:
    evidence = parse_evidence(report.evidence)
    if not isinstance(evidence, TpmEvidence):
        msg = "TPM connection checks only make sense for TPM evidence"
        raise MalformedEvidence(msg)
    return evidence


def check_tpm_hello(
    report: AttestationReport, kept: dict[str, bytes], reply: dict[str, Any], policy: Policy | None = None
) -> AttestationReport:
    """Verify a TPM kernel's ``hello.ok``; return the report with the checks added.

    The credential came back (the AK sits beside the certified EK), and the fresh quote
    commits to this connection's nonce.
    """
    from mesatee_notebook.attestation.tpm import verify_fresh_quote

    if report.hw_tee is not None:
        from mesatee_notebook.attestation.hw_policy import check_hw_hello

        return check_hw_hello(report, kept, reply, policy)
    if not kept:
        return report
    evidence = _tpm_evidence_of(report)
    added: list[Check] = []
    if "credential" in kept:
        answer = reply.get("tpm_activated")
        if not isinstance(answer, bytes) or not hmac.compare_digest(answer, kept["credential"]):
            msg = (
                "the kernel's TPM did not activate the credential made for its AK under the certified EK: the AK "
                "does not live in the TPM that EK certificate belongs to"
            )
            raise CredentialActivationFailed(msg)
        added.append(Check("credential activation", True, "TPM2_ActivateCredential returned the secret: AK ⟷ EK"))
        if policy is not None:
            policy._tpm_activated.add(_binding(report))
    elif report.tpm_activation:
        added.append(Check("credential activation", True, "AK ⟷ EK proven on an earlier connection (this policy)"))
    fresh = reply.get("tpm_quote")
    attest = fresh.get("attest") if isinstance(fresh, dict) else None
    signature = fresh.get("signature") if isinstance(fresh, dict) else None
    if not isinstance(attest, bytes) or not isinstance(signature, bytes):
        msg = "the TPM kernel sent no quote for this connection's nonce: its evidence cannot be shown to be fresh"
        raise ReplayedQuote(msg)
    quote = verify_fresh_quote(evidence, kept["nonce"], attest, signature)
    added.append(
        Check(
            "fresh quote",
            True,
            f"quote over this connection's nonce by the same AK, same PCRs (TPM clock {quote.clock} ms, "
            f"reset {quote.reset_count})",
        )
    )
    return replace(report, checks=(*report.checks, *added))


def _tpm_kind_text(kind: str | None) -> str:
    if kind == "software":
        return "TPM 2.0 (software TPM)"
    if kind == "hardware":
        return "TPM 2.0 (chip, EK certified by a CA you pinned)"
    return "TPM 2.0 (chip, uncertified: no EK CA pinned)"


def certificate_sha256(cert_der: bytes) -> str:
    """SHA-256 hex of a DER certificate (used to bind party proofs to the channel)."""
    return hashlib.sha256(cert_der).hexdigest()
