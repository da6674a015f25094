"""The one exception tree of mesatee_notebook.

Every error the package raises on purpose derives from :class:`MesateeError`.
A leaf also subclasses the builtin it resembles, so ``except ValueError`` code
keeps working::

    MesateeError
    ├── KernelConnectionError (ConnectionError)      cannot reach or keep the kernel
    ├── AttestationError                             the peer's evidence was refused
    │   ├── MalformedEvidence (ValueError)           evidence or certificate cannot be parsed
    │   ├── EvidenceSignatureError                   a signature over the evidence does not verify
    │   │   └── ChainBroken                          a certificate in the chain is not signed by the next one
    │   ├── UntrustedPlatform                        the platform root is not one the policy pins
    │   │   ├── RootNotTrusted                       the chain ends at a root not pinned for this evidence
    │   │   ├── MissingEndorsement                   the certificate that vouches (e.g. the VCEK) was not given
    │   │   ├── EndorsementMismatch                  the endorsement was issued for another chip or TCB
    │   │   └── TcbTooLow                            the platform's TCB is below the policy's minimum
    │   ├── MeasurementMismatch                      the code measurement is not an accepted one
    │   ├── KeyBindingError                          report data does not commit to the TLS/receipt keys
    │   ├── StaleEvidence                            evidence older than the policy's maximum age
    │   ├── LevelTooLow                              the level is below the policy's minimum
    │   ├── UnprotectedNotAllowed                    an unprotected kernel without explicit opt-in
    │   ├── CertificateExpired                       a certificate outside its validity period
    │   ├── DebugNotAllowed                          a debug enclave or guest without opt-in
    │   ├── QuoteSignatureError (EvidenceSignatureError)  the AK's signature over a TPM quote fails
    │   ├── QualifyingDataMismatch (KeyBindingError) a TPM quote's qualifying data is not this evidence's
    │   ├── ReplayedQuote (StaleEvidence)            a TPM quote that does not commit to this connection's nonce
    │   ├── PcrDigestMismatch                        reported PCR values are not the ones the TPM quoted
    │   ├── PcrMismatch (MeasurementMismatch)        a PCR differs from the policy or the expected measurement
    │   │   ├── AppPcrMismatch                       the application PCR does not hold the accepted measurement
    │   │   ├── EventLogMismatch                     the kernel's launch event log does not replay to the quoted PCR
    │   │   └── BootPcrMismatch                      a boot PCR differs from the policy's golden value
    │   ├── UntrustedAttestationKey (UntrustedPlatform)  a TPM AK the policy does not pin
    │   ├── EkChainError (UntrustedPlatform)         a TPM's EK certificate does not chain to a pinned CA
    │   ├── CredentialActivationFailed               the TPM could not prove the AK sits beside the certified EK
    │   ├── SoftwareTpmNotAllowed                    a software (or uncertified) TPM the policy refuses
    │   └── SandboxRequired                          the kernel runs cells without the sandbox the policy requires
    ├── LevelNotAvailableError (RuntimeError)        no provider for that level on this platform
    │   ├── HardwareLevelUnavailable                 serve --level sgx|tdx|sev-snp: no such TEE here, or not built
    │   └── SandboxUnavailable                       this host lacks what the executor sandbox needs (named)
    ├── PolicyViolation (PermissionError)            a data owner's or kernel policy refused the request
    │   └── QuotaExceeded                            a party's (or the anonymous) quota is used up (names the limit)
    ├── RemoteExecutionError                         the cell failed in the enclave (remote traceback)
    │   ├── ExecutorCrashed                          the executor process died (killed, segfault, OOM kill)
    │   ├── RemoteTimeout (TimeoutError)             the cell ran past its timeout and was stopped
    │   ├── ResourceLimitExceeded                    the cell hit its sandbox's memory, CPU, process or file limit
    │   │   └── ResourceExhausted                    a function ran out of WebAssembly fuel, wall time or memory
    │   ├── WasmError                                a malformed module, a missing import, a trap
    │   └── RemoteInterrupted                        the cell was interrupted
    ├── ProtocolError                                the peer broke the wire protocol
    │   ├── VersionMismatch                          the two sides speak different protocol versions
    │   ├── FrameTooLarge                            a header or payload over the configured limit
    │   └── MalformedFrame (ValueError)              bytes that are not a valid frame or message
    ├── ReceiptError (ValueError)                    a receipt that does not verify or does not match
    ├── EncodingError (TypeError)                    a value that cannot be sent (names the type and the way out)
    ├── FrameUsageError (TypeError)                  a lazy SecureDataFrame used as if it held data (bool, iter, ...)
    │   └── FrameNotSupported (AttributeError)       a pandas call the enclave does not evaluate, and why
    ├── SealingError                                 sealed storage refused a read or write
    │   └── TamperedData                             a sealed file was changed, truncated or swapped
    ├── NotFound (KeyError)                          an unknown session, dataset, job or handle
    ├── MLInputError (ValueError)                    data or arguments an ML engine cannot use
    │   ├── MissingLabel                             the label column is not in the DataFrame
    │   ├── NonNumericFeatures                       feature columns that are not numbers (named)
    │   ├── InvalidLabels                            NaN labels, or labels the objective cannot take
    │   ├── FeatureMismatch                          features at predict differ from training
    │   └── InputShapeError                          a tensor's name, shape or dtype does not fit
    ├── ModelFormatError (ValueError)                model bytes that cannot be parsed (xgboost JSON, ONNX)
    ├── NotAvailableYet (NotImplementedError)        a documented feature this kernel does not implement yet
    ├── ClusterSetupError (RuntimeError)             a local cluster cannot start (worker count, port, root, extra)
    ├── UnsupportedOperator (NotImplementedError)    ONNX ops the TVM frontend cannot import (named)
    └── CompileError (RuntimeError)                  a native compiler (gcc, TVM) failed
        └── CompileTimeout (TimeoutError)            compilation or tuning ran past its timeout

Errors cross the wire as ``{"code": ..., "message": ..., ...}``, never pickled;
:func:`error_from_wire` rebuilds the local class from the code, through the explicit registry at the end of this
module (one class per code, fixed at import: subclasses made elsewhere, e.g. for display, never enter it).

Why this module is over ~500 lines: the one error tree, drawn above and defined below; each class is a few lines,
and the explicit wire registry must sit beside the classes it lists (a test checks they agree).

Why this module is over ~500 lines: the one error tree, drawn above and defined below; each class is a few lines,
and the explicit wire registry must sit beside the classes it lists (a test checks they agree).
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "ClusterSetupError",
    "NotAvailableYet",
    "ResourceExhausted",
    "WasmError",
    "UnsupportedOperator",
    "NonNumericFeatures",
    "ModelFormatError",
    "MissingLabel",
    "MLInputError",
    "InvalidLabels",
    "InputShapeError",
    "FeatureMismatch",
    "CompileTimeout",
    "CompileError",
    "AttestationError",
    "PcrDigestMismatch",
    "PcrMismatch",
    "AppPcrMismatch",
    "EventLogMismatch",
    "BootPcrMismatch",
    "QualifyingDataMismatch",
    "QuoteSignatureError",
    "ReplayedQuote",
    "SoftwareTpmNotAllowed",
    "UntrustedAttestationKey",
    "EkChainError",
    "CredentialActivationFailed",
    "CertificateExpired",
    "ChainBroken",
    "EndorsementMismatch",
    "MissingEndorsement",
    "RootNotTrusted",
    "TcbTooLow",
    "DebugNotAllowed",
    "EncodingError",
    "EvidenceSignatureError",
    "ExecutorCrashed",
    "FrameTooLarge",
    "FrameNotSupported",
    "FrameUsageError",
    "KernelConnectionError",
    "KeyBindingError",
    "HardwareLevelUnavailable",
    "LevelNotAvailableError",
    "LevelTooLow",
    "MalformedEvidence",
    "MalformedFrame",
    "MeasurementMismatch",
    "MesateeError",
    "NotFound",
    "PolicyViolation",
    "ProtocolError",
    "QuotaExceeded",
    "ReceiptError",
    "RemoteExecutionError",
    "RemoteInterrupted",
    "RemoteTimeout",
    "ResourceLimitExceeded",
    "SandboxRequired",
    "SandboxUnavailable",
    "SealingError",
    "StaleEvidence",
    "TamperedData",
    "UnprotectedNotAllowed",
    "UntrustedPlatform",
    "VersionMismatch",
    "error_from_wire",
]


class MesateeError(Exception):
    """Root of every error mesatee_notebook raises on purpose."""

    code: ClassVar[str] = "error"

    def __init__(self, message: str = "", **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_wire(self) -> dict[str, Any]:
        """Return the typed, pickle-free form that crosses the wire."""
        return {"code": self.code, "message": self.message, "details": _plain(self.details)}

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, self.details))


def _rebuild(cls: type[MesateeError], message: str, details: dict[str, Any]) -> MesateeError:
    return cls(message, **details)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool, bytes)):
        return value
    return str(value)


class KernelConnectionError(MesateeError, ConnectionError):
    """The kernel cannot be reached, or the connection broke."""

    code = "connection"


class AttestationError(MesateeError):
    """The peer's evidence was refused; ``check`` names the check that failed."""

    code = "attestation"
    check: ClassVar[str] = "attestation"


class MalformedEvidence(AttestationError, ValueError):
    """Evidence, a quote, a report or a certificate could not be parsed."""

    code = "attestation.malformed"
    check = "parse"


class EvidenceSignatureError(AttestationError):
    """A signature over the evidence (or in its chain) does not verify."""

    code = "attestation.signature"
    check = "signature"


class UntrustedPlatform(AttestationError):
    """The evidence is signed by a platform root the policy does not pin."""

    code = "attestation.platform"
    check = "platform-root"


class MeasurementMismatch(AttestationError):
    """The enclave's measurement is not one the policy accepts."""

    code = "attestation.measurement"
    check = "measurement"


class KeyBindingError(AttestationError):
    """The report data does not commit to the peer's TLS and receipt keys."""

    code = "attestation.key-binding"
    check = "key-binding"


class StaleEvidence(AttestationError):
    """The evidence is older than the policy allows (or from the future)."""

    code = "attestation.stale"
    check = "freshness"


class LevelTooLow(AttestationError):
    """The kernel's security level is below the policy's minimum."""

    code = "attestation.level"
    check = "level"


class UnprotectedNotAllowed(AttestationError):
    """An unprotected kernel, and the caller did not opt in."""

    code = "attestation.unprotected"
    check = "level"


class CertificateExpired(AttestationError):
    """A certificate is outside its validity period."""

    code = "attestation.expired"
    check = "validity"


class DebugNotAllowed(AttestationError):
    """A debug enclave or debug guest, and the policy does not allow debug."""

    code = "attestation.debug"
    check = "debug"


class ChainBroken(EvidenceSignatureError):
    """A certificate in the chain is not signed by the next one (or not a CA)."""

    code = "attestation.signature.chain"
    check = "certificate chain"


class RootNotTrusted(UntrustedPlatform):
    """The chain ends at a root that is not pinned for this kind of evidence."""

    code = "attestation.platform.root"
    check = "platform root"


class MissingEndorsement(UntrustedPlatform):
    """The certificate that would vouch for the evidence (e.g. the VCEK) was not supplied."""

    code = "attestation.platform.missing"
    check = "endorsement key"


class EndorsementMismatch(UntrustedPlatform):
    """The endorsement certificate was issued for another chip or another TCB."""

    code = "attestation.platform.mismatch"
    check = "endorsement match"


class TcbTooLow(UntrustedPlatform):
    """The platform's reported TCB is below the policy's minimum."""

    code = "attestation.platform.tcb"
    check = "minimum TCB"


class QuoteSignatureError(EvidenceSignatureError):
    """The attestation key's signature over a TPM quote does not verify, or names another key."""

    code = "attestation.quote-signature"
    check = "quote-signature"


class QualifyingDataMismatch(KeyBindingError):
    """A TPM quote's qualifying data does not commit to the evidence (and so to the TLS/receipt keys)."""

    code = "attestation.qualifying-data"
    check = "qualifying-data"


class ReplayedQuote(StaleEvidence):
    """A connection's TPM quote does not commit to the nonce the client sent on it."""

    code = "attestation.replay"
    check = "fresh-quote"


class PcrDigestMismatch(AttestationError):
    """The PCR values the evidence reports are not the ones the TPM digested into the quote."""

    code = "attestation.pcr-digest"
    check = "pcr-digest"


class PcrMismatch(MeasurementMismatch):
    """A PCR differs from the policy's golden value, or the application PCR from the measurement."""

    code = "attestation.pcr"
    check = "pcr"


class AppPcrMismatch(PcrMismatch):
    """The application PCR is not SHA-256(0^32 || measurement) for the accepted measurement."""

    code = "attestation.pcr.app"
    check = "app-pcr"


class BootPcrMismatch(PcrMismatch):
    """A boot PCR the policy names is missing from the quote or differs from its golden value."""

    code = "attestation.pcr.boot"
    check = "boot-pcr"


class EventLogMismatch(PcrMismatch):
    """Replaying the kernel's measured-launch event log does not give the quoted application PCR."""

    code = "attestation.pcr.event-log"
    check = "event-log"


class UntrustedAttestationKey(UntrustedPlatform):
    """A TPM attestation key the policy does not pin."""

    code = "attestation.ak"
    check = "attestation-key"


class EkChainError(UntrustedPlatform):
    """A TPM's EK certificate is missing, or does not chain to an EK CA the policy pins."""

    code = "attestation.ek-chain"
    check = "ek-chain"


class CredentialActivationFailed(AttestationError):
    """TPM2_ActivateCredential did not return the client's secret: the AK is not in the certified TPM."""

    code = "attestation.activation"
    check = "credential-activation"


class SoftwareTpmNotAllowed(AttestationError):
    """A software TPM (or one no manufacturer certificate vouches for), and the policy refuses those."""

    code = "attestation.software-tpm"
    check = "tpm-kind"


class SandboxRequired(AttestationError):
    """The kernel runs cells without the sandbox this policy requires (``--no-sandbox``)."""

    code = "attestation.sandbox"
    check = "sandbox"


class LevelNotAvailableError(MesateeError, RuntimeError):
    """No evidence provider or verifier exists for that level on this platform."""

    code = "level-unavailable"


class HardwareLevelUnavailable(LevelNotAvailableError):
    """``serve --level sgx|tdx|sev-snp``: no such TEE here, or serving on it is not built; see ``details``."""

    code = "level-unavailable.hardware"


class SandboxUnavailable(LevelNotAvailableError):
    """The host lacks a mechanism the executor sandbox needs; ``details["missing"]`` names each."""

    code = "level-unavailable.sandbox"


class PolicyViolation(MesateeError, PermissionError):
    """A data owner's policy, or the kernel's, refused the request."""

    code = "policy"


class QuotaExceeded(PolicyViolation):
    """A per-party (or anonymous) quota is used up.

    ``details`` names the ``limit`` (sessions, executors, sealed_bytes, concurrent_calls), its ``value``,
    what is ``used``, and the ``flag`` of ``mesatee-enclave serve`` that raises it.
    """

    code = "policy.quota"


class RemoteExecutionError(MesateeError):
    """Code failed inside the enclave. ``remote_traceback`` holds the user's lines."""

    code = "remote"

    @property
    def ename(self) -> str:
        """Name of the remote exception class, e.g. ``ZeroDivisionError``."""
        return str(self.details.get("ename", type(self).__name__))

    @property
    def remote_traceback(self) -> str:
        """The remote traceback, limited to the user's cell lines."""
        return str(self.details.get("traceback", ""))

    def _render_traceback_(self) -> list[str]:
        """The user's remote lines, then what happened when the traceback does not say it.

        A timeout or an interrupt stops the cell with a remote ``KeyboardInterrupt``; that alone would be all a
        notebook shows, so the explanation (the limit, and that the session is intact) follows it.
        """
        tb = self.remote_traceback.rstrip("\n")
        head = "Remote error in the enclave kernel (mesatee)"
        lines = [head]
        lines.extend(tb.splitlines() if tb else [f"{self.ename}: {self.message}"])
        if tb and self.message and self.message not in tb:
            lines.append(f"{type(self).__name__}: {self.message}")
        return lines


class ExecutorCrashed(RemoteExecutionError):
    """The session's executor process died; restart the session to go on."""

    code = "remote.crashed"


class RemoteTimeout(RemoteExecutionError, TimeoutError):
    """The cell ran past its timeout and the executor was stopped."""

    code = "remote.timeout"


class ResourceLimitExceeded(RemoteExecutionError):
    """The cell hit a limit of its sandbox; ``details["limit"]`` names it (memory, cpu, processes, ...)."""

    code = "remote.limit"


class ResourceExhausted(ResourceLimitExceeded):
    """A registered function ran out of its metered budget (WebAssembly fuel, epoch wall time, memory)."""

    code = "remote.limit.exhausted"


class WasmError(RemoteExecutionError):
    """A WebAssembly module is malformed, imports what is not provided, or trapped."""

    code = "remote.wasm"


class NotAvailableYet(MesateeError, NotImplementedError):
    """A documented feature this kernel does not implement yet; the message says which."""

    code = "not-available"


class RemoteInterrupted(RemoteExecutionError):
    """The cell was interrupted (KeyboardInterrupt in the enclave)."""

    code = "remote.interrupted"


class ProtocolError(MesateeError):
    """The peer broke the wire protocol."""

    code = "protocol"


class VersionMismatch(ProtocolError):
    """Client and kernel speak different protocol versions."""

    code = "protocol.version"


class FrameTooLarge(ProtocolError):
    """A header or payload is over the configured limit."""

    code = "protocol.too-large"


class MalformedFrame(ProtocolError, ValueError):
    """Bytes that are not a valid frame or message."""

    code = "protocol.malformed"


class ReceiptError(MesateeError, ValueError):
    """A receipt does not verify, or does not match the request or outputs."""

    code = "receipt"


class EncodingError(MesateeError, TypeError):
    """A value cannot be encoded for the wire; the message names the way out."""

    code = "encoding"


class FrameUsageError(MesateeError, TypeError):
    """A lazy remote frame was used in a way that would need its data (``bool``, iteration, ...)."""

    code = "frame.usage"


class FrameNotSupported(FrameUsageError, AttributeError):
    """A pandas call that a SecureDataFrame does not evaluate in the enclave; the message says why."""

    code = "frame.unsupported"


class SealingError(MesateeError):
    """Sealed storage refused a read or a write."""

    code = "sealing"


class TamperedData(SealingError):
    """A sealed file was modified, truncated or swapped for another."""

    code = "sealing.tampered"


class NotFound(MesateeError, KeyError):
    """An unknown session, dataset, job or handle."""

    code = "not-found"

    def __str__(self) -> str:
        return self.message


# -- ML engines (re-exported by mesatee_notebook.ml._errors) ---------------------------------


class MLInputError(MesateeError, ValueError):
    """Data or arguments an ML engine cannot use."""

    code = "ml.input"


class MissingLabel(MLInputError):
    """The label column named by the caller is not in the DataFrame."""

    code = "ml.input.missing-label"


class NonNumericFeatures(MLInputError):
    """Feature columns that are not numeric; ``details['columns']`` names them."""

    code = "ml.input.non-numeric"


class InvalidLabels(MLInputError):
    """Labels that are NaN or outside what the objective accepts."""

    code = "ml.input.labels"


class FeatureMismatch(MLInputError):
    """Features given at predict time differ from those the model was trained on."""

    code = "ml.input.feature-mismatch"


class InputShapeError(MLInputError):
    """A tensor input whose name, shape or dtype does not fit the compiled model."""

    code = "ml.input.shape"


class ModelFormatError(MesateeError, ValueError):
    """Model bytes that cannot be parsed as the expected format."""

    code = "ml.model-format"


class ClusterSetupError(MesateeError, RuntimeError):
    """``mesatee-enclave cluster up`` cannot start a local cluster; the message names what to change.

    A worker count out of range, a port in use, ``--netns`` without root, the cluster extra missing.
    """

    code = "cluster.setup"


class UnsupportedOperator(MesateeError, NotImplementedError):
    """The model uses operators the compiler cannot import; ``details['ops']`` lists them."""

    code = "ml.unsupported-op"


class CompileError(MesateeError, RuntimeError):
    """A native compiler (gcc through tl2cgen, or TVM) failed."""

    code = "ml.compile"


class CompileTimeout(CompileError, TimeoutError):
    """Compilation or tuning ran past its timeout and was stopped."""

    code = "ml.compile.timeout"


def _all_subclasses(cls: type[MesateeError]) -> list[type[MesateeError]]:
    out: list[type[MesateeError]] = [cls]
    for sub in cls.__subclasses__():
        out.extend(_all_subclasses(sub))
    return out


# Every class that crosses the wire, by its code. Written out, not discovered: `__subclasses__()` also finds
# classes made at runtime (the notebook's short-rendering subclasses share their parent's code), so a registry
# built from it would depend on what ran before. A test checks this tuple holds every class defined here.
WIRE_CLASSES: tuple[type[MesateeError], ...] = (
    MesateeError,
    KernelConnectionError,
    AttestationError,
    MalformedEvidence,
    EvidenceSignatureError,
    ChainBroken,
    UntrustedPlatform,
    RootNotTrusted,
    MissingEndorsement,
    EndorsementMismatch,
    TcbTooLow,
    MeasurementMismatch,
    KeyBindingError,
    StaleEvidence,
    LevelTooLow,
    UnprotectedNotAllowed,
    CertificateExpired,
    DebugNotAllowed,
    QuoteSignatureError,
    QualifyingDataMismatch,
    ReplayedQuote,
    PcrDigestMismatch,
    PcrMismatch,
    AppPcrMismatch,
    EventLogMismatch,
    BootPcrMismatch,
    UntrustedAttestationKey,
    EkChainError,
    CredentialActivationFailed,
    SoftwareTpmNotAllowed,
    SandboxRequired,
    LevelNotAvailableError,
    HardwareLevelUnavailable,
    SandboxUnavailable,
    PolicyViolation,
    QuotaExceeded,
    RemoteExecutionError,
    ExecutorCrashed,
    RemoteTimeout,
    ResourceLimitExceeded,
    ResourceExhausted,
    WasmError,
    RemoteInterrupted,
    ProtocolError,
    VersionMismatch,
    FrameTooLarge,
    MalformedFrame,
    ReceiptError,
    EncodingError,
    FrameUsageError,
    FrameNotSupported,
    SealingError,
    TamperedData,
    NotFound,
    MLInputError,
    MissingLabel,
    NonNumericFeatures,
    InvalidLabels,
    FeatureMismatch,
    InputShapeError,
    ModelFormatError,
    NotAvailableYet,
    ClusterSetupError,
    UnsupportedOperator,
    CompileError,
    CompileTimeout,
)


def _registry(classes: tuple[type[MesateeError], ...]) -> dict[str, type[MesateeError]]:
    out: dict[str, type[MesateeError]] = {}
    for cls in classes:
        if cls.code in out:
            msg = f"error code {cls.code!r} is used by both {out[cls.code].__name__} and {cls.__name__}"
            raise RuntimeError(msg)
        out[cls.code] = cls
    return out


_REGISTRY: dict[str, type[MesateeError]] = _registry(WIRE_CLASSES)


def error_from_wire(payload: dict[str, Any]) -> MesateeError:
    """Rebuild a local exception from its wire form; unknown codes map to the root."""
    code = str(payload.get("code", "error"))
    message = str(payload.get("message", ""))
    details = payload.get("details") or {}
    if not isinstance(details, dict):
        details = {}
    cls = _REGISTRY.get(code, MesateeError)
    return cls(message, **{str(k): v for k, v in details.items()})
