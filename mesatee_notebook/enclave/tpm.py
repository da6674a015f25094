"""The kernel's TPM: measured launch into an application PCR, and quotes by an attestation key.

Everything goes through tpm2-pytss (ESAPI over a standard TCTI string: ``device:/dev/tpmrm0``
for a chip, ``swtpm:host=127.0.0.1,port=2321`` for swtpm); no TPM command is marshalled here.

* **Measured launch.** :meth:`Tpm.measured_launch` resets the application PCR (PCR 23 by
  default: resettable from locality 0 and reserved for applications by the TCG PC client
  profile; PCR 16, the debug PCR, in tests) and extends the kernel's measurement into it
  once, so its value is ``SHA-256(0^32 || measurement)``, which a client recomputes.
* **Attestation key.** A restricted ECDSA P-256 signing key created as a *primary* key in the
  endorsement hierarchy from a fixed template: the TPM derives it from its endorsement seed,
  so the same TPM gives the same AK on every start and a client can pin its fingerprint.
* **Quotes** cover the boot PCRs named at serve time plus the application PCR (SHA-256 bank).
* **EK.** If the TPM holds an EK certificate of the TCG low range in NV (RSA 2048 at 0x01c00002: every chip,
  swtpm after ``swtpm_setup --create-ek-cert``; or ECC P-256 at 0x01c0000a), the EK is loaded and
  :meth:`Tpm.activate_credential` answers a client's ``TPM2_MakeCredential`` challenge, proving the AK sits in that TPM.

A software TPM is a software TPM: its owner can reset PCRs and read its keys. The kind
(``software`` for swtpm/libtpms, ``hardware`` otherwise) is what the TPM reports of itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import Any

from mesatee_notebook.attestation.tpm import KERNEL_EVENT
from mesatee_notebook.errors import LevelNotAvailableError

__all__ = ["APP_PCR_DEFAULT", "BOOT_PCRS_DEFAULT", "Tpm", "open_tpm"]

log = logging.getLogger("mesatee.enclave")

APP_PCR_DEFAULT = 23
BOOT_PCRS_DEFAULT = (0, 1, 2, 3, 4, 5, 6, 7)
_RESETTABLE = (16, 23)  # resettable from locality 0 (PC client profile): debug and application PCRs
_SOFTWARE_VENDORS = ("SW", "SW TPM", "SWTPM", "LIBTPMS")
_EK_TEMPLATES = {"rsa": "EK-RSA2048", "ecc": "EK-ECC256"}  # TCG EK credential profile L-1, L-2
_EK_ORDER = {"auto": ("rsa", "ecc"), "rsa": ("rsa",), "ecc": ("ecc",)}


def _unavailable(tcti: str, why: str) -> LevelNotAvailableError:
    msg = f"security level 'tpm' is not available on this platform: the TPM at TCTI {tcti!r} cannot be used ({why})"
    return LevelNotAvailableError(msg, level="tpm")


class Tpm:
    """One open ESAPI context, the loaded AK, and a lock: every TPM command is serialised."""

    def __init__(
        self,
        tcti: str,
        *,
        app_pcr: int = APP_PCR_DEFAULT,
        boot_pcrs: Iterable[int] = BOOT_PCRS_DEFAULT,
        with_ek: bool = True,
        ek: str = "auto",
    ) -> None:
        if ek not in _EK_ORDER:
            msg = f"the EK kind is rsa, ecc or auto, not {ek!r}"
            raise ValueError(msg)
        if app_pcr not in _RESETTABLE:
            msg = f"the application PCR must be a resettable one ({', '.join(map(str, _RESETTABLE))}), not {app_pcr}"
            raise ValueError(msg)
        boot = sorted({int(p) for p in boot_pcrs} - {app_pcr})
        if any(not 0 <= p <= 23 for p in boot):
            msg = "PCR indices run from 0 to 23"
            raise ValueError(msg)
        os.environ.setdefault("TSS2_LOG", "all+none")  # tpm2-tss logs to stderr otherwise; errors are raised
        try:
            from tpm2_pytss import ESAPI, TSS2_Exception
        except ImportError as exc:
            why = "tpm2-pytss is not installed; pip install 'mesatee_notebook[tpm]'"
            raise _unavailable(tcti, why) from exc
        self.tcti = tcti
        self.app_pcr = app_pcr
        self.pcrs = tuple(sorted((*boot, app_pcr)))
        self._lock = threading.Lock()
        self._closed = False
        self._ek: Any = None
        self._ak: Any = None
        self.ek_kind = ""  # "rsa" or "ecc" once a certified EK is found
        self.event_log: list[dict[str, Any]] = []  # this launch's extends of the application PCR
        self._next_session: Any = None  # the next activation's policy session, started ahead of time
        self.errors: tuple[type[BaseException], ...] = (TSS2_Exception,)
        # what tpm2-pytss raises for a client's malformed credential blob, besides the TPM's own refusal
        self.challenge_errors: tuple[type[BaseException], ...] = (
            TSS2_Exception,
            ValueError,
            TypeError,
            IndexError,
            OverflowError,
        )
        try:
            self._esapi = ESAPI(tcti)
        except (TSS2_Exception, RuntimeError) as exc:
            raise _unavailable(tcti, _explain(exc)) from exc
        try:
            self.vendor, self.kind = self._identify()
            self._ek, self.ek_cert = self._load_ek(with_ek, ek)
            self._ak, self.ak_public = self._create_ak()
        except TSS2_Exception as exc:
            self._esapi.close()
            raise _unavailable(tcti, _explain(exc)) from exc
        self.prepare_activation()

    def _identify(self) -> tuple[str, str]:
        from tpm2_pytss import TPM2_CAP, TPM2_PT

        _, data = self._esapi.get_capability(TPM2_CAP.TPM_PROPERTIES, TPM2_PT.MANUFACTURER, 5)
        props = {int(p.property): int(p.value) for p in data.data.tpmProperties.tpmProperty}

        def text(*keys: int) -> str:
            raw = b"".join(props.get(k, 0).to_bytes(4, "big") for k in keys)
            return raw.replace(b"\0", b" ").decode("ascii", "replace").strip()

        base = int(TPM2_PT.MANUFACTURER)
        manufacturer, vendor = text(base), " ".join(text(base + 1, base + 2, base + 3, base + 4).split())
        kind = "software" if vendor.upper() in _SOFTWARE_VENDORS else "hardware"
        return f"{manufacturer} {vendor}".strip(), kind

    def _load_ek(self, load: bool, ek: str) -> tuple[Any, bytes]:
        """A certified low-range EK (TCG L-1 RSA 2048, L-2 ECC P-256): its NV certificate, and the EK if ``load``.

        The EK is created from the TCG template, so it is the certified key.
        ``ek``: ``rsa``, ``ecc`` or ``auto`` (RSA if certified, else ECC).
        """
        from tpm2_pytss import ESYS_TR
        from tpm2_pytss.utils import NVReadEK, create_ek_template

        for kind in _EK_ORDER[ek]:
            cert, template = create_ek_template(_EK_TEMPLATES[kind], NVReadEK(self._esapi))
            if cert:
                break
        else:
            log.warning("the TPM has no %s EK certificate in NV: clients can only pin its AK", "/".join(_EK_ORDER[ek]))
            return None, b""
        self.ek_kind = kind
        if not load:
            return None, bytes(cert)
        handle, *_ = self._esapi.create_primary(None, template, ESYS_TR.ENDORSEMENT)
        return handle, bytes(cert)

    def _ek_session(self) -> Any:
        """A policy session satisfying the EK's policy, PolicySecret(endorsement); the TPM ends it after one use."""
        from tpm2_pytss import ESYS_TR, TPM2_ALG, TPM2_SE, TPMA_SESSION, TPMT_SYM_DEF

        session = self._esapi.start_auth_session(
            ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.POLICY, TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL), TPM2_ALG.SHA256
        )
        try:
            self._esapi.policy_secret(ESYS_TR.ENDORSEMENT, session)
            self._esapi.trsess_set_attributes(session, 0, TPMA_SESSION.CONTINUESESSION)  # no flush round trip
        except BaseException:
            self._flush(session)
            raise
        return session

    def prepare_activation(self) -> None:
        """Start the next activation's policy session now, off a connection's critical path (two TPM commands)."""
        with self._lock:
            if self._closed or self._ek is None or self._next_session is not None:
                return
            try:
                self._next_session = self._ek_session()
            except self.errors as exc:
                log.warning("the TPM did not start a policy session ahead of time: %s", _explain(exc))

    def activate_credential(self, blob: bytes, secret: bytes) -> bytes:
        """``TPM2_ActivateCredential`` of a client's challenge for the AK, under the EK (PolicySecret).

        The policy session was started ahead of time (:meth:`prepare_activation`), so a connection waits for one
        TPM command; the next one is prepared in the background right after.
        """
        from tpm2_pytss import ESYS_TR, TPM2B_ENCRYPTED_SECRET, TPM2B_ID_OBJECT

        if self._ek is None:
            msg = "this TPM has no EK certificate, so there is no EK to activate a credential with"
            raise _unavailable(self.tcti, msg)
        with self._lock:
            session, self._next_session = self._next_session, None
            if session is None:
                session = self._ek_session()
            try:
                out = self._esapi.activate_credential(
                    self._ak,
                    self._ek,
                    TPM2B_ID_OBJECT(credential=blob),
                    TPM2B_ENCRYPTED_SECRET(secret=secret),
                    session1=ESYS_TR.PASSWORD,
                    session2=session,
                )
            except BaseException:
                self._flush(session)  # a failed command leaves the session loaded
                raise
        threading.Thread(target=self.prepare_activation, name="tpm-session", daemon=True).start()
        return bytes(out)

    def _create_ak(self) -> tuple[Any, bytes]:
        from tpm2_pytss import ESYS_TR, TPM2B_PUBLIC, TPMA_OBJECT

        attrs = (
            TPMA_OBJECT.RESTRICTED
            | TPMA_OBJECT.SIGN_ENCRYPT
            | TPMA_OBJECT.FIXEDTPM
            | TPMA_OBJECT.FIXEDPARENT
            | TPMA_OBJECT.SENSITIVEDATAORIGIN
            | TPMA_OBJECT.USERWITHAUTH
        )
        template = TPM2B_PUBLIC.parse("ecc256:ecdsa-sha256:null", objectAttributes=attrs, nameAlg="sha256")
        handle, public, *_ = self._esapi.create_primary(None, template, ESYS_TR.ENDORSEMENT)
        return handle, bytes(public.publicArea.marshal())

    def _pcr_handle(self, index: int) -> Any:
        from tpm2_pytss import ESYS_TR

        return getattr(ESYS_TR, f"PCR{index}")

    def _selection(self) -> str:
        return "sha256:" + ",".join(map(str, self.pcrs))

    def measured_launch(self, measurement: str) -> str:
        """Reset the application PCR and extend ``measurement`` into it; return the PCR value."""
        from tpm2_pytss import TPM2_ALG, TPML_DIGEST_VALUES, TPMT_HA, TPMU_HA

        digest = bytes.fromhex(measurement)
        with self._lock:
            handle = self._pcr_handle(self.app_pcr)
            self._esapi.pcr_reset(handle)
            self._esapi.pcr_extend(
                handle, TPML_DIGEST_VALUES([TPMT_HA(hashAlg=TPM2_ALG.SHA256, digest=TPMU_HA(sha256=digest))])
            )
        # The measured-launch event log: what was extended into the application PCR since its reset. A client
        # replays it against the quoted value (attestation/tpm.py, replay_event_log).
        self.event_log = [{"pcr": self.app_pcr, "type": KERNEL_EVENT, "digest": measurement}]
        value = self.read_pcrs()[self.app_pcr]
        if value != hashlib.sha256(bytes(32) + digest).hexdigest():
            msg = f"PCR {self.app_pcr} does not hold the measurement after extending it: another process uses it"
            raise _unavailable(self.tcti, msg)
        log.info("measured launch: PCR %d = %s (TPM %s, %s)", self.app_pcr, value[:16], self.vendor, self.kind)
        return value

    def read_pcrs(self) -> dict[int, str]:
        """The selected SHA-256 PCR values (the TPM returns at most 8 per read)."""
        out: dict[int, str] = {}
        with self._lock:
            pending = list(self.pcrs)
            while pending:
                try:
                    _, selected, values = self._esapi.pcr_read("sha256:" + ",".join(map(str, pending)))
                except self.errors as exc:
                    msg = f"the kernel's TPM at {self.tcti!r} did not read its PCRs: {_explain(exc)}"
                    raise LevelNotAvailableError(msg, level="tpm") from exc
                got = [i for s in selected for i in range(24) if s.pcrSelect[i // 8] >> (i % 8) & 1]
                if not got:
                    break
                out.update({i: bytes(v).hex() for i, v in zip(got, values, strict=True)})
                pending = [p for p in pending if p not in out]
        return out

    def quote(self, qualifying_data: bytes) -> tuple[bytes, bytes]:
        """A quote of the selected PCRs with ``qualifying_data``: (TPMS_ATTEST, TPMT_SIGNATURE) bytes."""
        with self._lock:
            try:
                attest, signature = self._esapi.quote(self._ak, self._selection(), qualifying_data)
            except self.errors as exc:
                msg = f"the kernel's TPM at {self.tcti!r} did not quote: {_explain(exc)}"
                raise LevelNotAvailableError(msg, level="tpm") from exc
        return bytes(attest), bytes(signature.marshal())

    # -- sealing (the kernel's sealing secret, under a PCR policy) ---------------------------------------------
    def _srk(self) -> Any:
        """The storage root key: an ECC P-256 owner-hierarchy primary from a fixed template (the same key each start).

        Restricted decrypt, noDA; flushed after each use.
        """
        from tpm2_pytss import ESYS_TR, TPM2B_PUBLIC, TPMA_OBJECT

        attrs = TPMA_OBJECT.DEFAULT_TPM2_TOOLS_CREATEPRIMARY_ATTRS | TPMA_OBJECT.NODA
        template = TPM2B_PUBLIC.parse("ecc256:aes128cfb", objectAttributes=attrs, nameAlg="sha256")
        handle, *_ = self._esapi.create_primary(None, template, ESYS_TR.OWNER)
        return handle

    def _session(self, kind: Any, salt_key: Any, attributes: int) -> Any:
        """An auth session salted by ``salt_key`` (AES-128-CFB parameter encryption) with ``attributes``."""
        from tpm2_pytss import ESYS_TR, TPM2_ALG, TPMA_SESSION, TPMT_SYM_DEF, TPMU_SYM_KEY_BITS, TPMU_SYM_MODE

        sym = TPMT_SYM_DEF(
            algorithm=TPM2_ALG.AES, keyBits=TPMU_SYM_KEY_BITS(aes=128), mode=TPMU_SYM_MODE(aes=TPM2_ALG.CFB)
        )
        session = self._esapi.start_auth_session(salt_key, ESYS_TR.NONE, kind, sym, TPM2_ALG.SHA256)
        self._esapi.trsess_set_attributes(session, TPMA_SESSION.CONTINUESESSION | attributes)
        return session

    def _flush(self, *handles: Any) -> None:
        for handle in handles:
            if handle is not None:
                try:
                    self._esapi.flush_context(handle)
                except self.errors:
                    pass

    @contextlib.contextmanager
    def _ek_swapped_out(self) -> Iterator[None]:
        """Park the EK's context while the SRK and a sealed object load (swtpm holds three transient objects)."""
        saved = None
        if self._ek is not None:
            saved = self._esapi.context_save(self._ek)
            self._esapi.flush_context(self._ek)
            self._ek = None
        try:
            yield
        finally:
            if saved is not None:
                self._ek = self._esapi.context_load(saved)

    def pcr_policy(self, values: dict[int, str]) -> bytes:
        """The ``TPM2_PolicyPCR`` digest over the quoted PCRs (``self.pcrs``) holding ``values`` (trial session)."""
        from tpm2_pytss import ESYS_TR, TPM2_ALG, TPM2_SE, TPMT_SYM_DEF

        if sorted(values) != list(self.pcrs):
            msg = f"a PCR policy needs values for PCRs {list(self.pcrs)}, got {sorted(values)}"
            raise ValueError(msg)
        digest = hashlib.sha256(b"".join(bytes.fromhex(values[i]) for i in self.pcrs)).digest()
        with self._lock:
            trial = self._esapi.start_auth_session(
                ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.TRIAL, TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL), TPM2_ALG.SHA256
            )
            try:
                self._esapi.policy_pcr(trial, digest, self._selection())
                return bytes(self._esapi.policy_get_digest(trial))
            finally:
                self._flush(trial)

    def seal(self, secret: bytes, policy: bytes) -> tuple[bytes, bytes]:
        """Seal ``secret`` under the SRK as a data object only ``policy`` unseals: (TPM2B_PUBLIC, TPM2B_PRIVATE).

        userWithAuth is clear, so there is no password path around the policy.
        """
        from tpm2_pytss import (
            TPM2_ALG,
            TPM2B_PUBLIC,
            TPM2B_SENSITIVE_CREATE,
            TPM2B_SENSITIVE_DATA,
            TPMA_OBJECT,
            TPMA_SESSION,
            TPMS_KEYEDHASH_PARMS,
            TPMS_SENSITIVE_CREATE,
            TPMT_KEYEDHASH_SCHEME,
            TPMT_PUBLIC,
            TPMU_PUBLIC_PARMS,
        )

        public = TPM2B_PUBLIC(
            publicArea=TPMT_PUBLIC(
                type=TPM2_ALG.KEYEDHASH,
                nameAlg=TPM2_ALG.SHA256,
                objectAttributes=TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT,
                authPolicy=policy,
                parameters=TPMU_PUBLIC_PARMS(
                    keyedHashDetail=TPMS_KEYEDHASH_PARMS(scheme=TPMT_KEYEDHASH_SCHEME(scheme=TPM2_ALG.NULL))
                ),
            )
        )
        sensitive = TPM2B_SENSITIVE_CREATE(sensitive=TPMS_SENSITIVE_CREATE(data=TPM2B_SENSITIVE_DATA(secret)))
        with self._lock, self._ek_swapped_out():
            srk = self._srk()
            session = None
            try:  # the secret travels to the TPM encrypted (decrypt session salted by the SRK)
                session = self._session(_hmac_kind(), srk, TPMA_SESSION.DECRYPT)
                private, out_public, *_ = self._esapi.create(srk, sensitive, public, session1=session)
            finally:
                self._flush(session, srk)
        return bytes(out_public.marshal()), bytes(private.marshal())

    def unseal(self, public: bytes, private: bytes) -> bytes:
        """Load a sealed object under the SRK and unseal it through a PolicyPCR session over the current PCRs.

        The reply is encrypted (session salted by the SRK). A PCR that differs from the sealed policy
        makes the TPM refuse (``TSS2_Exception``, "a policy check failed").
        """
        from tpm2_pytss import TPM2_SE, TPM2B_PRIVATE, TPM2B_PUBLIC, TPMA_SESSION

        with self._lock, self._ek_swapped_out():
            srk = self._srk()
            item = session = None
            try:
                item = self._esapi.load(srk, TPM2B_PRIVATE.unmarshal(private)[0], TPM2B_PUBLIC.unmarshal(public)[0])
                session = self._session(TPM2_SE.POLICY, srk, TPMA_SESSION.ENCRYPT)
                self._esapi.policy_pcr(session, None, self._selection())
                return bytes(self._esapi.unseal(item, session1=session))
            finally:
                self._flush(session, item, srk)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._flush(self._next_session, self._ak, self._ek)
            self._esapi.close()

    def __enter__(self) -> Tpm:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def _hmac_kind() -> Any:
    from tpm2_pytss import TPM2_SE

    return TPM2_SE.HMAC


def _explain(exc: BaseException) -> str:
    text = str(exc)
    if "out of memory for object contexts" in text:
        text += (
            ": the TPM has no free object slot. swtpm without a resource manager keeps the objects of clients "
            "that died; restart it, or reach it through tpm2-abrmd"
        )
    return text


def open_tpm(
    tcti: str | None,
    *,
    app_pcr: int = APP_PCR_DEFAULT,
    boot_pcrs: Iterable[int] = BOOT_PCRS_DEFAULT,
    with_ek: bool = True,
    ek: str = "auto",
) -> Tpm:
    """Open the TPM at ``tcti``; without one, the level stays unavailable with a clear reason."""
    if not tcti:
        msg = (
            "security level 'tpm' is not available on this platform: no TPM was given. Serve with --tcti "
            "device:/dev/tpmrm0 (a TPM chip) or --tcti swtpm:host=127.0.0.1,port=2321 (swtpm, a software TPM)"
        )
        raise LevelNotAvailableError(msg, level="tpm")
    return Tpm(tcti, app_pcr=app_pcr, boot_pcrs=boot_pcrs, with_ek=with_ek, ek=ek)
