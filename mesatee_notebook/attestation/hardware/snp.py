"""AMD SEV-SNP attestation reports: verify to a pinned ARK and read the guest's launch measurement.

Report layout (0x4A0 bytes, little-endian): signed part [0:0x2A0]; ECDSA P-384/SHA-384
signature with R at 0x2A0 and S at 0x2E8, each 72 bytes little-endian. The VCEK (per chip
and TCB) or VLEK (per cloud provider) signs it; ASK (or ASVK) signs that; the ARK signs
the ASK and itself, all RSA-PSS with SHA-384 and a 48-byte salt.
"""

from __future__ import annotations

import re
import struct
import uuid
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from mesatee_notebook.attestation.hardware import _der
from mesatee_notebook.attestation.hardware._certs import common_name, load_certificates, parsing, verify_chain
from mesatee_notebook.attestation.hardware._checks import check_debug, check_equal, check_report_data
from mesatee_notebook.attestation.hardware._dcap import extra_anchors
from mesatee_notebook.attestation.hardware._errors import (
    EndorsementMismatch,
    MissingEndorsement,
    RootNotTrusted,
    TcbTooLow,
    malformed,
    refuse,
)
from mesatee_notebook.attestation.hardware._verdict import Check, Verdict
from mesatee_notebook.attestation.hardware.policy import HardwarePolicy
from mesatee_notebook.attestation.hardware.roots import AMD_ARK_SHA256, SNP_PRODUCTS, amd_anchors, amd_ask
from mesatee_notebook.attestation.levels import Level
from mesatee_notebook.errors import EvidenceSignatureError

__all__ = [
    "REPORT_SIZE",
    "SnpReport",
    "certs_from_cert_table",
    "decode_report_bytes",
    "decode_tcb",
    "looks_like_snp_report",
    "parse_snp_report",
    "verify_snp_report",
]

_REPORT = "SEV-SNP report"
_TCB_EXT_CHECK = "VCEK TCB extension"
_TABLE = "SEV-SNP certificate table"

REPORT_SIZE = 0x4A0
SIGNED_SIZE = 0x2A0
POLICY_SMT = 1 << 16
POLICY_MIGRATE_MA = 1 << 18
POLICY_DEBUG = 1 << 19
POLICY_SINGLE_SOCKET = 1 << 20
_VCEK_OID = "1.3.6.1.4.1.3704.1"
_TCB_EXT = {"bl": "3.1", "tee": "3.2", "snp": "3.3", "ucode": "3.8", "fmc": "3.9"}
_CHAIN_CHECK = "AMD certificate chain"
_HEX = re.compile(rb"^[0-9a-fA-F]+$")
# GUIDs of the SEV-SNP extended-report certificate table (GHCB spec / Linux sev-guest ABI).
_CERT_GUIDS = {
    uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd"): "vcek",
    uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1"): "vlek",
    uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782"): "ark",
    uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae"): "ask",
}


@dataclass(frozen=True)
class SnpReport:
    """A parsed (not yet verified) SEV-SNP attestation report."""

    raw: bytes
    version: int
    policy: int
    signature_algo: int
    signer_info: int
    chip_id: bytes
    reported_tcb: int
    cpuid: tuple[int, int, int] | None

    @property
    def signing_key(self) -> str:
        """``"vcek"``, ``"vlek"`` or ``"none"``, from SIGNER_INFO bits 2..4."""
        return {0: "vcek", 1: "vlek", 7: "none"}.get((self.signer_info >> 2) & 0x7, "reserved")

    @property
    def mask_chip_id(self) -> bool:
        """True if the guest asked the firmware to zero CHIP_ID."""
        return bool(self.signer_info & 0x2)

    @property
    def debug(self) -> bool:
        """The guest policy's DEBUG bit."""
        return bool(self.policy & POLICY_DEBUG)


def looks_like_snp_report(data: bytes) -> bool:
    """Cheap sniff: 0x4A0 bytes starting with a plausible report version."""
    return len(data) == REPORT_SIZE and 2 <= int.from_bytes(data[:4], "little") <= 5


def decode_report_bytes(data: bytes) -> bytes:
    """Accept the raw 0x4A0-byte report or its hex text (whitespace ignored)."""
    if len(data) == REPORT_SIZE:
        return bytes(data)
    text = b"".join(bytes(data).split())
    if len(text) == 2 * REPORT_SIZE and _HEX.match(text):
        return bytes.fromhex(text.decode("ascii"))
    raise malformed(_REPORT, f"must be {REPORT_SIZE} bytes (or their hex), got {len(data)} bytes")


def parse_snp_report(data: bytes) -> SnpReport:
    """Parse a report (raw or hex) without verifying it."""
    raw = decode_report_bytes(data)
    (
        version,
        _,
        policy,
    ) = struct.unpack_from("<IIQ", raw, 0)
    if not 2 <= version <= 5:
        raise malformed(_REPORT, f"report version {version} is not supported (2 to 5)")
    (sig_algo,) = struct.unpack_from("<I", raw, 0x34)
    (signer_info,) = struct.unpack_from("<I", raw, 0x48)
    (reported_tcb,) = struct.unpack_from("<Q", raw, 0x180)
    cpuid = (raw[0x188], raw[0x189], raw[0x18A]) if version >= 3 else None
    return SnpReport(raw, version, policy, sig_algo, signer_info, raw[0x1A0:0x1E0], reported_tcb, cpuid)


def product_from_cpuid(cpuid: tuple[int, int, int] | None) -> str | None:
    """Return the product line from the report's CPUID family/model (report v3+)."""
    if cpuid is None:
        return None
    family, model, _ = cpuid
    if family == 0x19 and model <= 0x0F:
        return "Milan"
    if family == 0x19 and (0x10 <= model <= 0x1F or 0xA0 <= model <= 0xAF):
        return "Genoa"
    if family == 0x1A and model <= 0x1F:
        return "Turin"
    return None


def decode_tcb(tcb: int, product: str) -> dict[str, int]:
    """Split a TCB_VERSION into its SVNs.

    Milan/Genoa bytes are ``bl|tee|-|-|-|-|snp|ucode``; Turin ``fmc|bl|tee|snp|-|-|-|ucode``.
    """
    b = tcb.to_bytes(8, "little")
    if product == "Turin":
        return {"fmc": b[0], "bl": b[1], "tee": b[2], "snp": b[3], "ucode": b[7]}
    return {"bl": b[0], "tee": b[1], "snp": b[6], "ucode": b[7]}


def _ext(cert: x509.Certificate, suffix: str) -> bytes | None:
    try:
        ext = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(f"{_VCEK_OID}.{suffix}"))
    except x509.ExtensionNotFound:
        return None
    value = ext.value
    return value.value if isinstance(value, x509.UnrecognizedExtension) else None


def _ext_int(cert: x509.Certificate, suffix: str) -> int | None:
    raw = _ext(cert, suffix)
    if raw is None:
        return None
    tlv = _der.read_single(raw, "VCEK TCB extension")
    if tlv.tag != _der.INTEGER or not tlv.content:
        raise malformed(_TCB_EXT_CHECK, f"extension {suffix} is not an INTEGER")
    return int.from_bytes(tlv.content, "big", signed=True)


def _vcek_product(cert: x509.Certificate) -> str | None:
    raw = _ext(cert, "2")
    name = ""
    if raw:
        tlv = _der.read_single(raw, "VCEK product name")
        name = tlv.content.decode("ascii", "replace")
    if not name:
        issuer = cert.issuer.rfc4514_string()
        name = next((p for p in SNP_PRODUCTS if f"-{p}" in issuer), "")
    base = name.split("-")[0]
    return base if base in SNP_PRODUCTS else None


def _hwid(cert: x509.Certificate) -> bytes | None:
    raw = _ext(cert, "4")
    if raw is None:
        return None
    if len(raw) in (8, 64):
        return raw
    tlv = _der.read_single(raw, "VCEK hwID")
    return tlv.content


def certs_from_cert_table(table: bytes) -> dict[str, bytes]:
    """Read the extended-report certificate table (``auxblob``): ``{"vcek"|"vlek"|"ask"|"ark": DER}``."""
    out: dict[str, bytes] = {}
    pos = 0
    while pos + 24 <= len(table):
        guid_raw = table[pos : pos + 16]
        offset, length = struct.unpack_from("<II", table, pos + 16)
        pos += 24
        if not any(guid_raw) and offset == 0 and length == 0:
            return out
        if offset + length > len(table):
            raise malformed(_TABLE, "an entry points past the end of the table")
        name = _CERT_GUIDS.get(uuid.UUID(bytes=guid_raw)) or _CERT_GUIDS.get(uuid.UUID(bytes_le=guid_raw))
        if name is not None:
            out[name] = table[offset : offset + length]
    raise malformed(_TABLE, "no terminating all-zero entry")


def _split_chain(report: SnpReport, cert_chain: bytes | None) -> tuple[x509.Certificate, list[x509.Certificate]]:
    """Return the endorsement key's certificate (the one EC key) and the supplied RSA certificates."""
    if cert_chain is None:
        raise refuse(
            MissingEndorsement,
            "endorsement key",
            f"the report is signed by a {report.signing_key.upper()} whose certificate was not supplied; pass "
            "cert_chain with it (from AMD KDS, or the guest's configfs-tsm auxblob)",
        )
    certs = load_certificates(cert_chain, _CHAIN_CHECK)
    with parsing(_CHAIN_CHECK):
        leaves = [c for c in certs if isinstance(c.public_key(), ec.EllipticCurvePublicKey)]
        rsa_certs = [c for c in certs if isinstance(c.public_key(), rsa.RSAPublicKey)]
    if len(leaves) != 1:
        found = len(leaves)
        raise refuse(MissingEndorsement, "endorsement key", f"expected one VCEK/VLEK in cert_chain, found {found}")
    return leaves[0], rsa_certs


def _walk_up(
    leaf: x509.Certificate, supplied: list[x509.Certificate], fallback: list[x509.Certificate]
) -> list[x509.Certificate]:
    """Order the certificates above ``leaf`` by issuer; every supplied one must be used."""
    upper: list[x509.Certificate] = []
    issuer = leaf.issuer
    candidates = supplied + fallback
    while True:
        parent = next((c for c in candidates if c.subject == issuer and c not in upper), None)
        if parent is None:
            break
        upper.append(parent)
        if parent.subject == parent.issuer:
            break
        issuer = parent.issuer
    unused = [c for c in supplied if c not in upper]
    if unused:
        raise refuse(
            RootNotTrusted,
            _CHAIN_CHECK,
            f"the supplied {', '.join(repr(common_name(c)) for c in unused)} do not chain from "
            f"{common_name(leaf)!r} (issued by {leaf.issuer.rfc4514_string()!r}): wrong AMD product or vendor root",
        )
    return upper


def verify_snp_report(data: bytes, cert_chain: bytes | None = None, policy: HardwarePolicy | None = None) -> Verdict:
    """Verify a report (raw or hex) under its VCEK/VLEK, the chain to the pinned ARK, and ``policy``."""
    policy = policy or HardwarePolicy()
    report = parse_snp_report(data)
    raw = report.raw
    checks = [Check("report structure", True, f"SEV-SNP report v{report.version}, {REPORT_SIZE} bytes")]
    if report.signature_algo != 1:
        raise malformed(_REPORT, f"signature algorithm {report.signature_algo} is not ECDSA P-384/SHA-384 (1)")
    if report.signing_key not in ("vcek", "vlek"):
        raise refuse(MissingEndorsement, "endorsement key", f"the report's signing key is {report.signing_key!r}")

    leaf, supplied = _split_chain(report, cert_chain)
    with parsing(_CHAIN_CHECK):
        cert_product = _vcek_product(leaf)
    cpu_product = product_from_cpuid(report.cpuid)
    if cert_product and cpu_product and cert_product != cpu_product:
        raise refuse(
            EndorsementMismatch,
            "endorsement match",
            f"the report comes from a {cpu_product} CPU but the {report.signing_key.upper()} is for {cert_product}",
        )
    product = cpu_product or cert_product
    if product is None:
        raise refuse(RootNotTrusted, _CHAIN_CHECK, "cannot tell the AMD product line (Milan, Genoa, Turin)")
    leaf_name = common_name(leaf)
    expected_cn = f"SEV-{report.signing_key.upper()}"
    if leaf_name != expected_cn:
        raise refuse(
            EndorsementMismatch,
            "endorsement key",
            f"the report is signed by a {report.signing_key.upper()} but the certificate supplied is {leaf_name!r}",
        )
    shipped_ask = [amd_ask(product)] if report.signing_key == "vcek" else []
    chain, anchor = verify_chain(
        [leaf, *_walk_up(leaf, supplied, shipped_ask)],
        anchors=amd_anchors(product) + extra_anchors(policy),
        kind="amd",
        check=_CHAIN_CHECK,
        as_of=policy.when(),
    )
    path = " -> ".join(common_name(c) for c in chain)
    checks.append(
        Check(_CHAIN_CHECK, True, f"{path} (RSA-PSS SHA-384); root is {anchor.name} (SHA-256 {anchor.sha256[:16]}...)")
    )
    checks.append(
        Check(
            "certificate validity", True, f"all {len(chain)} certificates valid at {policy.when():%Y-%m-%d %H:%M} UTC"
        )
    )

    with parsing("report signature"):
        key = leaf.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        raise refuse(EvidenceSignatureError, "report signature", f"the {leaf_name} key is not ECDSA P-384")
    r = int.from_bytes(raw[0x2A0 : 0x2A0 + 72], "little")
    s = int.from_bytes(raw[0x2E8 : 0x2E8 + 72], "little")
    try:
        key.verify(encode_dss_signature(r, s), raw[:SIGNED_SIZE], ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise refuse(
            EvidenceSignatureError, "report signature", f"the report is not signed by this {leaf_name}"
        ) from None
    checks.append(Check("report signature", True, f"ECDSA P-384/SHA-384 over [0:0x2A0] under the {leaf_name}"))

    tcb = decode_tcb(report.reported_tcb, product)
    with parsing("endorsement match"):
        checks += _endorsement_checks(report, leaf, product, tcb)
    claims = _claims(report, product, tcb, leaf)
    claims["root"] = anchor.name
    claims["vendor_root"] = anchor.sha256 in AMD_ARK_SHA256.values()  # False: a root trusted only by the policy
    checks += _policy_checks(report, claims, tcb, policy)
    return Verdict(Level.SEV, "sev-snp", f"SEV-SNP attestation report v{report.version}", claims, tuple(checks))


def _endorsement_checks(report: SnpReport, leaf: x509.Certificate, product: str, tcb: dict[str, int]) -> list[Check]:
    """Check that the VCEK is this chip's and was issued for this reported TCB."""
    checks: list[Check] = []
    if report.signing_key == "vlek":
        checks.append(Check("chip id", None, "a VLEK is the cloud provider's key, not chip-specific"))
    elif report.mask_chip_id:
        checks.append(Check("chip id", None, "the guest set MASK_CHIP_ID, so the report carries no chip id"))
    else:
        hwid = _hwid(leaf)
        if hwid is None:
            raise refuse(EndorsementMismatch, "chip id", "the VCEK has no hwID extension (1.3.6.1.4.1.3704.1.4)")
        if report.chip_id[: len(hwid)] != hwid or any(report.chip_id[len(hwid) :]):
            raise refuse(
                EndorsementMismatch,
                "chip id",
                f"the report's chip id {report.chip_id.hex()[:16]}... is not the VCEK's {hwid.hex()[:16]}...",
            )
        checks.append(Check("chip id", True, "the report's CHIP_ID equals the VCEK hwID extension"))
    mismatched: list[str] = []
    for name, value in tcb.items():
        cert_value = _ext_int(leaf, _TCB_EXT[name])
        if cert_value is None and report.signing_key == "vcek":
            mismatched.append(f"{name}: VCEK has no value")
        elif cert_value is not None and cert_value != value:
            mismatched.append(f"{name}: report {value}, VCEK {cert_value}")
    if mismatched:
        raise refuse(
            EndorsementMismatch, "reported TCB", "the VCEK was issued for another TCB (" + "; ".join(mismatched) + ")"
        )
    shown = ", ".join(f"{k}={v}" for k, v in tcb.items())
    checks.append(Check("reported TCB", True, f"{shown} ({product}) match the VCEK's TCB extensions"))
    return checks


def _tcb_hex(tcb: int) -> str:
    return f"{tcb:016x}"


def _claims(report: SnpReport, product: str, tcb: dict[str, int], leaf: x509.Certificate) -> dict[str, Any]:
    raw = report.raw
    (guest_svn,) = struct.unpack_from("<I", raw, 4)
    (vmpl,) = struct.unpack_from("<I", raw, 0x30)
    current_tcb, platform_info = struct.unpack_from("<QQ", raw, 0x38)
    (committed_tcb,) = struct.unpack_from("<Q", raw, 0x1E0)
    (launch_tcb,) = struct.unpack_from("<Q", raw, 0x1F0)
    claims: dict[str, Any] = {
        "tee": "sev-snp",
        "report_version": report.version,
        "product": product,
        "signing_key": report.signing_key,
        "guest_svn": guest_svn,
        "policy": f"{report.policy:016x}",
        "policy_abi": f"{(report.policy >> 8) & 0xFF}.{report.policy & 0xFF}",
        "debug": report.debug,
        "policy_migrate_ma": bool(report.policy & POLICY_MIGRATE_MA),
        "policy_smt": bool(report.policy & POLICY_SMT),
        "policy_single_socket": bool(report.policy & POLICY_SINGLE_SOCKET),
        "vmpl": vmpl,
        "family_id": raw[0x10:0x20].hex(),
        "image_id": raw[0x20:0x30].hex(),
        "measurement": raw[0x90:0xC0].hex(),
        "host_data": raw[0xC0:0xE0].hex(),
        "report_data": raw[0x50:0x90].hex(),
        "id_key_digest": raw[0xE0:0x110].hex(),
        "author_key_digest": raw[0x110:0x140].hex(),
        "report_id": raw[0x140:0x160].hex(),
        "chip_id": report.chip_id.hex(),
        "reported_tcb": _tcb_hex(report.reported_tcb),
        "reported_tcb_parts": tcb,
        "current_tcb": _tcb_hex(current_tcb),
        "committed_tcb": _tcb_hex(committed_tcb),
        "launch_tcb": _tcb_hex(launch_tcb),
        "platform_info": f"{platform_info:016x}",
        "current_firmware": f"{raw[0x1EA]}.{raw[0x1E9]}.{raw[0x1E8]}",
        "committed_firmware": f"{raw[0x1EE]}.{raw[0x1ED]}.{raw[0x1EC]}",
        "endorsement_key_sha256": _spki_sha256(leaf),
    }
    if report.cpuid is not None:
        claims["cpuid"] = "family 0x{:02x} model 0x{:02x} stepping 0x{:02x}".format(*report.cpuid)
    return claims


def _spki_sha256(cert: x509.Certificate) -> str:
    from hashlib import sha256

    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return sha256(spki).hexdigest()


def _policy_checks(
    report: SnpReport, claims: dict[str, Any], tcb: dict[str, int], policy: HardwarePolicy
) -> list[Check]:
    checks = [check_debug(report.debug, policy.allow_debug, "guest")]
    checks.append(check_equal("measurement", claims["measurement"], policy.expected("snp_measurement")))
    checks.append(check_equal("host data", claims["host_data"], policy.expected("snp_host_data")))
    if policy.snp_min_tcb is None:
        checks.append(Check("minimum TCB", None, "the policy sets no minimum TCB"))
    else:
        low = [f"{k} {tcb.get(k, 0)} < {v}" for k, v in policy.snp_min_tcb.items() if tcb.get(k, 0) < v]
        if low:
            raise refuse(TcbTooLow, "minimum TCB", "the reported TCB is below the policy's minimum: " + "; ".join(low))
        checks.append(Check("minimum TCB", True, "every reported TCB component meets the policy's minimum"))
    checks.append(check_report_data(report.raw[0x50:0x90], policy.expected("report_data")))
    checks.append(Check("TCB status", None, "AMD security bulletins / current TCB not consulted (no collateral)"))
    checks.append(Check("certificate revocation", None, "the AMD CRL for the ASK/VCEK was not supplied"))
    checks.append(Check("ID block / author key", None, f"ID key digest {claims['id_key_digest'][:16]}... not checked"))
    return checks
