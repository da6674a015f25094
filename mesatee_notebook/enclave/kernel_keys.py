"""The kernel's in-memory identity: TLS key, receipt key, evidence (softtee, TPM, SNP/TDX/SGX) and RA-TLS cert."""

from __future__ import annotations

import datetime as dt
import logging
import os
import ssl
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from mesatee_notebook.attestation.evidence import fingerprint, make_evidence, report_data_for
from mesatee_notebook.attestation.hw_evidence import (
    HW_EVIDENCE_FORMAT,
    fresh_report_data,
    make_hw_evidence,
    statement_report_data,
)
from mesatee_notebook.attestation.levels import Level
from mesatee_notebook.attestation.measurement import canonical_json, measurement_of
from mesatee_notebook.attestation.ratls import build_ratls_certificate
from mesatee_notebook.attestation.tpm import TPM_EVIDENCE_FORMAT, fresh_qualifying_data, make_tpm_evidence

log = logging.getLogger("mesatee.enclave")

if TYPE_CHECKING:
    from mesatee_notebook.enclave.hw_providers import HardwareReporter
    from mesatee_notebook.enclave.tpm import Tpm

__all__ = ["KernelIdentity"]


@dataclass
class KernelIdentity:
    """Keys that live only in the supervisor's memory, and the certificate that attests them."""

    level: Level
    manifest: dict[str, Any]
    platform_key: Ed25519PrivateKey | None
    cert_lifetime: float
    tls_key: ec.EllipticCurvePrivateKey
    receipt_key: Ed25519PrivateKey
    certificate_der: bytes = b""
    ssl_context: ssl.SSLContext | None = None
    issued_at: float = 0.0
    tpm: Tpm | None = None
    sandbox: dict[str, Any] | None = None
    hw: HardwareReporter | None = None
    _measurement: tuple[dict[str, Any], str] | None = field(default=None, init=False, repr=False, compare=False)
    _receipt_public: bytes | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def create(
        cls,
        level: Level,
        manifest: dict[str, Any],
        platform_key: Ed25519PrivateKey | None,
        cert_lifetime: float,
        tpm: Tpm | None = None,
        sandbox: dict[str, Any] | None = None,
        hw: HardwareReporter | None = None,
    ) -> KernelIdentity:
        ident = cls(
            sandbox=sandbox,
            level=level,
            manifest=manifest,
            platform_key=platform_key,
            cert_lifetime=cert_lifetime,
            tls_key=ec.generate_private_key(ec.SECP256R1()),
            receipt_key=Ed25519PrivateKey.generate(),
            tpm=tpm,
            hw=hw,
        )
        if tpm is not None:
            tpm.measured_launch(ident.measurement)
        ident.refresh()
        return ident

    @property
    def tpm_claims(self) -> dict[str, str]:
        """What receipts and ``hello.ok`` add for the level: its TPM kind, or its TEE and evidence source.

        At tpm the kind of TPM (``software`` for swtpm) as it reports itself; at sev/sgx the TEE and the source
        (``mimic`` for the test-only tree).
        """
        if self.hw is not None:
            return {"tee": self.hw.tee, "hwSource": self.hw.source}
        return {} if self.tpm is None else {"tpmKind": self.tpm.kind}

    def _statement(self, fmt: str, level: str, now: float, **fields: Any) -> dict[str, Any]:
        """The fields every signed statement carries (tpm and hardware levels), plus the level's own ``fields``."""
        key = self.platform_key
        audit = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw) if key is not None else b""
        return {
            "format": fmt,
            "level": level,
            "measurement": self.measurement,
            "manifest": self.manifest,
            "time": int(now),
            "report_data": self.report_data,
            "receipt_key": self.receipt_public.hex(),
            "audit_key": fingerprint(audit) if audit else "",
            "sandbox": self.sandbox if self.sandbox is not None else {"active": False, "why": "--no-sandbox"},
            **fields,
        }

    def _hw_evidence(self, hw: HardwareReporter, now: float) -> bytes:
        statement = self._statement(HW_EVIDENCE_FORMAT, hw.level.label, now, tee=hw.tee, source=hw.source)
        report, auxblob = hw.report(statement_report_data(canonical_json(statement)))
        return make_hw_evidence(statement, report, auxblob)

    def hw_hello(self, nonce: object) -> dict[str, Any]:
        """What a sev/sgx kernel adds to ``hello.ok``: a report over the key binding and this connection's nonce."""
        if self.hw is None or not isinstance(nonce, bytes) or not 16 <= len(nonce) <= 32:
            return {}
        report, auxblob = self.hw.report(fresh_report_data(self.report_data, nonce))
        return {"hw_report": {"report": report, "auxblob": auxblob}}

    @property
    def report_data(self) -> str:
        spki = self.tls_key.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        return report_data_for(spki, self.receipt_public)

    def _tpm_evidence(self, tpm: Tpm, now: float) -> bytes:
        statement = self._statement(
            TPM_EVIDENCE_FORMAT,
            Level.TPM.label,
            now,
            tpm_kind=tpm.kind,
            tpm_vendor=tpm.vendor,
            app_pcr=tpm.app_pcr,
            pcrs={str(i): v for i, v in tpm.read_pcrs().items()},
            event_log=tpm.event_log,
        )
        return make_tpm_evidence(statement=statement, quoter=tpm.quote, ak_public=tpm.ak_public, ek_cert=tpm.ek_cert)

    def tpm_hello(self, header: dict[str, Any]) -> dict[str, Any]:
        """What a TPM kernel adds to ``hello.ok``: a fresh quote, and the answer to a credential challenge.

        The answer is omitted when the TPM refuses the challenge; the client then refuses the kernel.
        """
        out: dict[str, Any] = {}
        nonce, challenge = header.get("tpm_nonce"), header.get("tpm_credential")
        if self.hw is not None:  # sev/sgx: the same evidence-nonce field asks for a fresh hardware report
            return self.hw_hello(nonce)
        if self.tpm is None:
            return out
        if isinstance(nonce, bytes) and 16 <= len(nonce) <= 32:
            out["tpm_quote"] = self.fresh_quote(nonce)
        if isinstance(challenge, dict) and self.tpm.ek_cert:
            blob, secret = challenge.get("blob"), challenge.get("secret")
            if isinstance(blob, bytes) and isinstance(secret, bytes) and len(blob) <= 512 and len(secret) <= 512:
                try:
                    out["tpm_activated"] = self.tpm.activate_credential(blob, secret)
                except self.tpm.challenge_errors as exc:  # a bad or foreign challenge
                    log.info("credential activation refused: %s", exc)
        return out

    def fresh_quote(self, nonce: bytes) -> dict[str, bytes]:
        """A quote for one connection: qualifying data over the key binding and the client's nonce."""
        if self.tpm is None:
            msg = "this kernel has no TPM"
            raise RuntimeError(msg)
        attest, signature = self.tpm.quote(fresh_qualifying_data(self.report_data, nonce))
        return {"attest": attest, "signature": signature}

    @property
    def measurement(self) -> str:
        # Every receipt names it: hashed once per manifest, not per call (the canonical manifest is ~100 KB).
        cached = self._measurement
        if cached is None or cached[0] is not self.manifest:
            cached = self._measurement = (self.manifest, measurement_of(self.manifest))
        return cached[1]

    @property
    def receipt_public(self) -> bytes:
        # every receipt names its key: the raw public bytes of the (never replaced) receipt key, computed once
        if self._receipt_public is None:
            self._receipt_public = self.receipt_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return self._receipt_public

    def refresh(self) -> None:
        """Issue fresh evidence and a new certificate for the same keys; swap the SSL context."""
        now = time.time()
        if self.tpm is not None:
            evidence = self._tpm_evidence(self.tpm, now)
        elif self.hw is not None:
            evidence = self._hw_evidence(self.hw, now)
        else:
            evidence = make_evidence(
                level=self.level,
                manifest=self.manifest,
                tls_spki_der=self.tls_key.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo),
                receipt_key=self.receipt_public,
                time=int(now),
                platform_key=self.platform_key,
                sandbox=self.sandbox,
            )
        start = dt.datetime.fromtimestamp(now, dt.UTC) - dt.timedelta(minutes=5)
        cert = build_ratls_certificate(
            self.tls_key, evidence, not_before=start, not_after=start + dt.timedelta(seconds=self.cert_lifetime)
        )
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        pem = cert.public_bytes(Encoding.PEM) + self.tls_key.private_bytes(
            Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()
        )
        # The key goes to OpenSSL through an anonymous memfd: never on disk, argv or environment.
        fd = os.memfd_create("mesatee-tls", os.MFD_CLOEXEC)
        try:
            os.write(fd, pem)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        self.certificate_der = cert.public_bytes(Encoding.DER)
        self.ssl_context = ctx
        self.issued_at = now

    def sign_receipt(self, data: bytes) -> bytes:
        return self.receipt_key.sign(data)
