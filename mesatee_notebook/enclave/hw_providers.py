"""Hardware evidence providers for the enclave kernel: configfs-tsm (TDX, SEV-SNP) and Gramine (SGX).

* **configfs-tsm** (Linux >= 6.7, inside a TDX or SEV-SNP guest): make a directory under
  ``/sys/kernel/config/tsm/report``, write 64 bytes of report data to ``inblob``, read the
  quote or report from ``outblob`` (and SEV-SNP certificates from ``auxblob``), and check
  ``generation`` so that a concurrent writer cannot swap the report under us.
* **Gramine** ``/dev/attestation`` (inside an SGX enclave run by gramine-sgx with DCAP):
  write ``user_report_data``, read ``quote``; ``attestation_type`` must be ``dcap``.

Every function takes ``root``, the filesystem root these paths hang from (``/`` on real
hardware), so tests can point it at a temporary tree. Such tests exercise the file ABI
only; they are **not** hardware tests and prove nothing about a real TEE.

Serving (``serve --level sev|tdx|sev-snp|sgx``) goes through :func:`open_hardware_reporter`: on real hardware it is
:class:`ConfigfsTsm` or :class:`GramineAttestation` at ``/``. ``serve --hw-root DIR`` (refused unless
``MESATEE_TEST_MIMIC_HARDWARE=1``) uses :class:`MimicTsm` / :class:`MimicGramine` instead: a plain directory cannot
generate ``outblob`` (or ``quote``) when ``inblob`` (``user_report_data``) is written, so they play that part of the
Linux kernel (or of Gramine) and ask a test-only "firmware" listening on
``DIR/mimic-firmware.sock`` (``tests/hardware/mimic.py``; nothing in this package can sign a report). Everything else,
the report flow here, the evidence and the client's verification, is the code a real guest runs.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

import cbor2

from mesatee_notebook.attestation.hardware._dcap import looks_like_quote, parse_quote
from mesatee_notebook.attestation.levels import Level
from mesatee_notebook.errors import HardwareLevelUnavailable, LevelNotAvailableError, MalformedEvidence

__all__ = [
    "MIMIC_ENV",
    "ConfigfsTsm",
    "GramineAttestation",
    "HardwareReporter",
    "MimicGramine",
    "MimicTsm",
    "TsmReport",
    "available_hardware_levels",
    "get_hardware_evidence",
    "hardware_level_error",
    "open_hardware_reporter",
    "open_level_hardware",
]

REPORT_DATA_SIZE = 64
TSM_REPORT_DIR = "sys/kernel/config/tsm/report"
GRAMINE_DIR = "dev/attestation"
_TSM_DEVICES = {"tdx_guest": "dev/tdx_guest", "sev_guest": "dev/sev-guest"}
_TSM_PROVIDERS = {"tdx_guest": "tdx", "sev_guest": "sev-snp"}
_MAX_BLOB = 1 << 20
_RETRIES = 3
MIMIC_ENV = "MESATEE_TEST_MIMIC_HARDWARE"  # =1 lets `serve --hw-root DIR` use a mimic tree (tests only)
MIMIC_SOCKET = "mimic-firmware.sock"


def _report_data(report_data: bytes) -> bytes:
    """Pad caller report data to the 64 bytes every TEE signs; refuse anything longer."""
    if len(report_data) > REPORT_DATA_SIZE:
        msg = f"report data is {len(report_data)} bytes; TEEs sign at most {REPORT_DATA_SIZE}"
        raise ValueError(msg)
    return bytes(report_data).ljust(REPORT_DATA_SIZE, b"\x00")


def _read(path: Path) -> bytes:
    with path.open("rb") as fh:
        return fh.read(_MAX_BLOB)


def _write(path: Path, data: bytes) -> None:
    with path.open("wb", buffering=0) as fh:
        fh.write(data)


@dataclass(frozen=True)
class TsmReport:
    """One configfs-tsm report: the evidence, the provider's name and its auxiliary blob."""

    outblob: bytes
    provider: str
    auxblob: bytes
    generation: int

    @property
    def tee(self) -> str:
        """``"tdx"`` or ``"sev-snp"``."""
        return _TSM_PROVIDERS.get(self.provider, self.provider)


class ConfigfsTsm:
    """The Linux configfs-tsm report interface, for TDX and SEV-SNP guests."""

    def __init__(self, root: str | os.PathLike[str] = "/") -> None:
        self.root = Path(root)
        self.report_dir = self.root / TSM_REPORT_DIR

    def present(self) -> bool:
        """Tell whether the configfs-tsm report directory exists (configfs mounted, tsm module loaded)."""
        return self.report_dir.is_dir()

    def guest_provider(self) -> str | None:
        """``"tdx_guest"`` or ``"sev_guest"`` from the guest device node, without making a report."""
        for provider, dev in _TSM_DEVICES.items():
            if (self.root / dev).exists():
                return provider
        return None

    def _new_entry(self) -> Path:
        """Create a report entry; configfs fills it with the attribute files."""
        entry = self.report_dir / f"mesatee-{os.getpid()}-{secrets.token_hex(4)}"
        entry.mkdir()
        return entry

    def _read_attr(self, entry: Path, name: str) -> bytes:
        """Read one attribute file of a report entry."""
        return _read(entry / name)

    def _write_attr(self, entry: Path, name: str, data: bytes) -> None:
        """Write one attribute file of a report entry (the kernel bumps ``generation``)."""
        _write(entry / name, data)

    def _remove_entry(self, entry: Path) -> None:
        """Remove the entry (configfs removes its attribute files with it)."""
        try:
            entry.rmdir()
        except OSError:
            return

    def report(self, report_data: bytes) -> TsmReport:
        """Produce a report binding ``report_data`` (at most 64 bytes, zero-padded)."""
        blob = _report_data(report_data)
        if not self.present():
            msg = (
                f"configfs-tsm is not available: {self.report_dir} does not exist "
                "(not a TDX/SEV-SNP guest, or Linux < 6.7, or configfs not mounted)"
            )
            raise LevelNotAvailableError(msg, level=Level.SEV.label)
        try:
            entry = self._new_entry()
        except OSError as exc:
            msg = f"configfs-tsm: cannot create a report entry in {self.report_dir}: {exc.strerror or exc}"
            raise LevelNotAvailableError(msg, level=Level.SEV.label) from exc
        try:
            return self._report_in(entry, blob)
        finally:
            self._remove_entry(entry)

    def _report_in(self, entry: Path, blob: bytes) -> TsmReport:
        try:
            for _ in range(_RETRIES):
                before = int(self._read_attr(entry, "generation").strip() or b"0")
                self._write_attr(entry, "inblob", blob)
                outblob = self._read_attr(entry, "outblob")
                provider = self._read_attr(entry, "provider").decode("ascii", "replace").strip()
                auxblob = self._read_attr(entry, "auxblob") if (entry / "auxblob").exists() else b""
                after = int(self._read_attr(entry, "generation").strip() or b"0")
                if after == before + 1:
                    break
            else:
                msg = "configfs-tsm: another writer kept changing the report entry (generation raced); try again"
                raise LevelNotAvailableError(msg, level=Level.SEV.label)
        except (OSError, ValueError) as exc:
            msg = f"configfs-tsm: reading the report from {entry} failed: {exc}"
            raise LevelNotAvailableError(msg, level=Level.SEV.label) from exc
        if provider not in _TSM_PROVIDERS:
            msg = f"configfs-tsm provider {provider!r} is not a TDX or SEV-SNP guest"
            raise LevelNotAvailableError(msg, level=Level.SEV.label)
        if not outblob:
            msg = "configfs-tsm returned an empty outblob"
            raise LevelNotAvailableError(msg, level=Level.SEV.label)
        return TsmReport(outblob, provider, auxblob, after)


class MimicTsm(ConfigfsTsm):
    """TEST ONLY: configfs-tsm's kernel side on a plain directory; a test "firmware" behind a Unix socket reports.

    Real configfs creates an entry's attribute files on ``mkdir`` and generates ``outblob`` when ``inblob`` is
    written; a plain directory does neither, so this does it, asking ``root/mimic-firmware.sock`` for the blobs.
    It holds no key and makes no signature. A kernel using it says MIMIC in its evidence, banner and log.
    """

    def _new_entry(self) -> Path:
        entry = super()._new_entry()
        provider = self.guest_provider() or "none"
        _write(entry / "generation", b"0\n")
        _write(entry / "provider", provider.encode() + b"\n")
        return entry

    def _write_attr(self, entry: Path, name: str, data: bytes) -> None:
        super()._write_attr(entry, name, data)
        if name != "inblob":
            return
        provider = self._read_attr(entry, "provider").decode("ascii", "replace").strip()
        answer = _ask_firmware(self.root / MIMIC_SOCKET, {"provider": provider, "inblob": bytes(data)})
        _write(entry / "outblob", answer.get("outblob", b""))
        if answer.get("auxblob"):
            _write(entry / "auxblob", answer["auxblob"])
        generation = int(self._read_attr(entry, "generation").strip() or b"0")
        _write(entry / "generation", b"%d\n" % (generation + 1))

    def _remove_entry(self, entry: Path) -> None:
        for item in entry.iterdir():  # configfs removes attribute files itself; a plain directory needs this
            item.unlink()
        super()._remove_entry(entry)


def _ask_firmware(path: Path, request: dict[str, object]) -> dict[str, bytes]:
    """One request to the mimic firmware: CBOR in, CBOR out, the socket half-closed in between."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(path))
        sock.sendall(cbor2.dumps(request))
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    answer = cbor2.loads(b"".join(chunks))
    if not isinstance(answer, dict) or not all(isinstance(v, bytes) for v in answer.values()):
        msg = "the mimic firmware answered something that is not {outblob, auxblob} bytes"
        raise ValueError(msg)
    return answer


class HardwareReporter:
    """What a ``sev``/``sgx`` kernel asks for reports: one guest or enclave (in tests, a mimic), one at a time.

    ``device`` is a :class:`ConfigfsTsm` (SEV-SNP, TDX) or a :class:`GramineAttestation` (SGX).
    """

    def __init__(self, device: ConfigfsTsm | GramineAttestation, tee: str, *, mimic: bool) -> None:
        self.device = device
        self.tee = tee
        self.mimic = mimic
        self._lock = threading.Lock()

    @property
    def level(self) -> Level:
        """``Level.SGX`` for an SGX enclave, ``Level.SEV`` for an SEV-SNP or TDX guest."""
        return Level.SGX if self.tee == "sgx" else Level.SEV

    @property
    def source(self) -> str:
        """``configfs-tsm`` or ``gramine``; ``mimic`` for the test-only tree (never shown as hardware)."""
        if self.mimic:
            return "mimic"
        return "gramine" if isinstance(self.device, GramineAttestation) else "configfs-tsm"

    @property
    def description(self) -> str:
        """One line for the banner and the log."""
        what = "enclave" if self.tee == "sgx" else "guest"
        if self.mimic:
            return (
                f"MIMIC {self.tee} {what}: a test-only {self.source_abi} tree at {self.device.root} whose reports a "
                "test 'firmware' signs with a TEST chain. This is NOT a TEE and NOT hardware."
            )
        return f"{self.tee} {what}, {self.source_abi} under {self.device.root}"

    @property
    def source_abi(self) -> str:
        """The file interface the reports come through."""
        return "Gramine /dev/attestation" if isinstance(self.device, GramineAttestation) else "configfs-tsm"

    def report(self, report_data: bytes) -> tuple[bytes, bytes]:
        """``(report, auxblob)`` over ``report_data`` (64 bytes); a configfs provider that changed TEE is refused."""
        with self._lock:
            if isinstance(self.device, GramineAttestation):
                return self.device.quote(report_data), b""
            rep = self.device.report(report_data)
        if rep.tee != self.tee:
            msg = f"configfs-tsm now reports as {rep.tee!r}, not the {self.tee!r} guest this kernel started on"
            raise LevelNotAvailableError(msg, level=Level.SEV.label)
        return rep.outblob, rep.auxblob


def open_hardware_reporter(requested: str, hw_root: str | os.PathLike[str] | None = None) -> HardwareReporter:
    """The guest or enclave a ``serve --level requested`` kernel reports from (sev: either TEE; tdx; sev-snp; sgx).

    ``hw_root`` (a mimic tree, tests only) needs ``MESATEE_TEST_MIMIC_HARDWARE=1`` in the environment. Without the
    hardware, the refusal is :func:`hardware_level_error`'s, naming what was looked for.
    """
    name = str(requested).strip().lower()
    tees = _TEES.get(name)
    if tees is None:
        raise hardware_level_error(name, hw_root or "/")
    if hw_root is not None and os.environ.get(MIMIC_ENV) != "1":
        msg = (
            f"--hw-root {hw_root} is a TEST-ONLY option: it serves from a mimic {name} tree whose reports a test "
            f"chain signs, which is NOT hardware. Set {MIMIC_ENV}=1 to use it in tests; on real hardware, omit it."
        )
        raise HardwareLevelUnavailable(msg, level=Level.parse(name).label, tee=list(tees), looked_for=[], found=[])
    mimic = hw_root is not None
    if name == "sgx":
        gramine = MimicGramine(hw_root) if hw_root is not None else GramineAttestation("/")
        if not gramine.present():
            raise hardware_level_error(name, gramine.root)
        return HardwareReporter(gramine, "sgx", mimic=mimic)
    tsm: ConfigfsTsm = MimicTsm(hw_root) if hw_root is not None else ConfigfsTsm("/")
    tee = _TSM_PROVIDERS.get(tsm.guest_provider() or "")
    if not tsm.present() or tee not in tees:
        raise hardware_level_error(name, tsm.root)
    return HardwareReporter(tsm, tee, mimic=mimic)


def open_level_hardware(
    level: Level, requested: str, hw_root: str | os.PathLike[str] | None
) -> HardwareReporter | None:
    """The kernel's hardware for ``level``: None below sev, else a reporter, or a refusal naming what is missing."""
    if level not in (Level.SEV, Level.SGX):
        return None
    reporter = open_hardware_reporter(requested if level is Level.SEV else "sgx", hw_root)
    if reporter.mimic:
        logging.getLogger("mesatee.enclave").warning("%s", reporter.description)
    return reporter


class GramineAttestation:
    """Gramine's ``/dev/attestation`` pseudo-files, inside an SGX enclave (DCAP)."""

    def __init__(self, root: str | os.PathLike[str] = "/") -> None:
        self.root = Path(root)
        self.dir = self.root / GRAMINE_DIR

    def attestation_type(self) -> str | None:
        """``"dcap"``, ``"epid"`` or ``"none"``; ``None`` outside Gramine."""
        try:
            return _read(self.dir / "attestation_type").decode("ascii", "replace").strip()
        except OSError:
            return None

    def present(self) -> bool:
        """Tell whether this runs inside a Gramine SGX enclave configured for DCAP quotes."""
        return self.attestation_type() == "dcap" and (self.dir / "quote").exists()

    def _write_attr(self, name: str, data: bytes) -> None:
        """Write one pseudo-file (Gramine makes the quote when ``user_report_data`` is written)."""
        _write(self.dir / name, data)

    def quote(self, report_data: bytes) -> bytes:
        """Write ``user_report_data`` and read the DCAP quote that commits to it."""
        blob = _report_data(report_data)
        kind = self.attestation_type()
        if kind is None:
            msg = f"SGX via Gramine is not available: {self.dir} does not exist (not inside a Gramine enclave)"
            raise LevelNotAvailableError(msg, level=Level.SGX.label)
        if kind != "dcap":
            msg = f'Gramine attestation type is {kind!r}; set sgx.remote_attestation = "dcap" in the manifest'
            raise LevelNotAvailableError(msg, level=Level.SGX.label)
        try:
            self._write_attr("user_report_data", blob)
            quote = _read(self.dir / "quote")
        except OSError as exc:
            msg = f"Gramine /dev/attestation failed: {exc.strerror or exc}"
            raise LevelNotAvailableError(msg, level=Level.SGX.label) from exc
        if not looks_like_quote(quote):
            msg = "Gramine returned something that is not a DCAP quote"
            raise MalformedEvidence(msg, check="quote")
        parsed = parse_quote(quote)
        if parsed.body[320:384] != blob:
            msg = "Gramine returned a quote whose report data is not the one just written (raced?)"
            raise MalformedEvidence(msg, check="report data")
        return quote


class MimicGramine(GramineAttestation):
    """TEST ONLY: Gramine's part on a plain directory: writing ``user_report_data`` asks the test firmware."""

    def _write_attr(self, name: str, data: bytes) -> None:
        super()._write_attr(name, data)
        if name == "user_report_data":
            answer = _ask_firmware(self.root / MIMIC_SOCKET, {"provider": "gramine-sgx", "inblob": bytes(data)})
            _write(self.dir / "quote", answer.get("outblob", b""))


def available_hardware_levels(root: str | os.PathLike[str] = "/") -> frozenset[Level]:
    """Return the hardware levels this machine can produce evidence for, without producing any."""
    levels: set[Level] = set()
    if GramineAttestation(root).present():
        levels.add(Level.SGX)
    tsm = ConfigfsTsm(root)
    if tsm.present() and tsm.guest_provider() is not None:
        levels.add(Level.SEV)
    return frozenset(levels)


def get_hardware_evidence(level: Level, report_data: bytes, root: str | os.PathLike[str] = "/") -> bytes:
    """Evidence binding ``report_data``: an SGX quote (Gramine), or a TDX quote / SEV-SNP report (configfs-tsm).

    For SEV-SNP only the report is returned; use :class:`ConfigfsTsm` directly for the
    ``auxblob`` certificates (VCEK) when the host provides them.
    """
    level = Level.parse(level)
    if level == Level.SGX:
        return GramineAttestation(root).quote(report_data)
    if level == Level.SEV:
        return ConfigfsTsm(root).report(report_data).outblob
    msg = f"security level {level.label!r} has no hardware evidence provider here (only sgx and sev)"
    raise LevelNotAvailableError(msg, level=level.label)


# What `serve --level X` looks for, per TEE: (path under root, what it is). Printed in the refusal.
_LOOKED_FOR: dict[str, tuple[tuple[str, str], ...]] = {
    "sev-snp": (
        ("dev/sev-guest", "the AMD SEV-SNP guest driver's device (sev-guest module, inside an SNP guest)"),
        (TSM_REPORT_DIR, "the configfs-tsm report interface (Linux >= 6.7, configfs mounted)"),
    ),
    "tdx": (
        ("dev/tdx_guest", "the Intel TDX guest driver's device (tdx_guest module, inside a TD)"),
        (TSM_REPORT_DIR, "the configfs-tsm report interface (Linux >= 6.7, configfs mounted)"),
    ),
    "sgx": (
        (f"{GRAMINE_DIR}/attestation_type", "Gramine's attestation pseudo-file, reading 'dcap' (gramine-sgx)"),
        (f"{GRAMINE_DIR}/quote", "Gramine's DCAP quote pseudo-file (needs the SGX driver /dev/sgx_enclave and a QE)"),
    ),
}
_TEES = {"sev": ("sev-snp", "tdx"), "sev-snp": ("sev-snp",), "snp": ("sev-snp",), "tdx": ("tdx",), "sgx": ("sgx",)}


def hardware_level_error(requested: str, root: str | os.PathLike[str] = "/") -> HardwareLevelUnavailable:
    """Why ``serve --level requested`` (``sgx``, ``tdx``, ``sev-snp`` or ``sev``) cannot serve on this machine.

    Always an error: where the device is missing it names each path it looked for; where it is present but cannot
    make reports (Gramine without DCAP), it says so. There is never a fallback to software trust.
    """
    name = str(requested).strip().lower()
    tees = _TEES.get(name)
    if tees is None:
        msg = f"{requested!r} is not a hardware level (expected sgx, tdx, sev-snp or sev)"
        raise ValueError(msg)
    base = Path(root)
    looked = [(tee, path, what, (base / path).exists()) for tee in tees for path, what in _LOOKED_FOR[tee]]
    found = sorted({tee for tee in tees if all(ok for t, _, _, ok in looked if t == tee)})
    details = {
        "level": Level.parse(name).label,
        "tee": list(tees),
        "looked_for": sorted({str(base / path) for _, path, _, _ in looked}),
        "missing": sorted({str(base / path) for _, path, _, ok in looked if not ok}),
        "found": found,
    }
    if found:
        present = ", ".join(sorted({str(base / p) for _, p, _, _ in looked}))
        msg = (
            f"security level {name!r}: the {' and '.join(found)} interfaces are present ({present}) but cannot make "
            "reports (Gramine: attestation_type must read 'dcap', sgx.remote_attestation = \"dcap\"; configfs-tsm: "
            "no guest provider); nothing was served"
        )
        return HardwareLevelUnavailable(msg, **details)
    unique = {path: (what, ok) for _, path, what, ok in looked}
    lines = "; ".join(
        f"{base / path} ({what}): {'present' if ok else 'MISSING'}" for path, (what, ok) in unique.items()
    )
    msg = (
        f"security level {name!r} is not available on this platform: no {'/'.join(tees)} hardware here. "
        f"Looked for {lines}. There is no software fallback for a hardware level (see docs/tpm.md, 'Hardware levels')."
    )
    return HardwareLevelUnavailable(msg, **details)
