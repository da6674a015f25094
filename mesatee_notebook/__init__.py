"""mesatee_notebook: confidential data science in Jupyter.

Cells and data travel over an attested TLS channel to an enclave kernel whose code is
measured; results come back with signed receipts. See ``docs/architecture.md``.
"""

from __future__ import annotations

from typing import Any

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
from mesatee_notebook.remote.frame import DPResult, PrivacyBudget, SecureDataFrame, SecureSeries, concat, cut
from mesatee_notebook.remote.session import CallResult, RunResult, Session, connect
from mesatee_notebook.remote.session import verify_receipt_default as verify_receipt
from mesatee_notebook.wire.datapolicy import DP, DataPolicy

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
    """Import the scikit-learn style estimators on first use (scikit-learn is not imported before)."""
    if name in ("SecureXGBClassifier", "SecureXGBRegressor"):
        from mesatee_notebook.remote import estimators

        return getattr(estimators, name)
    msg = f"module 'mesatee_notebook' has no attribute {name!r}"
    raise AttributeError(msg)


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext mesatee_notebook``: register the ``%mesatee`` / ``%%mesatee`` magics."""
    from mesatee_notebook.magics import load_ipython_extension as _load

    _load(ipython)
