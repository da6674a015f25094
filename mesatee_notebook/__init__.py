"""mesatee_notebook: confidential data science in Jupyter.

Cells and data travel over an attested TLS channel to an enclave kernel whose code is
measured; results come back with signed receipts. See ``docs/architecture.md``.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mesatee_notebook.attestation.levels import Level
    from mesatee_notebook.attestation.measurement import expected_measurement
    from mesatee_notebook.attestation.policy import AttestationReport, Policy, UnprotectedWarning
    from mesatee_notebook.attestation.receipts import Receipt, VerifiedReceipt
    from mesatee_notebook.errors import (
        AttestationError,
        EncodingError,
        KernelConnectionError,
        LevelNotAvailableError,
        MesateeError,
        PolicyViolation,
        ProtocolError,
        QuotaExceeded,
        ReceiptError,
        RemoteExecutionError,
        ResourceExhausted,
        ResourceLimitExceeded,
        SandboxRequired,
        WasmError,
    )
    from mesatee_notebook.remote.estimators import SecureXGBClassifier, SecureXGBRegressor
    from mesatee_notebook.remote.frame import DPResult, PrivacyBudget, SecureDataFrame, SecureSeries, concat, cut
    from mesatee_notebook.remote.session import CallResult, RunResult, Session, connect
    from mesatee_notebook.remote.session import verify_receipt_default as verify_receipt
    from mesatee_notebook.wire.datapolicy import DP, DataPolicy

#: Where each public name lives. The package imports none of them until first use, so the kernel and its executors
#: (which import ``mesatee_notebook.enclave...``) never load the client (``remote/``), and ``import mesatee_notebook``
#: stays cheap; ``from mesatee_notebook import connect`` works as before.
_EXPORTS: dict[str, tuple[str, str]] = {
    "Level": ("attestation.levels", "Level"),
    "expected_measurement": ("attestation.measurement", "expected_measurement"),
    "AttestationReport": ("attestation.policy", "AttestationReport"),
    "Policy": ("attestation.policy", "Policy"),
    "UnprotectedWarning": ("attestation.policy", "UnprotectedWarning"),
    "Receipt": ("attestation.receipts", "Receipt"),
    "VerifiedReceipt": ("attestation.receipts", "VerifiedReceipt"),
    **{
        name: ("errors", name)
        for name in (
            "AttestationError",
            "EncodingError",
            "KernelConnectionError",
            "LevelNotAvailableError",
            "MesateeError",
            "PolicyViolation",
            "ProtocolError",
            "QuotaExceeded",
            "ReceiptError",
            "RemoteExecutionError",
            "ResourceExhausted",
            "ResourceLimitExceeded",
            "SandboxRequired",
            "WasmError",
        )
    },
    "SecureXGBClassifier": ("remote.estimators", "SecureXGBClassifier"),
    "SecureXGBRegressor": ("remote.estimators", "SecureXGBRegressor"),
    **{
        name: ("remote.frame", name)
        for name in ("DPResult", "PrivacyBudget", "SecureDataFrame", "SecureSeries", "concat", "cut")
    },
    **{name: ("remote.session", name) for name in ("CallResult", "RunResult", "Session", "connect")},
    "verify_receipt": ("remote.session", "verify_receipt_default"),
    "DP": ("wire.datapolicy", "DP"),
    "DataPolicy": ("wire.datapolicy", "DataPolicy"),
}

__version__ = "0.1.0"

__all__ = [
    "AttestationError",
    "AttestationReport",
    "CallResult",
    "DP",
    "DPResult",
    "DataPolicy",
    "EncodingError",
    "KernelConnectionError",
    "Level",
    "LevelNotAvailableError",
    "MesateeError",
    "Policy",
    "PolicyViolation",
    "PrivacyBudget",
    "ProtocolError",
    "QuotaExceeded",
    "Receipt",
    "ReceiptError",
    "RemoteExecutionError",
    "ResourceExhausted",
    "ResourceLimitExceeded",
    "WasmError",
    "RunResult",
    "SandboxRequired",
    "SecureDataFrame",
    "SecureSeries",
    "SecureXGBClassifier",
    "SecureXGBRegressor",
    "Session",
    "UnprotectedWarning",
    "VerifiedReceipt",
    "concat",
    "connect",
    "cut",
    "expected_measurement",
    "load_ipython_extension",
    "verify_receipt",
]


def __getattr__(name: str) -> Any:
    """Import a public name on first use (PEP 562); the value is then cached in the module."""
    try:
        module, attr = _EXPORTS[name]
    except KeyError:
        msg = f"module 'mesatee_notebook' has no attribute {name!r}"
        raise AttributeError(msg) from None
    value = getattr(import_module(f"mesatee_notebook.{module}"), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext mesatee_notebook``: register the ``%mesatee`` / ``%%mesatee`` magics."""
    from mesatee_notebook.magics import load_ipython_extension as _load

    _load(ipython)
