"""The public surface is pinned, and the trust boundary between client and enclave code holds."""

from __future__ import annotations

import ast
from pathlib import Path

import mesatee_notebook as mn
from mesatee_notebook import errors

PKG = Path(mn.__file__).parent


def test_exported_names_are_pinned():
    assert sorted(mn.__all__) == sorted(
        [
            "AttestationError",
            "AttestationReport",
            "EncodingError",
            "KernelConnectionError",
            "Level",
            "LevelNotAvailableError",
            "MesateeError",
            "Policy",
            "PolicyViolation",
            "ProtocolError",
            "QuotaExceeded",
            "Receipt",
            "ReceiptError",
            "RemoteExecutionError",
            "ResourceExhausted",
            "ResourceLimitExceeded",
            "RunResult",
            "SandboxRequired",
            "Session",
            "UnprotectedWarning",
            "VerifiedReceipt",
            "WasmError",
            "connect",
            "expected_measurement",
            "load_ipython_extension",
            "verify_receipt",
            *sorted(EXTRA),
        ]
    )
    for name in mn.__all__:
        assert hasattr(mn, name), name


# The names the DataFrame, ML and DP work added: pinned too (removing one fails the test).
EXTRA = {
    "DP", "DPResult", "PrivacyBudget", "DataPolicy", "SecureDataFrame", "SecureSeries", "CallResult",
    "SecureXGBClassifier", "SecureXGBRegressor", "concat", "cut",
}  # fmt: skip


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def test_client_code_never_imports_enclave_or_engines():
    for sub in ("remote", "magics"):
        for path in (PKG / sub).rglob("*.py"):
            bad = {m for m in _imports(path) if m.startswith(("mesatee_notebook.enclave", "mesatee_notebook.ml"))}
            assert not bad, f"{path.relative_to(PKG)} imports {bad}"


def test_pure_layers_open_no_sockets_or_processes():
    for sub in ("attestation", "wire"):
        for path in (PKG / sub).rglob("*.py"):
            mods = _imports(path)
            if path.name == "stream.py":  # moves frames over a socket it is given; opens nothing
                assert "subprocess" not in mods
                continue
            assert not mods & {"socket", "subprocess", "ssl", "http", "urllib.request"}, path


def test_every_error_has_a_unique_wire_code_and_rebuilds():
    classes = errors._all_subclasses(errors.MesateeError)
    codes = [c.code for c in classes]
    assert len(codes) == len(set(codes))
    for cls in classes:
        err = errors.error_from_wire(cls("boom", x=1).to_wire())
        assert type(err) is cls and err.message == "boom" and err.details == {"x": 1}


def test_leaf_errors_subclass_builtins():
    assert issubclass(errors.PolicyViolation, PermissionError)
    assert issubclass(errors.QuotaExceeded, errors.PolicyViolation)
    assert issubclass(errors.RemoteTimeout, TimeoutError)
    assert issubclass(errors.EncodingError, TypeError)
    assert issubclass(errors.KernelConnectionError, ConnectionError)
