r"""TPM 2.0 evidence: a quote by an attestation key, carried in the RA-TLS certificate (pure).

The kernel (``enclave/tpm.py``, through tpm2-pytss) resets the application PCR, extends the
code measurement into it, and quotes the boot PCRs plus the application PCR with its AK, a
restricted ECDSA P-256 signing key under the endorsement hierarchy. The evidence is CBOR
``tag(TPM_TAG, [statement, attest, signature, ak_public])``:

* ``statement``: canonical JSON with ``format``, ``level``, ``tpm_kind``, ``tpm_vendor``,
  ``measurement``, ``manifest``, ``time``, ``report_data``, ``receipt_key``, ``app_pcr`` and
  ``pcrs`` (SHA-256 bank, index → hex value);
* ``attest``: the ``TPMS_ATTEST`` the TPM signed, with ``extraData`` (qualifying data)
  ``= SHA-256(EVIDENCE_CONTEXT || statement)``, so the quote commits to the report data that
  binds the TLS and receipt keys, and to everything else in the statement;
* ``signature``: the ``TPMT_SIGNATURE`` (ECDSA, SHA-256) over ``attest``;
* ``ak_public``: the AK's ``TPMT_PUBLIC``. Its fingerprint is SHA-256 of those bytes (the
  digest part of the TPM object name), and the client's policy may pin it;
* ``ek_cert``: the EK certificate from the TPM's NV (empty if it has none); the statement
  carries its SHA-256. A client that pins the EK's CA checks the chain, then proves on the
  live connection that the AK sits in that TPM: ``TPM2_MakeCredential`` here
  (:func:`make_credential`), ``TPM2_ActivateCredential`` in the kernel.

Each connection also gets a *fresh* quote, over the same PCRs, whose qualifying data is
``SHA-256(FRESH_CONTEXT || report_data || client nonce)`` (see :func:`verify_fresh_quote`).

This module only parses the few TPM structures a verifier reads (``TPMS_ATTEST``,
``TPMT_SIGNATURE``, ``TPMT_PUBLIC``), and checks them with ``cryptography``. It never builds
a TPM command. The statement's ``tpm_kind`` is what the TPM says of itself (swtpm answers
"IBM / SW TPM"); the client's verdict (:func:`tpm_kind_of`) is ``software`` for swtpm or an
EK issued by swtpm's local CA, ``hardware`` only when the EK chains to a CA the client pins,
and ``uncertified`` otherwise.

Why this module is over ~500 lines: the TPM evidence verifier: every check a client makes on a quote, in the order
it makes them, so that the order can be audited top to bottom in one file.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import struct
from dataclasses import dataclass
from typing import Any

import cbor2
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.concatkdf import ConcatKDFHash

try:  # CFB lives in "decrepit" since cryptography 47; TPM2_MakeCredential still uses it
    from cryptography.hazmat.decrepit.ciphers.modes import CFB
except ImportError:  # pragma: no cover - older cryptography
    from cryptography.hazmat.primitives.ciphers.modes import CFB

from mesatee_notebook.attestation.measurement import canonical_json, measurement_of
from mesatee_notebook.attestation.statement import parse_statement
from mesatee_notebook.errors import (
    AppPcrMismatch,
    BootPcrMismatch,
    EkChainError,
    EventLogMismatch,
    MalformedEvidence,
    PcrDigestMismatch,
    QualifyingDataMismatch,
    QuoteSignatureError,
    ReplayedQuote,
)

__all__ = [
    "EVIDENCE_CONTEXT",
    "KERNEL_EVENT",
    "FRESH_CONTEXT",
    "TPM_EVIDENCE_FORMAT",
    "TPM_TAG",
    "AkPublic",
    "Quote",
    "TpmEvidence",
    "ak_fingerprint",
    "app_pcr_value",
    "fresh_qualifying_data",
    "make_credential",
    "make_tpm_evidence",
    "parse_tpm_evidence",
    "pcr_digest",
    "statement_qualifying_data",
    "tpm_kind_of",
    "verify_ek_chain",
    "verify_fresh_quote",
]

TPM_TAG = 0x4D54504D  # "MTPM": project-private CBOR content type for TPM evidence
TPM_EVIDENCE_FORMAT = "mesatee-tpm/1"
EVIDENCE_CONTEXT = b"mesatee-tpm-evidence/1\x00"
FRESH_CONTEXT = b"mesatee-tpm-fresh/1\x00"
KERNEL_EVENT = "mesatee-kernel-measurement"  # the one event type of the kernel's measured-launch log
_IDENTITY = b"IDENTITY\x00"  # the label TPM2_MakeCredential's seed is bound to

_TPM_GENERATED = 0xFF544347
_ST_ATTEST_QUOTE = 0x8018
_ALG_SHA256 = 0x000B
_ALG_ECC = 0x0023
_ALG_ECDSA = 0x0018
_ALG_NULL = 0x0010
_ECC_NIST_P256 = 0x0003
_RH_ENDORSEMENT = 0x4000000B
# TPMA_OBJECT bits an AK must have: fixedTPM, fixedParent, sensitiveDataOrigin, restricted, sign.
_AK_ATTRS = (1 << 1) | (1 << 4) | (1 << 5) | (1 << 16) | (1 << 18)
_DECRYPT = 1 << 17


class _Reader:
    """Big-endian reader over a TPM structure; any overrun is MalformedEvidence."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data, self.pos, self.what = data, 0, what

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            msg = f"the {self.what} is truncated"
            raise MalformedEvidence(msg)
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return int(self.take(1)[0])

    def u16(self) -> int:
        return int(struct.unpack(">H", self.take(2))[0])

    def u32(self) -> int:
        return int(struct.unpack(">I", self.take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack(">Q", self.take(8))[0])

    def sized(self) -> bytes:
        return self.take(self.u16())

    def end(self) -> None:
        if self.pos != len(self.data):
            msg = f"the {self.what} has {len(self.data) - self.pos} unexpected trailing bytes"
            raise MalformedEvidence(msg)


@dataclass(frozen=True, slots=True)
class Quote:
    """A parsed ``TPMS_ATTEST`` of type quote."""

    signer_name: bytes
    extra_data: bytes
    clock: int
    reset_count: int
    restart_count: int
    firmware: int
    pcr_select: tuple[tuple[int, tuple[int, ...]], ...]  # (hash alg, PCR indices) per bank
    pcr_digest: bytes

    @classmethod
    def parse(cls, attest: bytes) -> Quote:
        r = _Reader(attest, "TPM quote (TPMS_ATTEST)")
        if r.u32() != _TPM_GENERATED:
            msg = "the TPM quote lacks the TPM_GENERATED magic: it was not produced by a TPM"
            raise MalformedEvidence(msg)
        if r.u16() != _ST_ATTEST_QUOTE:
            msg = "the TPM attestation is not a quote"
            raise MalformedEvidence(msg)
        signer, extra = r.sized(), r.sized()
        clock, resets, restarts = r.u64(), r.u32(), r.u32()
        r.u8()  # clockInfo.safe
        firmware = r.u64()
        banks = []
        for _ in range(r.u32()):
            alg = r.u16()
            bitmap = r.take(r.u8())
            banks.append((alg, tuple(i for i in range(8 * len(bitmap)) if bitmap[i // 8] >> (i % 8) & 1)))
        digest = r.sized()
        r.end()
        return cls(signer, extra, clock, resets, restarts, firmware, tuple(banks), digest)

    @property
    def sha256_pcrs(self) -> tuple[int, ...]:
        """The PCR indices quoted from the SHA-256 bank (the only bank this format uses)."""
        if len(self.pcr_select) != 1 or self.pcr_select[0][0] != _ALG_SHA256:
            msg = "the TPM quote must select exactly one PCR bank, SHA-256"
            raise MalformedEvidence(msg)
        return self.pcr_select[0][1]


@dataclass(frozen=True, slots=True)
class AkPublic:
    """A parsed ``TPMT_PUBLIC`` of an ECC P-256 attestation key."""

    raw: bytes
    attributes: int
    key: ec.EllipticCurvePublicKey

    @classmethod
    def parse(cls, raw: bytes) -> AkPublic:
        r = _Reader(raw, "attestation key (TPMT_PUBLIC)")
        if r.u16() != _ALG_ECC:
            msg = "the attestation key is not an ECC key (this verifier reads ECC P-256 AKs)"
            raise MalformedEvidence(msg)
        if r.u16() != _ALG_SHA256:
            msg = "the attestation key's name algorithm is not SHA-256"
            raise MalformedEvidence(msg)
        attributes = r.u32()
        r.sized()  # authPolicy
        if r.u16() != _ALG_NULL:  # symmetric: a signing key has none
            msg = "the attestation key has a symmetric algorithm: it is a storage key, not a signing key"
            raise MalformedEvidence(msg)
        scheme = r.u16()
        if scheme != _ALG_NULL:
            r.u16()
        curve, kdf = r.u16(), r.u16()
        if kdf != _ALG_NULL:
            r.u16()
        x, y = r.sized(), r.sized()
        r.end()
        if scheme not in (_ALG_ECDSA, _ALG_NULL) or curve != _ECC_NIST_P256:
            msg = "the attestation key is not an ECDSA NIST P-256 key"
            raise MalformedEvidence(msg)
        if attributes & _AK_ATTRS != _AK_ATTRS or attributes & _DECRYPT:
            msg = (
                "the attestation key is not a restricted, TPM-bound signing key (TPMA_OBJECT "
                f"{attributes:#010x}): a TPM does not vouch for what such a key signs"
            )
            raise MalformedEvidence(msg)
        try:
            key = ec.EllipticCurvePublicNumbers(
                int.from_bytes(x, "big"), int.from_bytes(y, "big"), ec.SECP256R1()
            ).public_key()
        except ValueError as exc:
            msg = "the attestation key's point is not on P-256"
            raise MalformedEvidence(msg) from exc
        return cls(raw, attributes, key)

    @property
    def name(self) -> bytes:
        """The TPM object name: nameAlg (SHA-256) || SHA-256(TPMT_PUBLIC)."""
        return struct.pack(">H", _ALG_SHA256) + hashlib.sha256(self.raw).digest()

    @property
    def qualified_name(self) -> bytes:
        """The name a quote carries: a primary key's in the endorsement hierarchy (TPM_RH_ENDORSEMENT)."""
        return struct.pack(">H", _ALG_SHA256) + hashlib.sha256(struct.pack(">I", _RH_ENDORSEMENT) + self.name).digest()

    def verify(self, attest: bytes, signature: bytes) -> None:
        """Check a ``TPMT_SIGNATURE`` (ECDSA, SHA-256) over ``attest``."""
        r = _Reader(signature, "quote signature (TPMT_SIGNATURE)")
        alg, hash_alg = r.u16(), r.u16()
        if alg != _ALG_ECDSA or hash_alg != _ALG_SHA256:
            msg = "the quote signature is not ECDSA with SHA-256"
            raise MalformedEvidence(msg)
        sig_r, sig_s = r.sized(), r.sized()
        r.end()
        try:
            der = encode_dss_signature(int.from_bytes(sig_r, "big"), int.from_bytes(sig_s, "big"))
            self.key.verify(der, attest, ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError) as exc:
            msg = "the attestation key's signature over the TPM quote does not verify: the quote was altered"
            raise QuoteSignatureError(msg) from exc


def ak_fingerprint(ak_public: bytes) -> str:
    """What a client pins for a TPM: SHA-256 hex of the AK's ``TPMT_PUBLIC``."""
    return hashlib.sha256(ak_public).hexdigest()


def app_pcr_value(measurement: str) -> str:
    """The application PCR after reset (zeros) and one extend with the measurement."""
    return hashlib.sha256(bytes(32) + bytes.fromhex(measurement)).hexdigest()


def pcr_digest(values: list[bytes]) -> bytes:
    """The quote's PCR digest: SHA-256 over the selected values in index order."""
    return hashlib.sha256(b"".join(values)).digest()


def statement_qualifying_data(statement_bytes: bytes) -> bytes:
    """Qualifying data of the certificate's quote."""
    return hashlib.sha256(EVIDENCE_CONTEXT + statement_bytes).digest()


def fresh_qualifying_data(report_data: str, nonce: bytes) -> bytes:
    """Qualifying data of a connection's fresh quote: commits to the key binding and the client's nonce."""
    return hashlib.sha256(FRESH_CONTEXT + bytes.fromhex(report_data) + nonce).digest()


@dataclass(frozen=True, slots=True)
class TpmEvidence:
    """Parsed (not yet trusted) TPM evidence."""

    statement: dict[str, Any]
    statement_bytes: bytes
    attest: bytes
    signature: bytes
    ak_public: bytes
    raw: bytes
    ek_cert: bytes = b""

    @property
    def receipt_key(self) -> bytes:
        """Raw Ed25519 public key that signs receipts."""
        return bytes.fromhex(str(self.statement["receipt_key"]))

    @property
    def pcrs(self) -> dict[int, str]:
        """Reported SHA-256 PCR values, by index."""
        return {int(k): str(v) for k, v in self.statement["pcrs"].items()}

    @property
    def tpm_kind(self) -> str:
        """``software`` or ``hardware``, as the TPM reports itself (not certified)."""
        return str(self.statement["tpm_kind"])

    def ak(self) -> AkPublic:
        """The parsed attestation key."""
        return AkPublic.parse(self.ak_public)

    def check_ek_binding(self) -> None:
        """The EK certificate that travels with the evidence must be the one the quoted statement names."""
        if hashlib.sha256(self.ek_cert).hexdigest() != self.statement.get("ek_cert_sha256", ""):
            msg = "the EK certificate in the evidence is not the one the quoted statement names: it was swapped"
            raise QualifyingDataMismatch(msg)

    def ek_key(self) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey:
        """The EK's public key, from its certificate: RSA 2048 (TCG L-1) or ECC NIST P-256 (TCG L-2)."""
        try:
            key = x509.load_der_x509_certificate(self.ek_cert).public_key()
        except ValueError as exc:
            msg = f"the TPM's EK certificate cannot be parsed: {exc}"
            raise MalformedEvidence(msg) from exc
        if isinstance(key, rsa.RSAPublicKey) and key.key_size == 2048:
            return key
        if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
            return key
        msg = (
            "the EK certificate's key is neither RSA 2048 nor ECC P-256 (this client activates credentials with the "
            "TCG low-range EKs, L-1 and L-2)"
        )
        raise MalformedEvidence(msg)

    def check_manifest(self) -> None:
        """The measurement must be the digest of the manifest that travels with it."""
        if measurement_of(self.statement["manifest"]) != self.statement["measurement"]:
            msg = "the evidence's measurement is not the digest of its manifest"
            raise MalformedEvidence(msg)

    def verify_quote(self) -> Quote:
        """AK signature, signer name, qualifying data and PCR digest of the certificate's quote."""
        ak = self.ak()
        ak.verify(self.attest, self.signature)
        quote = Quote.parse(self.attest)
        if quote.signer_name != ak.qualified_name:
            msg = (
                "the TPM quote names a different signing key than the evidence's attestation key "
                "(or one that is not a primary key of the endorsement hierarchy)"
            )
            raise QuoteSignatureError(msg)
        if quote.extra_data != statement_qualifying_data(self.statement_bytes):
            msg = (
                "the TPM quote's qualifying data does not commit to this evidence's statement "
                "(its report data, keys or measurement were changed after quoting)"
            )
            raise QualifyingDataMismatch(msg)
        self.check_pcr_digest(quote)
        return quote

    def check_pcr_digest(self, quote: Quote) -> None:
        """The reported PCR values must be the ones the TPM digested into ``quote``."""
        selected = quote.sha256_pcrs
        pcrs = self.pcrs
        if sorted(pcrs) != list(selected):
            msg = f"the evidence reports PCRs {sorted(pcrs)} but the TPM quoted PCRs {list(selected)}"
            raise PcrDigestMismatch(msg)
        try:
            values = [bytes.fromhex(pcrs[i]) for i in selected]
        except ValueError as exc:
            raise MalformedEvidence("a reported PCR value is not hex") from exc  # noqa: EM101
        if pcr_digest(values) != quote.pcr_digest:
            msg = "the reported PCR values are not the ones the TPM quoted (PCR digest differs): they were altered"
            raise PcrDigestMismatch(msg)

    def replay_event_log(self) -> int:
        """Replay the kernel's measured-launch log from a reset PCR; it must give the quoted application PCR.

        The log (quoted with the statement) lists every extend of the application PCR since its reset: one
        ``KERNEL_EVENT`` whose digest is the statement's measurement. A PCR extended by anything else, after or
        before, does not replay (:class:`EventLogMismatch`). Returns the number of events replayed. There is no
        firmware log for the boot PCRs here: they are checked against the policy's golden values only.
        """
        app = int(self.statement["app_pcr"])
        events = self.statement.get("event_log")
        if not isinstance(events, list) or not all(_is_event(e) for e in events):
            msg = "the TPM evidence's event log is missing or malformed (a list of {pcr, type, digest} events)"
            raise MalformedEvidence(msg)
        if any(int(e["pcr"]) != app for e in events):
            msg = f"the kernel's event log names PCRs other than its application PCR {app}"
            raise EventLogMismatch(msg, pcr=app)
        value = bytes(32)
        for event in events:
            value = hashlib.sha256(value + bytes.fromhex(event["digest"])).digest()
        quoted = self.pcrs.get(app)
        if value.hex() != quoted:
            msg = (
                f"replaying the kernel's event log ({len(events)} event(s)) gives application PCR {app} = "
                f"{value.hex()[:16]}…, but the TPM quoted {str(quoted)[:16]}…: something extended the PCR that the "
                "log does not show (or the log was edited before quoting)"
            )
            raise EventLogMismatch(msg, pcr=app)
        kinds = [(e["type"], e["digest"]) for e in events]
        if kinds != [(KERNEL_EVENT, self.statement["measurement"])]:
            msg = (
                f"the kernel's event log is {[k for k, _ in kinds]}, not the one {KERNEL_EVENT} event of the "
                "statement's measurement a launch of this kernel writes"
            )
            raise EventLogMismatch(msg, pcr=app)
        return len(events)

    def check_pcrs(self, measurement: str, golden: dict[int, str]) -> None:
        """The application PCR must hold ``measurement``; boot PCRs must equal the policy's values."""
        pcrs = self.pcrs
        app = int(self.statement["app_pcr"])
        expected = app_pcr_value(measurement)
        if pcrs.get(app) != expected:
            msg = (
                f"application PCR {app} is {str(pcrs.get(app))[:16]}…, but a kernel with measurement "
                f"{measurement[:16]}… launched from a reset PCR gives {expected[:16]}…: another program "
                "was measured into it, or it was extended again after launch"
            )
            raise AppPcrMismatch(msg, pcr=app)
        for index, value in sorted(golden.items()):
            if index == app:
                continue
            if index not in pcrs:
                msg = f"the policy names boot PCR {index}, but the kernel's quote does not cover it"
                raise BootPcrMismatch(msg, pcr=index)
            if pcrs[index] != value:
                msg = (
                    f"boot PCR {index} is {pcrs[index][:16]}…, not the policy's {value[:16]}…: this machine "
                    "booted different firmware, boot loader or kernel"
                )
                raise BootPcrMismatch(msg, pcr=index)


def _is_event(event: Any) -> bool:
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        return False
    digest, pcr = event.get("digest"), event.get("pcr")
    return isinstance(pcr, int) and isinstance(digest, str) and len(digest) == 64 and _is_hex(digest)


def _is_hex(text: str) -> bool:
    try:
        bytes.fromhex(text)
    except ValueError:
        return False
    return True


def make_tpm_evidence(
    *,
    statement: dict[str, Any],
    quoter: Any,
    ak_public: bytes,
    ek_cert: bytes = b"",
) -> bytes:
    """Build the CBOR evidence; ``quoter(qualifying_data) -> (attest, signature)`` asks the TPM."""
    body = canonical_json({**statement, "ek_cert_sha256": hashlib.sha256(ek_cert).hexdigest()})
    attest, signature = quoter(statement_qualifying_data(body))
    return bytes(cbor2.dumps(cbor2.CBORTag(TPM_TAG, [body, attest, signature, ak_public, ek_cert])))


_REQUIRED: dict[str, type] = {
    "format": str,
    "level": str,
    "tpm_kind": str,
    "tpm_vendor": str,
    "measurement": str,
    "manifest": dict,
    "time": int,
    "report_data": str,
    "receipt_key": str,
    "app_pcr": int,
    "pcrs": dict,
    "ek_cert_sha256": str,
}


def parse_tpm_evidence(raw: bytes, value: Any) -> TpmEvidence:
    """Parse the value of a ``TPM_TAG`` CBOR tag; raise MalformedEvidence on anything unexpected."""
    if not (isinstance(value, (list, tuple)) and len(value) == 5 and all(isinstance(v, bytes) for v in value)):
        msg = "TPM evidence must be [statement, attest, signature, ak_public, ek_cert] byte strings"
        raise MalformedEvidence(msg)
    body, attest, signature, ak_public, ek_cert = value
    statement = parse_statement(body, _REQUIRED, TPM_EVIDENCE_FORMAT, "TPM evidence")
    if statement["level"] != "tpm" or statement["tpm_kind"] not in ("software", "hardware"):
        msg = "TPM evidence must claim level 'tpm' and a tpm_kind of 'software' or 'hardware'"
        raise MalformedEvidence(msg)
    try:
        bytes.fromhex(statement["receipt_key"])
        bytes.fromhex(statement["report_data"])
        {int(k): bytes.fromhex(str(v)) for k, v in statement["pcrs"].items()}
    except (ValueError, TypeError) as exc:
        msg = f"TPM evidence statement has a bad field: {exc}"
        raise MalformedEvidence(msg) from exc
    return TpmEvidence(statement, body, attest, signature, ak_public, raw, ek_cert)


def _kdfa(key: bytes, label: bytes, context_u: bytes, context_v: bytes, bits: int) -> bytes:
    """TPM 2.0 KDFa (SP 800-108 counter mode with HMAC-SHA-256), as ``TPM2_MakeCredential`` uses it."""
    out = b""
    counter = 0
    while len(out) * 8 < bits:
        counter += 1
        h = hmac.HMAC(key, hashes.SHA256())
        h.update(struct.pack(">I", counter) + label + b"\x00" + context_u + context_v + struct.pack(">I", bits))
        out += h.finalize()
    return out[: bits // 8]


def _ecc_seed(ek_key: ec.EllipticCurvePublicKey) -> tuple[bytes, bytes]:
    r"""The seed and its ``TPMS_ECC_POINT`` for an ECC EK: one-pass ECDH with an ephemeral P-256 key, then KDFe.

    KDFe (TPM 2.0 part 1, 11.4.10.3) is NIST SP 800-56A's concatenation KDF with SHA-256 over
    ``Z || "IDENTITY\0" || x(ephemeral) || x(EK)``.
    """
    ephemeral = ec.generate_private_key(ec.SECP256R1())
    z = ephemeral.exchange(ec.ECDH(), ek_key)
    ex = ephemeral.public_key().public_numbers().x.to_bytes(32, "big")
    ey = ephemeral.public_key().public_numbers().y.to_bytes(32, "big")
    vx = ek_key.public_numbers().x.to_bytes(32, "big")
    seed = ConcatKDFHash(hashes.SHA256(), 32, otherinfo=_IDENTITY + ex + vx).derive(z)
    return seed, struct.pack(">H", 32) + ex + struct.pack(">H", 32) + ey


def make_credential(
    ek_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey, credential: bytes, ak_name: bytes
) -> tuple[bytes, bytes]:
    """``TPM2_MakeCredential`` in software, for a TCG low-range EK (SHA-256, AES-128-CFB): RSA 2048 or ECC P-256.

    Returns (credential blob, encrypted secret): the contents of the ``TPM2B_ID_OBJECT`` and the
    ``TPM2B_ENCRYPTED_SECRET``. Only the TPM holding the EK's private key *and* a loaded object
    named ``ak_name`` gets ``credential`` back from ``TPM2_ActivateCredential``. The seed is
    RSA-OAEP encrypted to an RSA EK, or agreed by ECDH with an ECC EK (the secret is then the
    ephemeral public point).
    """
    if isinstance(ek_key, ec.EllipticCurvePublicKey):
        seed, secret = _ecc_seed(ek_key)
    else:
        seed = os.urandom(32)
        secret = ek_key.encrypt(
            seed, padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=_IDENTITY)
        )
    sym_key = _kdfa(seed, b"STORAGE", ak_name, b"", 128)
    encryptor = Cipher(algorithms.AES(sym_key), CFB(bytes(16))).encryptor()
    enc_identity = encryptor.update(struct.pack(">H", len(credential)) + credential) + encryptor.finalize()
    hmac_key = _kdfa(seed, b"INTEGRITY", b"", b"", 256)
    mac = hmac.HMAC(hmac_key, hashes.SHA256())
    mac.update(enc_identity + ak_name)
    outer = mac.finalize()
    return struct.pack(">H", len(outer)) + outer + enc_identity, secret


def verify_ek_chain(ek_cert_der: bytes, anchors: tuple[bytes, ...], now: dt.datetime) -> list[x509.Certificate]:
    """The EK certificate and the pinned certificates it chains to, leaf first.

    ``anchors`` are DER CA certificates the client pins (a manufacturer's root and, when the
    TPM does not carry them, its intermediates; for swtpm the local CA's). Every link is
    checked with ``verify_directly_issued_by``, every issuer must be a CA, and every
    certificate must be valid ``now``.
    """
    try:
        leaf = x509.load_der_x509_certificate(ek_cert_der)
        pool = [x509.load_der_x509_certificate(a) for a in anchors]
    except ValueError as exc:
        msg = f"the TPM's EK certificate (or a pinned EK CA) cannot be parsed: {exc}"
        raise MalformedEvidence(msg) from exc
    chain = [leaf]
    while len(chain) <= len(pool) + 1:
        child = chain[-1]
        if not child.not_valid_before_utc <= now <= child.not_valid_after_utc:
            msg = f"the EK certificate chain has a certificate outside its validity ({child.subject.rfc4514_string()})"
            raise EkChainError(msg)
        if len(chain) > 1 and child in pool and child.issuer == child.subject:
            return chain
        candidates = [c for c in pool if c.subject == child.issuer and c != child]
        what = child.subject.rfc4514_string() or "the EK"
        if not candidates:
            if len(chain) > 1:
                return chain  # ended on a pinned intermediate
            msg = (
                f"the TPM's EK certificate is issued by {child.issuer.rfc4514_string() or '(empty)'}, which is not a "
                "CA this policy pins (tpm_ek_roots): this TPM is not one the pinned manufacturer certified"
            )
            raise EkChainError(msg)
        parent = next((c for c in candidates if _issued_by(child, c)), None)
        if parent is None:
            msg = (
                f"{what} names issuer {child.issuer.rfc4514_string()}, but no pinned CA of that name signed it: "
                "it comes from another CA (this is not a CA this policy pins)"
            )
            raise EkChainError(msg)
        try:
            is_ca = parent.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            msg = f"{parent.subject.rfc4514_string()} signs the EK chain but is not a CA"
            raise EkChainError(msg)
        chain.append(parent)
    msg = "the EK certificate chain loops"
    raise EkChainError(msg)


def _issued_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(parent)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def tpm_kind_of(claimed: str, chain: list[x509.Certificate] | None) -> str:
    """The client's verdict: ``software`` (swtpm), ``hardware`` (EK chains to a pinned CA) or ``uncertified``."""
    swtpm = any(
        a.value.startswith("swtpm") if isinstance(a.value, str) else False
        for c in (chain or [])[1:]
        for a in c.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    )
    if claimed == "software" or swtpm:
        return "software"
    return "hardware" if chain else "uncertified"


def verify_fresh_quote(evidence: TpmEvidence, nonce: bytes, attest: bytes, signature: bytes) -> Quote:
    """Check a connection's fresh quote: same AK, qualifying data over this nonce, same PCR values.

    A quote replayed from another connection carries another nonce and is refused with
    :class:`~mesatee_notebook.errors.ReplayedQuote`.
    """
    ak = evidence.ak()
    ak.verify(attest, signature)
    quote = Quote.parse(attest)
    if quote.signer_name != ak.qualified_name:
        msg = "the connection's TPM quote is signed by a different key than the attested AK"
        raise QuoteSignatureError(msg)
    if quote.extra_data != fresh_qualifying_data(str(evidence.statement["report_data"]), nonce):
        msg = (
            "the connection's TPM quote does not commit to the nonce this client just sent: it is a replayed "
            "quote (from another connection), or it does not bind this channel's keys"
        )
        raise ReplayedQuote(msg)
    evidence.check_pcr_digest(quote)
    return quote
