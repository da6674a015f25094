"""The public surface is pinned, and the trust boundary between client and enclave code holds."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import mesatee_notebook as mn
from mesatee_notebook import errors

PKG = Path(mn.__file__).parent


def test_exported_names_are_pinned():
    assert sorted(mn.__all__) == sorted(
        [
            "AttestationError",
            "AttestationReport",
            "CallResult",
            "DP",
            "DPResult",
            "DataPolicy",
            "PrivacyBudget",
            "SecureDataFrame",
            "SecureSeries",
            "SecureXGBClassifier",
            "SecureXGBRegressor",
            "concat",
            "cut",
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
        ]
    )
    for name in mn.__all__:
        assert hasattr(mn, name), name


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


def test_kernel_code_never_imports_the_client():
    """The kernel runs attestation/, enclave/, ml/, wire/ and the top-level modules: the measured code. It never imports
    ``remote/`` (client code, not measured): statically, and in a fresh interpreter that imports every kernel entry."""
    for sub in ("attestation", "enclave", "ml", "wire"):
        for path in (PKG / sub).rglob("*.py"):
            bad = {m for m in _imports(path) if m.startswith(("mesatee_notebook.remote", "mesatee_notebook.magics"))}
            assert not bad, f"{path.relative_to(PKG)} imports {bad}"
    entries = [
        "mesatee_notebook.cli",
        "mesatee_notebook.enclave.supervisor",
        "mesatee_notebook.enclave.executor",
        "mesatee_notebook.enclave.cell_executor",
        "mesatee_notebook.enclave.service_worker",
        "mesatee_notebook.enclave.faas_exec",
        "mesatee_notebook.enclave.sandbox",
        "mesatee_notebook.enclave.cluster.node",
    ]
    code = (
        "import importlib, sys\n"
        f"for m in {entries!r}: importlib.import_module(m)\n"
        "print(sorted(m for m in sys.modules if m.startswith(('mesatee_notebook.remote', 'mesatee_notebook.magics'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout


def test_pure_layers_open_no_sockets_or_processes():
    for sub in ("attestation", "wire"):
        for path in (PKG / sub).rglob("*.py"):
            mods = _imports(path)
            if path.name == "stream.py":  # moves frames over a socket it is given; opens nothing
                assert "subprocess" not in mods
                continue
            assert not mods & {"socket", "subprocess", "ssl", "http", "urllib.request"}, path


def _defined_error_classes() -> set[type[errors.MesateeError]]:
    """Every error class the errors module itself defines (not subclasses made elsewhere at runtime)."""
    return {
        v
        for v in vars(errors).values()
        if isinstance(v, type) and issubclass(v, errors.MesateeError) and v.__module__ == errors.__name__
    }


def test_every_error_has_a_unique_wire_code_and_rebuilds():
    classes = errors.WIRE_CLASSES
    assert set(classes) == _defined_error_classes()  # the explicit registry misses no class, and holds no stranger
    codes = [c.code for c in classes]
    assert len(codes) == len(set(codes))
    for cls in classes:
        err = errors.error_from_wire(cls("boom", x=1).to_wire())
        assert type(err) is cls and err.message == "boom" and err.details == {"x": 1}


def test_every_error_class_is_drawn_in_the_tree():
    doc = errors.__doc__ or ""
    for cls in errors.WIRE_CLASSES:
        assert f"── {cls.__name__}" in doc or cls is errors.MesateeError, cls.__name__
        assert cls.__name__ in errors.__all__, cls.__name__


def test_hardware_leaves_rebuild_from_the_wire_without_importing_the_verifiers():
    code = (
        "import sys\n"
        "from mesatee_notebook.errors import error_from_wire\n"
        "err = error_from_wire({'code': 'attestation.platform.tcb', 'message': 'minimum TCB: 3 < 7'})\n"
        "assert 'mesatee_notebook.attestation.hardware' not in sys.modules\n"
        "print(type(err).__name__, isinstance(err, ValueError))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["TcbTooLow", "False"]
    from mesatee_notebook.attestation.hardware import _errors as hw

    assert hw.TcbTooLow is errors.TcbTooLow and hw.ChainBroken is errors.ChainBroken


REGISTRY_TEST = "tests/core/test_public_api.py::test_every_error_has_a_unique_wire_code_and_rebuilds"
RENDER_TEST = "tests/magics/test_magics.py::test_notebook_error_keeps_class_and_message"


@pytest.mark.parametrize(
    "order", [(RENDER_TEST, REGISTRY_TEST), (REGISTRY_TEST, RENDER_TEST)], ids=["render-first", "registry-first"]
)
@pytest.mark.slow
def test_error_registry_does_not_depend_on_test_order(order: tuple[str, str]):
    """The notebook's short-rendering subclasses (made at runtime) never enter the wire registry, in either order."""
    root = Path(__file__).resolve().parents[2]
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", *order],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "2 passed" in run.stdout


def test_rendered_error_rebuilds_as_its_own_class():
    from mesatee_notebook.magics.display import notebook_error

    shown = notebook_error(errors.PolicyViolation("no", column="ssn"))
    assert type(shown) is not errors.PolicyViolation  # a runtime subclass that renders short ...
    back = errors.error_from_wire(shown.to_wire())
    assert type(back) is errors.PolicyViolation  # ... rebuilds as the class the registry names
    assert type(shown) not in errors.WIRE_CLASSES


def test_leaf_errors_subclass_builtins():
    assert issubclass(errors.PolicyViolation, PermissionError)
    assert issubclass(errors.QuotaExceeded, errors.PolicyViolation)
    assert issubclass(errors.RemoteTimeout, TimeoutError)
    assert issubclass(errors.EncodingError, TypeError)
    assert issubclass(errors.KernelConnectionError, ConnectionError)
