"""Real TPM quotes, made in process by the kernel's own TPM class, checked by the pure verifier and by tpm2-tools."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mesatee_notebook as mn
from mesatee_notebook.attestation.measurement import canonical_json
from mesatee_notebook.attestation.policy import verify_certificate
from mesatee_notebook.attestation.ratls import build_ratls_certificate, evidence_from_certificate, load_certificate
from mesatee_notebook.attestation.tpm import (
    KERNEL_EVENT,
    TPM_TAG,
    AkPublic,
    Quote,
    ak_fingerprint,
    app_pcr_value,
    fresh_qualifying_data,
    make_tpm_evidence,
    parse_tpm_evidence,
    statement_qualifying_data,
    verify_fresh_quote,
)
from mesatee_notebook.enclave.kernel_keys import KernelIdentity
from mesatee_notebook.errors import (
    EventLogMismatch,
    MalformedEvidence,
    PcrDigestMismatch,
    QualifyingDataMismatch,
    QuoteSignatureError,
    ReplayedQuote,
)
from tests.tpm.conftest import Swtpm

MANIFEST = {"format": 1, "files": [{"path": "attestation/tpm.py", "sha256": "00" * 32}], "python": "test"}


@pytest.fixture(scope="module")
def identity(local_tpm: Any) -> KernelIdentity:
    return KernelIdentity.create(mn.Level.TPM, MANIFEST, Ed25519PrivateKey.generate(), 3600.0, tpm=local_tpm)


def _policy(identity: KernelIdentity, **kw: Any) -> mn.Policy:
    assert identity.tpm is not None
    kw.setdefault("platform_roots", [ak_fingerprint(identity.tpm.ak_public)])
    kw.setdefault("require_sandbox", False)  # an in-process identity, not a kernel: it runs no cells
    return mn.Policy(measurements=[identity.measurement], min_level="tpm", **kw)


def _value(identity: KernelIdentity) -> list[bytes]:
    return list(cbor2.loads(evidence_from_certificate(load_certificate(identity.certificate_der))).value)


def _cert(identity: KernelIdentity, value: list[bytes]) -> bytes:
    """The same TLS key's certificate around changed evidence (the key binding still holds)."""
    start = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
    evidence = cbor2.dumps(cbor2.CBORTag(TPM_TAG, value))
    cert = build_ratls_certificate(identity.tls_key, evidence, not_before=start, not_after=start + dt.timedelta(days=1))
    return cert.public_bytes(Encoding.DER)


def _flip(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


def _pcrread(tcti: str, index: int) -> str:
    out = subprocess.run(["tpm2_pcrread", "-T", tcti, f"sha256:{index}"], capture_output=True, text=True, check=True)
    return out.stdout.split("0x", 1)[1].strip().lower()


def test_genuine_quote_verifies(identity: KernelIdentity) -> None:
    report = verify_certificate(identity.certificate_der, _policy(identity))
    assert report.level is mn.Level.TPM and report.tpm_kind == "software"


def test_measured_launch_is_what_the_client_recomputes(identity: KernelIdentity, other_swtpm: Swtpm) -> None:
    if shutil.which("tpm2_pcrread") is None:
        pytest.skip("tpm2-tools (tpm2_pcrread) is not installed: no cross-check")
    assert _pcrread(other_swtpm.tcti, 16) == app_pcr_value(identity.measurement)


def test_tampered_quote_or_signature_is_refused(identity: KernelIdentity) -> None:
    policy = _policy(identity)
    value = _value(identity)
    for i in (20, len(value[1]) - 1):  # inside the qualifying data, and the PCR digest
        with pytest.raises(QuoteSignatureError, match="altered"):
            verify_certificate(_cert(identity, [value[0], _flip(value[1], i), *value[2:]]), policy)
    with pytest.raises(QuoteSignatureError, match="altered"):
        verify_certificate(
            _cert(identity, [value[0], value[1], _flip(value[2], len(value[2]) - 1), *value[3:]]), policy
        )


def test_changed_statement_is_refused_by_the_qualifying_data(identity: KernelIdentity) -> None:
    value = _value(identity)
    statement = json.loads(value[0])
    statement["receipt_key"] = "02" * 32  # a receipt key the TPM never quoted
    with pytest.raises(QualifyingDataMismatch, match="qualifying data"):
        verify_certificate(_cert(identity, [canonical_json(statement), *value[1:]]), _policy(identity))


def test_quote_by_another_key_is_refused(identity: KernelIdentity) -> None:
    value = _value(identity)
    forged = _forged_ak(value[3])  # same template, a software key's point
    # Even pinned (say, by a fooled operator), that key did not make the TPM's signature.
    pinned = _policy(identity, platform_roots=[ak_fingerprint(forged)])
    with pytest.raises(QuoteSignatureError, match="altered"):
        verify_certificate(_cert(identity, [*value[:3], forged, value[4]]), pinned)
    with pytest.raises(MalformedEvidence, match="restricted"):  # a TPM vouches only for what restricted keys sign
        AkPublic.parse(_clear_restricted(value[3]))


def _clear_restricted(public: bytes) -> bytes:
    out = bytearray(public)
    attrs = int.from_bytes(out[4:8], "big") & ~(1 << 16)
    out[4:8] = attrs.to_bytes(4, "big")
    return bytes(out)


def _forged_ak(public: bytes) -> bytes:
    """The AK's TPMT_PUBLIC with a software key's point: same attributes, different key."""
    from cryptography.hazmat.primitives.asymmetric import ec

    numbers = ec.generate_private_key(ec.SECP256R1()).public_key().public_numbers()
    head = public[: len(public) - 2 * (2 + 32)]
    return head + b"\x00\x20" + numbers.x.to_bytes(32, "big") + b"\x00\x20" + numbers.y.to_bytes(32, "big")


def test_pcr_values_the_tpm_did_not_quote_are_refused(identity: KernelIdentity, local_tpm: Any) -> None:
    value = _value(identity)
    statement = json.loads(value[0])
    statement.pop("ek_cert_sha256")
    statement["pcrs"]["0"] = "11" * 32  # a kernel lying about PCR 0 gets that lie quoted, but not digested
    evidence = make_tpm_evidence(statement=statement, quoter=local_tpm.quote, ak_public=value[3], ek_cert=value[4])
    with pytest.raises(PcrDigestMismatch, match="PCR digest"):
        verify_certificate(_cert(identity, list(cbor2.loads(evidence).value)), _policy(identity))


def test_app_pcr_extended_after_launch_is_refused(identity: KernelIdentity, local_tpm: Any, other_swtpm: Swtpm) -> None:
    from tpm2_pytss import ESAPI, ESYS_TR, TPM2_ALG, TPML_DIGEST_VALUES, TPMT_HA, TPMU_HA

    esapi = ESAPI(other_swtpm.tcti)  # another program on the same TPM extends the application PCR
    try:
        digest = TPMT_HA(hashAlg=TPM2_ALG.SHA256, digest=TPMU_HA(sha256=b"\x07" * 32))
        esapi.pcr_extend(ESYS_TR.PCR16, TPML_DIGEST_VALUES([digest]))
    finally:
        esapi.close()
    try:
        identity.refresh()  # the log (one launch event) no longer replays to what the TPM quotes
        with pytest.raises(EventLogMismatch, match="replaying the kernel's event log"):
            verify_certificate(identity.certificate_der, _policy(identity))
    finally:
        local_tpm.measured_launch(identity.measurement)
        identity.refresh()
    verify_certificate(identity.certificate_der, _policy(identity))


def test_fresh_quote_commits_to_the_nonce(identity: KernelIdentity) -> None:
    evidence = parse_tpm_evidence(b"", cbor2.loads(evidence_from_certificate(load_certificate(
        identity.certificate_der))).value)  # fmt: skip
    fresh = identity.fresh_quote(b"\x01" * 32)
    verify_fresh_quote(evidence, b"\x01" * 32, fresh["attest"], fresh["signature"])
    with pytest.raises(ReplayedQuote):
        verify_fresh_quote(evidence, b"\x02" * 32, fresh["attest"], fresh["signature"])


def _checkquote(tmp: Path, ak: bytes, attest: bytes, sig: bytes, pcrs: bytes, qual: bytes) -> int:
    pem = AkPublic.parse(ak).key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    for name, data in (("ak.pem", pem), ("msg", attest), ("sig", sig), ("pcrs", pcrs)):
        (tmp / name).write_bytes(data)
    args = ["tpm2_checkquote", "-u", str(tmp / "ak.pem"), "-m", str(tmp / "msg"), "-s", str(tmp / "sig"),
            "-f", str(tmp / "pcrs"), "-g", "sha256", "-q", qual.hex()]  # fmt: skip
    return subprocess.run(args, capture_output=True, check=False, timeout=30).returncode


def _tools_pcr_file(order: list[int], values: list[bytes]) -> bytes:
    """PCR values in the layout `tpm2_quote -o` writes (host-endian C structs), for `tpm2_checkquote -f`.

    TPML_PCR_SELECTION (count, 16 x {hash, sizeofSelect, pcrSelect[4], pad}), the number of
    TPML_DIGEST lists, then each list (count, 8 x {size, buffer[64]}).
    """
    bitmap = bytearray(4)
    for i in order:
        bitmap[i // 8] |= 1 << (i % 8)
    out = struct.pack("<I", 1) + struct.pack("<HB", 0x000B, 3) + bytes(bitmap) + b"\x00" + bytes(8 * 15)
    lists = [values[i : i + 8] for i in range(0, len(values), 8)]
    out += struct.pack("<I", len(lists))
    for chunk in lists:
        body = b"".join(struct.pack("<H", len(v)) + v.ljust(64, b"\x00") for v in chunk)
        out += struct.pack("<I", len(chunk)) + body + bytes(66 * (8 - len(chunk)))
    return out


def test_tpm2_checkquote_agrees(identity: KernelIdentity, tmp_path: Path) -> None:
    if shutil.which("tpm2_checkquote") is None:
        pytest.skip("tpm2-tools (tpm2_checkquote) is not installed: no cross-check")
    value = _value(identity)
    statement = json.loads(value[0])
    order = sorted(int(i) for i in statement["pcrs"])
    values = [bytes.fromhex(statement["pcrs"][str(i)]) for i in order]
    pcrs = _tools_pcr_file(order, values)
    qual = statement_qualifying_data(value[0])
    assert Quote.parse(value[1]).sha256_pcrs == tuple(order)
    assert _checkquote(tmp_path, value[3], value[1], value[2], pcrs, qual) == 0  # accepted by both
    tampered_pcrs = _tools_pcr_file(order, [_flip(values[0], 0), *values[1:]])
    assert _checkquote(tmp_path, value[3], value[1], value[2], tampered_pcrs, qual) != 0
    assert _checkquote(tmp_path, value[3], _flip(value[1], 20), value[2], pcrs, qual) != 0
    assert _checkquote(tmp_path, value[3], value[1], _flip(value[2], len(value[2]) - 1), pcrs, qual) != 0
    assert _checkquote(tmp_path, value[3], value[1], value[2], pcrs, _flip(qual, 0)) != 0
    fresh = identity.fresh_quote(b"\x05" * 32)
    fresh_qual = fresh_qualifying_data(identity.report_data, b"\x05" * 32)
    assert _checkquote(tmp_path, value[3], fresh["attest"], fresh["signature"], pcrs, fresh_qual) == 0


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_parsers_refuse_damaged_structures_with_typed_errors(identity: KernelIdentity, data: st.DataObject) -> None:
    value = _value(identity)
    which = data.draw(st.sampled_from([1, 2, 3]))
    blob = value[which]
    cut = data.draw(st.integers(0, len(blob)))
    damaged = blob[:cut] if data.draw(st.booleans()) else _flip(blob, min(cut, len(blob) - 1))
    value[which] = damaged
    try:
        parse_tpm_evidence(b"", value).verify_quote()  # signature, signer name, qualifying data, PCR digest
    except (MalformedEvidence, QuoteSignatureError):
        return
    assert damaged == blob  # only an undamaged structure gets through


def test_a_tpm_that_stops_answering_gives_a_typed_error(tmp_path: Path) -> None:
    from mesatee_notebook.enclave.tpm import open_tpm
    from tests.tpm.conftest import start_swtpm, stop_swtpm

    swtpm = start_swtpm(tmp_path / "swtpm")
    tpm = open_tpm(swtpm.tcti, app_pcr=16, with_ek=False)
    stop_swtpm(swtpm)
    with pytest.raises(mn.LevelNotAvailableError, match="did not quote"):
        tpm.quote(b"\x00" * 32)
    with pytest.raises(mn.LevelNotAvailableError, match="did not read its PCRs"):
        tpm.read_pcrs()
    tpm.close()


def _relogged(identity: KernelIdentity, local_tpm: Any, events: Any) -> bytes:
    """The kernel's evidence with another event log, quoted for real by the same TPM (a lying kernel)."""
    value = _value(identity)
    statement = json.loads(value[0])
    statement.pop("ek_cert_sha256")
    statement["event_log"] = events
    evidence = make_tpm_evidence(statement=statement, quoter=local_tpm.quote, ak_public=value[3], ek_cert=value[4])
    return _cert(identity, list(cbor2.loads(evidence).value))


def test_event_log_is_replayed_against_the_quoted_pcr(identity: KernelIdentity, local_tpm: Any) -> None:
    report = verify_certificate(identity.certificate_der, _policy(identity))
    detail = {c.name: c.detail for c in report.checks}["event log"]
    assert "1 launch event(s) replay" in detail and "no firmware event log" in detail
    m = identity.measurement
    # A log that claims a second extend the PCR does not hold: does not replay.
    extra = [{"pcr": 16, "type": KERNEL_EVENT, "digest": m}, {"pcr": 16, "type": "config", "digest": "07" * 32}]
    with pytest.raises(EventLogMismatch, match="2 event"):
        verify_certificate(_relogged(identity, local_tpm, extra), _policy(identity))
    # A log of another program's event with the same digest replays, but is not what a kernel launch writes.
    with pytest.raises(EventLogMismatch, match="not the one"):
        verify_certificate(
            _relogged(identity, local_tpm, [{"pcr": 16, "type": "other", "digest": m}]), _policy(identity)
        )
    with pytest.raises(EventLogMismatch, match="other than its application PCR"):
        verify_certificate(
            _relogged(identity, local_tpm, [{"pcr": 0, "type": KERNEL_EVENT, "digest": m}]), _policy(identity)
        )
    with pytest.raises(MalformedEvidence, match="event log"):
        verify_certificate(_relogged(identity, local_tpm, [{"pcr": 16, "digest": "zz"}]), _policy(identity))
    with pytest.raises(MalformedEvidence, match="event log"):
        verify_certificate(_relogged(identity, local_tpm, None), _policy(identity))
