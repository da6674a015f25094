"""Signed receipts: an in-toto Statement v1 inside a DSSE envelope (pure).

A receipt bundle is JSON::

    {"mediaType": "application/vnd.mesatee.receipt+json;version=1",
     "dsseEnvelope": {"payloadType": "application/vnd.in-toto+json",
                      "payload": base64(statement), "signatures": [{"keyid": ..., "sig": base64}]},
     "certificate": base64(DER of the kernel's RA-TLS certificate, which carries the evidence)}

The statement's subjects are the output digests; its predicate holds the measurement,
level, session, request nonce, code digest, input digests and times. Anyone holding the
bundle can check it offline with :func:`verify_receipt`: the certificate's evidence
(under a policy), that the evidence's receipt key signed the envelope, and optionally
the nonce and output digests they expect.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import html
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from mesatee_notebook.attestation.measurement import canonical_json
from mesatee_notebook.attestation.policy import AttestationReport, Policy, verify_certificate
from mesatee_notebook.errors import AttestationError, ReceiptError
from mesatee_notebook.wire.digest import LEGACY_DIGESTS, PAYLOAD_DIGEST, digest_set, from_digest_set

__all__ = [
    "MEDIA_TYPE",
    "PAYLOAD_TYPE",
    "PREDICATE_TYPE",
    "Receipt",
    "build_receipt",
    "pae",
    "verify_receipt",
]

MEDIA_TYPE = "application/vnd.mesatee.receipt+json;version=1"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "urn:mesatee-notebook:receipt:v1"


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE pre-authentication encoding."""
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        msg = f"receipt field {what} must be base64 text"
        raise ReceiptError(msg)
    try:
        return base64.b64decode(text, validate=True)
    except ValueError as exc:
        msg = f"receipt field {what} is not valid base64"
        raise ReceiptError(msg) from exc


def build_receipt(
    *,
    subjects: Mapping[str, str],
    predicate: dict[str, Any],
    certificate_der: bytes,
    sign: Callable[[bytes], bytes],
    keyid: str,
) -> dict[str, Any]:
    """Build a signed receipt bundle; ``sign`` is the enclave's receipt key."""
    statement = {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": name, "digest": digest_set(digest)} for name, digest in sorted(subjects.items())],
        "predicateType": PREDICATE_TYPE,
        "predicate": predicate,
    }
    payload = canonical_json(statement)
    sig = sign(pae(PAYLOAD_TYPE, payload))
    return {
        "mediaType": MEDIA_TYPE,
        "dsseEnvelope": {
            "payloadType": PAYLOAD_TYPE,
            "payload": _b64(payload),
            "signatures": [{"keyid": keyid, "sig": _b64(sig)}],
        },
        "certificate": _b64(certificate_der),
    }


@dataclass(frozen=True)
class Receipt:
    """A receipt bundle as received; :meth:`verify` checks it."""

    bundle: dict[str, Any]

    @classmethod
    def load(cls, source: Receipt | Mapping[str, Any] | str | bytes | Path) -> Receipt:
        """From a Receipt, a dict, JSON text/bytes, or a path to a JSON file."""
        if isinstance(source, Receipt):
            return source
        if isinstance(source, Mapping):
            return cls(dict(source))
        if isinstance(source, Path) or (isinstance(source, str) and not source.lstrip().startswith("{")):
            source = Path(source).expanduser().read_bytes()
        try:
            data = json.loads(source)
        except ValueError as exc:
            msg = "a receipt must be JSON"
            raise ReceiptError(msg) from exc
        if not isinstance(data, dict):
            msg = "a receipt must be a JSON object"
            raise ReceiptError(msg)
        return cls(data)

    @property
    def statement(self) -> dict[str, Any]:
        """The in-toto statement (unverified until :meth:`verify`)."""
        env = self.bundle.get("dsseEnvelope")
        if not isinstance(env, dict):
            msg = "receipt has no DSSE envelope"
            raise ReceiptError(msg)
        try:
            data = json.loads(_unb64(env.get("payload"), "payload"))
        except ValueError as exc:
            msg = "receipt payload is not JSON"
            raise ReceiptError(msg) from exc
        if not isinstance(data, dict):
            msg = "receipt payload must be a JSON object"
            raise ReceiptError(msg)
        return data

    @property
    def predicate(self) -> dict[str, Any]:
        """The mesatee predicate: measurement, level, session, nonce, code and input digests, times."""
        pred = self.statement.get("predicate")
        return pred if isinstance(pred, dict) else {}

    @property
    def subjects(self) -> dict[str, str]:
        """Output name → payload digest hex (BLAKE3; SHA-256 in a receipt made before BLAKE3)."""
        out: dict[str, str] = {}
        for s in self.statement.get("subject", []):
            if isinstance(s, dict) and isinstance(s.get("digest"), dict):
                out[str(s.get("name"))] = str(from_digest_set(s["digest"]))
        return out

    @property
    def digest_algorithm(self) -> str:
        """The algorithm of the subject and input digests: ``"blake3"``, or ``"sha256"`` for a receipt made before."""
        for s in self.statement.get("subject", []):
            if isinstance(s, dict) and isinstance(s.get("digest"), dict):
                for alg in (PAYLOAD_DIGEST, *LEGACY_DIGESTS):
                    if alg in s["digest"]:
                        return alg
        return PAYLOAD_DIGEST

    def to_json(self, indent: int | None = 2) -> str:
        """The bundle as JSON text."""
        return json.dumps(self.bundle, indent=indent, sort_keys=True)

    def save(self, path: str | Path) -> Path:
        """Write the bundle to ``path`` (JSON)."""
        p = Path(path).expanduser()
        p.write_text(self.to_json() + "\n")
        return p

    def verify(self, policy: Policy, **expect: Any) -> VerifiedReceipt:
        """Same as :func:`verify_receipt`."""
        return verify_receipt(self, policy, **expect)

    def __repr__(self) -> str:
        p = self.predicate
        return (
            f"<mesatee Receipt {p.get('kind', '?')} session={p.get('session', '?')} "
            f"level={p.get('level', '?')} outputs={sorted(self.subjects)}>"
        )

    def _repr_html_(self) -> str:
        p = self.predicate
        rows = "".join(
            f"<tr><td>{html.escape(n)}</td><td><code>{d[:16]}…</code></td></tr>" for n, d in self.subjects.items()
        )
        return (
            "<div class='mesatee-receipt'><b>mesatee receipt</b> "
            f"({html.escape(str(p.get('level', '?')))}, session {html.escape(str(p.get('session', '?')))}, "
            f"measurement <code>{html.escape(str(p.get('measurement', ''))[:16])}…</code>)"
            f"<table>{rows}</table></div>"
        )


@dataclass(frozen=True)
class VerifiedReceipt:
    """A receipt whose signature, evidence and expectations all checked out."""

    receipt: Receipt
    attestation: AttestationReport
    statement: dict[str, Any]

    @property
    def predicate(self) -> dict[str, Any]:
        """The verified predicate."""
        return dict(self.statement["predicate"])

    @property
    def subjects(self) -> dict[str, str]:
        """The verified output digests."""
        return self.receipt.subjects


def verify_receipt(
    receipt: Receipt | Mapping[str, Any] | str | bytes | Path,
    policy: Policy,
    *,
    nonce: str | None = None,
    outputs: Mapping[str, str] | None = None,
    inputs: Mapping[str, str] | None = None,
    code: str | None = None,
    attested: AttestationReport | None = None,
) -> VerifiedReceipt:
    """Check a receipt offline; raise :class:`ReceiptError` (or an AttestationError) if anything is off.

    Checks: the RA-TLS certificate's evidence under ``policy``, with validity judged at the
    receipt's own time; the DSSE signature by the evidence's receipt key; that the predicate's
    measurement and level are the attested ones; and, when given, the request ``nonce``, the
    ``outputs`` and ``inputs`` digests (name → payload digest hex, BLAKE3: ``wire/digest.py``) and the ``code`` text.
    ``attested`` lets a live client skip re-verifying the very certificate it verified at
    connect time (same DER bytes); any other certificate is verified in full.
    """
    r = Receipt.load(receipt)
    statement, pred = _statement_and_predicate(r)
    report = _receipt_report(r, pred, policy, attested)
    _check_signature(r, report)
    _check_expectations(r, pred, report, nonce=nonce, outputs=outputs, inputs=inputs, code=code)
    return VerifiedReceipt(receipt=r, attestation=report, statement=statement)


def _statement_and_predicate(r: Receipt) -> tuple[dict[str, Any], dict[str, Any]]:
    if r.bundle.get("mediaType") != MEDIA_TYPE:
        msg = f"not a mesatee receipt (mediaType {r.bundle.get('mediaType')!r})"
        raise ReceiptError(msg)
    statement = r.statement
    pred = statement.get("predicate")
    if statement.get("_type") != STATEMENT_TYPE or statement.get("predicateType") != PREDICATE_TYPE:
        msg = "receipt statement is not an in-toto Statement v1 with the mesatee predicate"
        raise ReceiptError(msg)
    if not isinstance(pred, dict) or not isinstance(pred.get("finishedAt"), (int, float)):
        msg = "receipt predicate lacks finishedAt"
        raise ReceiptError(msg)
    return statement, pred


def _receipt_report(
    r: Receipt, pred: dict[str, Any], policy: Policy, attested: AttestationReport | None
) -> AttestationReport:
    """The receipt certificate's evidence, verified under ``policy`` at the receipt's own time."""
    when = dt.datetime.fromtimestamp(float(pred["finishedAt"]), dt.UTC)
    cert_der = _unb64(r.bundle.get("certificate"), "certificate")
    if attested is not None and attested.certificate_der == cert_der:
        return attested
    try:
        return verify_certificate(cert_der, policy, now=when)
    except AttestationError as exc:
        msg = f"the receipt's attestation evidence is refused: {exc}"
        raise type(exc)(msg, **exc.details) from exc


def _check_signature(r: Receipt, report: AttestationReport) -> None:
    env = r.bundle["dsseEnvelope"]
    payload = _unb64(env.get("payload"), "payload")
    sigs = env.get("signatures")
    if env.get("payloadType") != PAYLOAD_TYPE or not isinstance(sigs, list) or not sigs:
        msg = "receipt envelope has no signature or an unexpected payload type"
        raise ReceiptError(msg)
    key = Ed25519PublicKey.from_public_bytes(report.receipt_key)
    for s in sigs:
        if not isinstance(s, dict):
            continue
        try:
            key.verify(_unb64(s.get("sig"), "signature"), pae(PAYLOAD_TYPE, payload))
        except InvalidSignature:
            continue
        return
    msg = "the receipt's signature does not verify under the attested receipt key: the receipt was altered"
    raise ReceiptError(msg)


def _check_expectations(
    r: Receipt,
    pred: dict[str, Any],
    report: AttestationReport,
    *,
    nonce: str | None,
    outputs: Mapping[str, str] | None,
    inputs: Mapping[str, str] | None,
    code: str | None,
) -> None:
    if pred.get("measurement") != report.measurement or pred.get("level") != report.level.label:
        msg = "the receipt's measurement or level is not the attested one"
        raise ReceiptError(msg)
    if nonce is not None and pred.get("nonce") != nonce:
        msg = "the receipt answers a different request (nonce mismatch): it may be replayed"
        raise ReceiptError(msg)
    if code is not None and pred.get("code", {}).get("sha256") != hashlib.sha256(code.encode()).hexdigest():
        msg = "the receipt's code digest does not match the code that was sent"
        raise ReceiptError(msg)
    if outputs is not None:
        _check_outputs(r.subjects, outputs)
    if inputs is not None:
        sent = pred.get("inputs", {})
        if not isinstance(sent, dict) or {k: sent.get(k) for k in inputs} != dict(inputs) or set(sent) != set(inputs):
            msg = "the receipt's input digests do not match the inputs that were sent"
            raise ReceiptError(msg)


def _check_outputs(got: Mapping[str, str], outputs: Mapping[str, str]) -> None:
    for name, digest in outputs.items():
        if got.get(name) != digest:
            msg = f"output {name!r} does not match its digest in the receipt"
            raise ReceiptError(msg)
    extra = set(got) - set(outputs)
    if extra:
        msg = f"the receipt lists outputs that were not received: {sorted(extra)}"
        raise ReceiptError(msg)


__all__ += ["VerifiedReceipt"]
