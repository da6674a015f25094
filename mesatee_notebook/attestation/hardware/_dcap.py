"""Intel DCAP ECDSA quotes (v3, v4, v5) shared by SGX and TDX: layout, signatures, QE and PCK chain.

Layout (all integers little-endian)::

    header 48      version u16 | att_key_type u16 | tee_type u32 | qe_svn u16 | pce_svn u16
                   | qe_vendor_id 16 | user_data 20
    [v5: body_type u16 | body_size u32]
    body           SGX report 384 | TD report 584 (TDX 1.0) | 648 (TDX 1.5)
    sig_len u32
    signature data ECDSA sig 64 (r||s) | attestation key 64 (x||y)
                   v3:    QE report 384 | QE sig 64 | auth u16+data | cert type 5 u16 | size u32 | PEM
                   v4/5:  cert type 6 u16 | size u32 | [QE report | QE sig | auth | cert type 5 | PEM]

The quote signature covers header (+ v5 body descriptor) + body.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from mesatee_notebook.attestation.hardware import _der
from mesatee_notebook.attestation.hardware._certs import (
    TrustAnchor,
    common_name,
    load_certificates,
    parsing,
    verify_chain,
)
from mesatee_notebook.attestation.hardware._errors import MissingEndorsement, malformed, refuse
from mesatee_notebook.attestation.hardware._verdict import Check
from mesatee_notebook.attestation.hardware.policy import HardwarePolicy
from mesatee_notebook.attestation.hardware.roots import INTEL_SGX_ROOT_CA_SHA256, intel_anchors
from mesatee_notebook.errors import EvidenceSignatureError, KeyBindingError

__all__ = [
    "BODY_SGX",
    "BODY_TDX10",
    "BODY_TDX15",
    "DcapQuote",
    "HEADER_SIZE",
    "TEE_SGX",
    "TEE_TDX",
    "collateral_not_checked",
    "extra_anchors",
    "looks_like_quote",
    "parse_quote",
    "sgx_report_fields",
    "verify_quote",
]

_HEADER = "quote header"
_SGX_BODY = "SGX report body"

HEADER_SIZE = 48
TEE_SGX = 0x00000000
TEE_TDX = 0x00000081
ATT_KEY_ECDSA_P256 = 2
BODY_SGX, BODY_TDX10, BODY_TDX15 = 1, 2, 3
BODY_SIZES = {BODY_SGX: 384, BODY_TDX10: 584, BODY_TDX15: 648}
CERT_PCK_CHAIN = 5
CERT_QE_REPORT = 6
SGX_REPORT_SIZE = 384
INTEL_QE_VENDOR_ID = "939a7233f79c4ca9940a0db3957f0607"
_SGX_EXT_OID = x509.ObjectIdentifier("1.2.840.113741.1.13.1")
_CHAIN_CHECK = "PCK certificate chain"


class _Reader:
    """Bounds-checked little-endian reads; running short is a typed parse error."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.pos = 0
        self.what = what

    def take(self, size: int, field: str) -> bytes:
        end = self.pos + size
        if size < 0 or end > len(self.data):
            raise malformed(
                self.what,
                f"truncated: {field} needs {size} bytes at offset {self.pos}, only {len(self.data) - self.pos} left",
            )
        out = self.data[self.pos : end]
        self.pos = end
        return out

    def u16(self, field: str) -> int:
        value: int = struct.unpack("<H", self.take(2, field))[0]
        return value

    def u32(self, field: str) -> int:
        value: int = struct.unpack("<I", self.take(4, field))[0]
        return value

    def done(self, field: str) -> None:
        if self.pos != len(self.data):
            raise malformed(self.what, f"{len(self.data) - self.pos} unexpected bytes after {field}")


@dataclass(frozen=True)
class DcapQuote:
    """A parsed (not yet verified) DCAP ECDSA quote."""

    version: int
    tee_type: int
    qe_svn: int
    pce_svn: int
    qe_vendor_id: bytes
    user_data: bytes
    body_type: int
    body: bytes
    signed: bytes
    signature: bytes
    attest_key: bytes
    qe_report: bytes
    qe_report_signature: bytes
    qe_auth_data: bytes
    outer_cert_type: int
    cert_chain_pem: bytes
    length: int
    trailing: int

    @property
    def tee(self) -> str:
        """``"sgx"`` or ``"tdx"``."""
        return "tdx" if self.tee_type == TEE_TDX else "sgx"


def looks_like_quote(data: bytes) -> bool:
    """Cheap format sniff: a DCAP header with a known version and the ECDSA-P256 key type."""
    if len(data) < 8:
        return False
    version, key_type, tee_type = struct.unpack_from("<HHI", data, 0)
    return version in (3, 4, 5) and key_type == ATT_KEY_ECDSA_P256 and tee_type in (TEE_SGX, TEE_TDX)


def parse_quote(data: bytes) -> DcapQuote:
    """Parse a DCAP quote v3/v4/v5; trailing padding after the signature data is tolerated."""
    r = _Reader(bytes(data), "quote")
    version = r.u16("version")
    key_type = r.u16("attestation key type")
    tee_type = r.u32("TEE type")
    qe_svn = r.u16("QE SVN")
    pce_svn = r.u16("PCE SVN")
    qe_vendor_id = r.take(16, "QE vendor id")
    user_data = r.take(20, "user data")
    body_type = _body_type(r, version, key_type, tee_type)
    body = r.take(BODY_SIZES[body_type], "report body")
    signed = r.data[: r.pos]
    sig_len = r.u32("signature data length")
    s = _Reader(r.take(sig_len, "signature data"), "quote signature data")
    signature = s.take(64, "quote signature")
    attest_key = s.take(64, "attestation key")
    qe, outer_type = _certification_data(s, version)
    qe_report = qe.take(SGX_REPORT_SIZE, "QE report")
    qe_sig = qe.take(64, "QE report signature")
    auth = qe.take(qe.u16("QE auth data size"), "QE auth data")
    chain = _pck_chain(qe)
    if qe is not s:
        s.done("the certification data")
    return DcapQuote(
        version=version,
        tee_type=tee_type,
        qe_svn=qe_svn,
        pce_svn=pce_svn,
        qe_vendor_id=qe_vendor_id,
        user_data=user_data,
        body_type=body_type,
        body=body,
        signed=signed,
        signature=signature,
        attest_key=attest_key,
        qe_report=qe_report,
        qe_report_signature=qe_sig,
        qe_auth_data=auth,
        outer_cert_type=outer_type,
        cert_chain_pem=chain,
        length=r.pos,
        trailing=len(r.data) - r.pos,
    )


def _body_type(r: _Reader, version: int, key_type: int, tee_type: int) -> int:
    """The report body type a quote header announces (v5 reads it from the quote), checked against the TEE type."""
    if version not in (3, 4, 5):
        raise malformed(_HEADER, f"quote version {version} is not supported (3, 4 or 5)")
    if key_type != ATT_KEY_ECDSA_P256:
        raise malformed(_HEADER, f"attestation key type {key_type} is not ECDSA-256-with-P-256")
    if version == 3:
        if tee_type != TEE_SGX:
            raise malformed(_HEADER, f"a v3 quote must be SGX, header says TEE type 0x{tee_type:x}")
        return BODY_SGX
    if tee_type not in (TEE_SGX, TEE_TDX):
        raise malformed(_HEADER, f"unknown TEE type 0x{tee_type:x}")
    if version == 4:
        return BODY_TDX10 if tee_type == TEE_TDX else BODY_SGX
    body_type = r.u16("body type")
    body_size = r.u32("body size")
    if body_type not in BODY_SIZES or BODY_SIZES[body_type] != body_size:
        raise malformed(_HEADER, f"v5 body type {body_type} with size {body_size} is not known")
    if (body_type == BODY_SGX) != (tee_type == TEE_SGX):
        raise malformed(_HEADER, f"v5 body type {body_type} contradicts TEE type 0x{tee_type:x}")
    return body_type


def _certification_data(s: _Reader, version: int) -> tuple[_Reader, int]:
    """The reader positioned at the QE report, and the outer certification data type."""
    if version == 3:
        return s, CERT_PCK_CHAIN
    outer_type = s.u16("certification data type")
    if outer_type != CERT_QE_REPORT:
        raise refuse(
            MissingEndorsement,
            _CHAIN_CHECK,
            f"certification data type {outer_type} is not 6 (QE report with PCK chain); cannot verify offline",
        )
    qe = _Reader(s.take(s.u32("certification data size"), "certification data"), "QE report certification data")
    return qe, outer_type


def _pck_chain(qe: _Reader) -> bytes:
    cert_type = qe.u16("PCK certification data type")
    if cert_type != CERT_PCK_CHAIN:
        raise refuse(
            MissingEndorsement,
            _CHAIN_CHECK,
            f"certification data type {cert_type} is not 5 (PCK certificate chain); "
            "fetch the PCK certificate from Intel PCS to verify this quote",
        )
    chain = qe.take(qe.u32("PCK chain size"), "PCK certificate chain")
    qe.done("the PCK certificate chain")
    return chain


def sgx_report_fields(body: bytes) -> dict[str, Any]:
    """Decode a 384-byte SGX report body (enclave report or QE report)."""
    if len(body) != SGX_REPORT_SIZE:
        raise malformed(_SGX_BODY, f"must be {SGX_REPORT_SIZE} bytes, got {len(body)}")
    flags, xfrm = struct.unpack_from("<QQ", body, 48)
    prod_id, svn, config_svn = struct.unpack_from("<HHH", body, 256)
    return {
        "cpu_svn": body[0:16].hex(),
        "misc_select": body[16:20][::-1].hex(),
        "isv_ext_prod_id": body[32:48].hex(),
        "attributes": body[48:64].hex(),
        "attributes_flags": f"{flags:016x}",
        "xfrm": f"{xfrm:016x}",
        "debug": bool(flags & 0x2),
        "mrenclave": body[64:96].hex(),
        "mrsigner": body[128:160].hex(),
        "config_id": body[192:256].hex(),
        "isv_prod_id": prod_id,
        "isv_svn": svn,
        "config_svn": config_svn,
        "isv_family_id": body[304:320].hex(),
        "report_data": body[320:384].hex(),
    }


def extra_anchors(policy: HardwarePolicy) -> tuple[TrustAnchor, ...]:
    """Roots the caller explicitly trusts in addition to the pinned ones."""
    out: list[TrustAnchor] = []
    for blob in policy.extra_trusted_roots:
        for cert in load_certificates(blob, "extra trusted root"):
            out.append(TrustAnchor(f"explicitly trusted root {common_name(cert)!r}", cert))
    return tuple(out)


def _p256_signature(raw: bytes) -> bytes:
    return encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))


def _pck_claims(leaf: x509.Certificate) -> dict[str, Any]:
    """FMSPC, PCE-ID and the PCK's TCB from Intel's SGX extension, when present."""
    claims: dict[str, Any] = {"pck_subject": common_name(leaf)}
    with parsing("PCK certificate SGX extension"):
        try:
            raw = leaf.extensions.get_extension_for_oid(_SGX_EXT_OID).value
        except x509.ExtensionNotFound:
            return claims
        value = raw.value if isinstance(raw, x509.UnrecognizedExtension) else b""
        if not value:
            return claims
        for item in _der.children(_der.read_single(value, "PCK SGX extension"), "PCK SGX extension"):
            parts = _der.children(item, "PCK SGX extension")
            if len(parts) != 2 or parts[0].tag != _der.OID:
                continue
            oid = _der.decode_oid(parts[0].content)
            if oid == "1.2.840.113741.1.13.1.4":
                claims["fmspc"] = parts[1].content.hex()
            elif oid == "1.2.840.113741.1.13.1.3":
                claims["pce_id"] = parts[1].content.hex()
            elif oid == "1.2.840.113741.1.13.1.2":
                for comp in _der.children(parts[1], "PCK TCB"):
                    pair = _der.children(comp, "PCK TCB")
                    if len(pair) == 2 and pair[0].tag == _der.OID:
                        sub = _der.decode_oid(pair[0].content)
                        if sub.endswith(".17"):
                            claims["pck_pce_svn"] = int.from_bytes(pair[1].content, "big")
                        elif sub.endswith(".18"):
                            claims["pck_cpu_svn"] = pair[1].content.hex()
    return claims


def verify_quote(quote: DcapQuote, policy: HardwarePolicy) -> tuple[list[Check], dict[str, Any]]:
    """Verify chain, QE report, QE binding and quote signature; return the checks and QE/PCK claims."""
    checks = [
        Check(
            "quote structure",
            True,
            f"DCAP quote v{quote.version}, ECDSA-256-with-P-256, {quote.length} bytes"
            + (f" (+{quote.trailing} unsigned trailing bytes ignored)" if quote.trailing else ""),
        )
    ]
    certs = load_certificates(quote.cert_chain_pem.rstrip(b"\x00"), _CHAIN_CHECK)
    chain, anchor = verify_chain(
        certs,
        anchors=intel_anchors() + extra_anchors(policy),
        kind="intel",
        check=_CHAIN_CHECK,
        as_of=policy.when(),
    )
    path = " -> ".join(common_name(c) for c in chain)
    checks.append(Check(_CHAIN_CHECK, True, f"{path}; root is {anchor.name} (SHA-256 {anchor.sha256[:16]}...)"))
    checks.append(
        Check(
            "certificate validity", True, f"all {len(chain)} certificates valid at {policy.when():%Y-%m-%d %H:%M} UTC"
        )
    )

    with parsing("QE report signature"):
        pck_key = chain[0].public_key()
    if not isinstance(pck_key, ec.EllipticCurvePublicKey) or pck_key.curve.name != "secp256r1":
        raise refuse(EvidenceSignatureError, "QE report signature", "the PCK certificate key is not ECDSA P-256")
    try:
        pck_key.verify(_p256_signature(quote.qe_report_signature), quote.qe_report, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise refuse(
            EvidenceSignatureError, "QE report signature", "the QE report is not signed by the PCK key"
        ) from None
    checks.append(Check("QE report signature", True, "ECDSA-P256 over the QE report, under the PCK leaf key"))

    qe = sgx_report_fields(quote.qe_report)
    expected = hashlib.sha256(quote.attest_key + quote.qe_auth_data).digest()
    if quote.qe_report[320:352] != expected:
        raise refuse(
            KeyBindingError,
            "QE report binding",
            "the QE report data is not SHA-256(attestation key || QE auth data): the attestation key is not the QE's",
        )
    checks.append(Check("QE report binding", True, "QE report_data[0:32] == SHA-256(attestation key || QE auth data)"))

    try:
        attest_key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + quote.attest_key)
    except ValueError:
        raise refuse(EvidenceSignatureError, "quote signature", "the attestation key is not a P-256 point") from None
    try:
        attest_key.verify(_p256_signature(quote.signature), quote.signed, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise refuse(
            EvidenceSignatureError,
            "quote signature",
            "the header and report body are not signed by the attestation key",
        ) from None
    signed_what = "header, body descriptor and body" if quote.version == 5 else "header and body"
    checks.append(Check("quote signature", True, f"ECDSA-P256 over the {signed_what} ({len(quote.signed)} bytes)"))

    claims: dict[str, Any] = {
        "qe_vendor_id": quote.qe_vendor_id.hex(),
        "qe_svn": quote.qe_svn,
        "pce_svn": quote.pce_svn,
        "qe_mrenclave": qe["mrenclave"],
        "qe_mrsigner": qe["mrsigner"],
        "qe_isv_prod_id": qe["isv_prod_id"],
        "qe_isv_svn": qe["isv_svn"],
        **_pck_claims(chain[0]),
        "root": anchor.name,
        "vendor_root": anchor.sha256 == INTEL_SGX_ROOT_CA_SHA256,  # False: a root trusted only by the policy
    }
    return checks, claims


def collateral_not_checked(claims: dict[str, Any]) -> list[Check]:
    """List what DCAP verification without Intel collateral cannot vouch for, said plainly."""
    fmspc = claims.get("fmspc", "?")
    return [
        Check(
            "TCB status",
            None,
            f"needs Intel TCB Info for FMSPC {fmspc} (collateral not supplied): the platform may be out of date",
        ),
        Check(
            "QE identity",
            None,
            f"needs Intel QE Identity collateral (not supplied); QE MRSIGNER {claims.get('qe_mrsigner', '?')[:16]}...",
        ),
        Check("certificate revocation", None, "the PCK CRL and Root CA CRL were not supplied"),
    ]
