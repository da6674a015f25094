"""TEST ONLY: a mimic configfs-tsm guest (or Gramine enclave) tree, and the "firmware" that signs with a test chain.

Nothing here is hardware. :class:`MimicFirmware` lays out ``sys/kernel/config/tsm/report`` and ``dev/sev-guest`` (or
``dev/tdx_guest``; or Gramine's ``dev/attestation``) in a temporary directory and answers, on ``mimic-firmware.sock``,
the requests the package's ``MimicTsm`` (``MimicGramine``) sends when the kernel writes ``inblob``
(``user_report_data``): a correctly structured SEV-SNP report v3 (ECDSA P-384 over
``[0:0x2A0]`` by a VCEK whose chain VCEK <- ASK <- ARK is RSA-PSS SHA-384, all generated here, with the VCEK's product,
hwID and TCB extensions) plus its certificate table for ``auxblob``; or a TDX DCAP v4 quote (ECDSA P-256 by an
attestation key that a QE report binds, the QE report signed by a PCK leaf chaining to a test root), or an SGX DCAP
v3 quote signed the same way. The package's
verifiers check them exactly as a vendor's; only a policy that lists the test root in
``HardwarePolicy.extra_trusted_roots`` accepts them.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import socketserver
import struct
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cbor2
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
_VCEK_GUID = uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd")
_ASK_GUID = uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782")
_ARK_GUID = uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae")
_SNP_TCB = bytes([3, 0, 0, 0, 0, 0, 8, 115])  # Milan: bl|tee|-|-|-|-|snp|ucode
_INTEL_QE_VENDOR = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mesatee tests (NOT a vendor)"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _builder(subject: str, issuer: str, public: Any, *, ca: bool) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )


def _der_int(value: int) -> bytes:
    body = value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big")
    return b"\x02" + bytes([len(body)]) + body


def _ext(oid: str, value: bytes) -> x509.UnrecognizedExtension:
    return x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), value)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


@dataclass
class SnpTestChain:
    """A test ARK -> ASK -> VCEK (Milan-shaped) and the chip id the VCEK names."""

    chip_id: bytes = field(default_factory=lambda: hashlib.sha512(b"mimic chip").digest())

    def __post_init__(self) -> None:
        self.ark_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ask_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.vcek_key = ec.generate_private_key(ec.SECP384R1())
        ark, ask = "ARK-Milan TEST (mesatee tests, NOT AMD)", "SEV-Milan TEST ASK"
        self.ark = _builder(ark, ark, self.ark_key.public_key(), ca=True).sign(
            self.ark_key, hashes.SHA384(), rsa_padding=_PSS
        )
        self.ask = _builder(ask, ark, self.ask_key.public_key(), ca=True).sign(
            self.ark_key, hashes.SHA384(), rsa_padding=_PSS
        )
        base = "1.3.6.1.4.1.3704.1"
        builder = (
            _builder("SEV-VCEK", ask, self.vcek_key.public_key(), ca=False)
            .add_extension(_ext(f"{base}.2", b"\x16\x08Milan-B0"), critical=False)
            .add_extension(_ext(f"{base}.3.1", _der_int(_SNP_TCB[0])), critical=False)
            .add_extension(_ext(f"{base}.3.2", _der_int(_SNP_TCB[1])), critical=False)
            .add_extension(_ext(f"{base}.3.3", _der_int(_SNP_TCB[6])), critical=False)
            .add_extension(_ext(f"{base}.3.8", _der_int(_SNP_TCB[7])), critical=False)
            .add_extension(_ext(f"{base}.4", b"\x04\x40" + self.chip_id), critical=False)
        )
        self.vcek = builder.sign(self.ask_key, hashes.SHA384(), rsa_padding=_PSS)

    @property
    def root_pem(self) -> bytes:
        return _pem(self.ark)

    def cert_table(self) -> bytes:
        """The extended-report certificate table configfs-tsm returns in ``auxblob``."""
        certs = [(_VCEK_GUID, _der(self.vcek)), (_ASK_GUID, _der(self.ask)), (_ARK_GUID, _der(self.ark))]
        offset = 24 * (len(certs) + 1)
        head, body = b"", b""
        for guid, der in certs:
            head += guid.bytes_le + struct.pack("<II", offset + len(body), len(der))
            body += der
        return head + b"\x00" * 24 + body

    def report(self, report_data: bytes, *, measurement: bytes = b"\x11" * 48, tamper: bool = False) -> bytes:
        """An SEV-SNP attestation report v3 over ``report_data`` (64 bytes), signed by the VCEK."""
        raw = bytearray(0x4A0)
        struct.pack_into("<IIQ", raw, 0, 3, 1, 0x30000)  # version 3, guest SVN 1, policy: SMT + reserved bit 17
        struct.pack_into("<II", raw, 0x30, 0, 1)  # VMPL 0, signature algorithm 1 (ECDSA P-384 / SHA-384)
        struct.pack_into("<QQ", raw, 0x38, int.from_bytes(_SNP_TCB, "little"), 0)
        struct.pack_into("<I", raw, 0x48, 0)  # signer info: VCEK, chip id not masked
        raw[0x50:0x90] = report_data.ljust(64, b"\x00")
        raw[0x90:0xC0] = measurement
        raw[0xC0:0xE0] = b"\x22" * 32  # host data
        struct.pack_into("<Q", raw, 0x180, int.from_bytes(_SNP_TCB, "little"))  # reported TCB
        raw[0x188:0x18B] = bytes([0x19, 0x01, 0x01])  # CPUID family 0x19 model 0x01: Milan
        raw[0x1A0:0x1E0] = self.chip_id
        struct.pack_into("<Q", raw, 0x1E0, int.from_bytes(_SNP_TCB, "little"))
        struct.pack_into("<Q", raw, 0x1F0, int.from_bytes(_SNP_TCB, "little"))
        r, s = decode_dss_signature(self.vcek_key.sign(bytes(raw[:0x2A0]), ec.ECDSA(hashes.SHA384())))
        raw[0x2A0 : 0x2A0 + 72] = r.to_bytes(72, "little")
        raw[0x2E8 : 0x2E8 + 72] = s.to_bytes(72, "little")
        if tamper:
            raw[0x90] ^= 0x01  # one bit of the signed measurement
        return bytes(raw)


def _p256_sig(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


@dataclass
class TdxTestChain:
    """A test root CA -> platform CA -> PCK leaf (ECDSA P-256, Intel-shaped) and a quoting attestation key."""

    def __post_init__(self) -> None:
        self.root_key = ec.generate_private_key(ec.SECP256R1())
        self.pca_key = ec.generate_private_key(ec.SECP256R1())
        self.pck_key = ec.generate_private_key(ec.SECP256R1())
        self.attest_key = ec.generate_private_key(ec.SECP256R1())
        root, pca = "SGX Root CA TEST (mesatee tests, NOT Intel)", "SGX PCK Platform CA TEST"
        self.root = _builder(root, root, self.root_key.public_key(), ca=True).sign(self.root_key, hashes.SHA256())
        self.pca = _builder(pca, root, self.pca_key.public_key(), ca=True).sign(self.root_key, hashes.SHA256())
        self.pck = _builder("SGX PCK Certificate TEST", pca, self.pck_key.public_key(), ca=False).sign(
            self.pca_key, hashes.SHA256()
        )

    @property
    def root_pem(self) -> bytes:
        return _pem(self.root)

    def _signature_data(self, signed: bytes, *, wrapped: bool) -> bytes:
        """Quote signature, attestation key, QE report (binding that key) signed by the PCK, PCK chain (type 5).

        ``wrapped``: v4 puts the QE part inside certification data type 6; v3 has it inline.
        """
        point = self.attest_key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )[1:]
        auth = b"\x5a" * 32
        qe_report = bytearray(384)
        qe_report[64:96] = b"\x66" * 32  # QE MRENCLAVE
        qe_report[128:160] = b"\x77" * 32  # QE MRSIGNER
        qe_report[320:352] = hashlib.sha256(point + auth).digest()
        chain = _pem(self.pck) + _pem(self.pca) + _pem(self.root)
        inner = (
            bytes(qe_report)
            + _p256_sig(self.pck_key, bytes(qe_report))
            + struct.pack("<H", len(auth))
            + auth
            + struct.pack("<HI", 5, len(chain))
            + chain
        )
        head = _p256_sig(self.attest_key, signed) + point
        return head + (struct.pack("<HI", 6, len(inner)) + inner if wrapped else inner)

    def sgx_quote(self, report_data: bytes, *, mrenclave: bytes = b"\x88" * 32, tamper: bool = False) -> bytes:
        """An SGX DCAP quote v3 (what Gramine's /dev/attestation/quote returns) over ``report_data``."""
        header = struct.pack("<HHIHH", 3, 2, 0, 7, 13) + _INTEL_QE_VENDOR + b"\x00" * 20
        body = bytearray(384)
        struct.pack_into("<QQ", body, 48, 0x5, 0x3)  # attributes: INIT | MODE64BIT, not DEBUG; XFRM
        body[64:96] = mrenclave
        body[128:160] = b"\x89" * 32  # MRSIGNER
        struct.pack_into("<HH", body, 256, 1, 2)  # ISVPRODID, ISVSVN
        body[320:384] = report_data.ljust(64, b"\x00")
        signed = header + bytes(body)
        sig_data = self._signature_data(signed, wrapped=False)
        quote = bytearray(signed + struct.pack("<I", len(sig_data)) + sig_data)
        if tamper:
            quote[48 + 64] ^= 0x01  # one bit of the signed MRENCLAVE
        return bytes(quote)

    def quote(self, report_data: bytes, *, mrtd: bytes = b"\x33" * 48, tamper: bool = False) -> bytes:
        """A TDX DCAP quote v4 (TDX 1.0 body) over ``report_data``, with QE report and PCK chain (type 6 / 5)."""
        header = struct.pack("<HHIHH", 4, 2, 0x81, 7, 13) + _INTEL_QE_VENDOR + b"\x00" * 20
        body = bytearray(584)
        body[0:16] = b"\x03" * 16  # TEE TCB SVN
        body[16:64] = b"\x44" * 48  # MRSEAM
        struct.pack_into("<Q", body, 120, 1 << 28)  # TD attributes: SEPT_VE_DISABLE, not DEBUG
        struct.pack_into("<Q", body, 128, 0xE7)  # XFAM
        body[136:184] = mrtd
        for i in range(4):
            body[328 + 48 * i : 376 + 48 * i] = bytes([0x50 + i]) * 48  # RTMR0..3
        body[520:584] = report_data.ljust(64, b"\x00")
        signed = header + bytes(body)
        sig_data = self._signature_data(signed, wrapped=True)
        quote = bytearray(signed + struct.pack("<I", len(sig_data)) + sig_data)
        if tamper:
            quote[48 + 136] ^= 0x01  # one bit of the signed MRTD
        return bytes(quote)


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        firmware: MimicFirmware = self.server.firmware  # type: ignore[attr-defined]
        request = cbor2.loads(self.rfile.read())
        self.wfile.write(cbor2.dumps(firmware.answer(request)))


class MimicFirmware:
    """A mimic SEV-SNP or TDX guest (or Gramine SGX enclave) tree in ``root``, answering on its socket in a thread.

    ``mode`` changes what the next reports are: ``ok``; ``tamper`` (a signed bit flipped after signing);
    ``replay`` (the first report made, whatever inblob asks); ``other-guest`` (another launch measurement).
    """

    def __init__(self, root: Path, tee: str) -> None:
        self.root, self.tee = root, tee
        self.mode = "ok"
        self.inblobs: list[bytes] = []
        self._first: dict[str, bytes] | None = None
        self.snp = SnpTestChain() if tee == "sev-snp" else None
        self.tdx = TdxTestChain() if tee in ("tdx", "sgx") else None
        if tee == "sgx":
            gramine = root / "dev/attestation"
            gramine.mkdir(parents=True)
            (gramine / "attestation_type").write_text("dcap\n")
            (gramine / "quote").write_bytes(b"")
        else:
            (root / "sys/kernel/config/tsm/report").mkdir(parents=True)
            (root / "dev").mkdir()
            (root / "dev" / ("sev-guest" if tee == "sev-snp" else "tdx_guest")).touch()
        self.server = socketserver.ThreadingUnixStreamServer(str(root / "mimic-firmware.sock"), _Handler)
        self.server.firmware = self  # type: ignore[attr-defined]
        self.thread = threading.Thread(target=self.server.serve_forever, name="mimic-firmware", daemon=True)
        self.thread.start()

    @property
    def root_pem(self) -> bytes:
        """The test root a policy must trust explicitly (``HardwarePolicy.extra_trusted_roots``)."""
        chain = self.snp or self.tdx
        assert chain is not None
        return chain.root_pem

    def answer(self, request: dict[str, Any]) -> dict[str, bytes]:
        """What configfs-tsm would put in outblob/auxblob for this inblob."""
        inblob = bytes(request["inblob"])
        self.inblobs.append(inblob)
        if self.mode == "replay" and self._first is not None:
            return self._first
        tamper = self.mode == "tamper"
        other = self.mode == "other-guest"
        if self.snp is not None:
            out = {
                "outblob": self.snp.report(inblob, measurement=b"\x99" * 48 if other else b"\x11" * 48, tamper=tamper),
                "auxblob": self.snp.cert_table(),
            }
        elif self.tee == "sgx":
            assert self.tdx is not None
            mrenclave = b"\x97" * 32 if other else b"\x88" * 32
            out = {"outblob": self.tdx.sgx_quote(inblob, mrenclave=mrenclave, tamper=tamper)}
        else:
            assert self.tdx is not None
            out = {"outblob": self.tdx.quote(inblob, mrtd=b"\x98" * 48 if other else b"\x33" * 48, tamper=tamper)}
        if self._first is None:
            self._first = out
        return out

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
