"""The enclave measurement: SHA-256 over a deterministic manifest of the trusted code.

The manifest lists, sorted and hashed file by file:

* every file of the measured subpackages (``attestation``, ``enclave``, ``ml``, ``wire``),
* the Python implementation and version,
* the *unsafe components*: the native engines the enclave may load (numpy, pandas,
  pyarrow, xgboost, tvm, …) with their versions and the SHA-256 of each shared library.

Reading the package's own files is the one piece of I/O in ``attestation/``; it opens
nothing else. Library digests are cached per (path, size, mtime) for the process.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import platform
import sys
from pathlib import Path
from typing import Any

__all__ = [
    "MEASURED_MODULES",
    "MEASURED_SUBPACKAGES",
    "UNSAFE_COMPONENTS",
    "build_manifest",
    "canonical_json",
    "expected_measurement",
    "measurement_of",
]

MEASURED_SUBPACKAGES = ("attestation", "enclave", "ml", "wire")
#: Top-level modules the kernel and its executors import (``python -m mesatee_notebook.cli``, the package's
#: ``__init__``, the error tree, the transports): measured like the subpackages, or code the kernel runs would not be
#: in its measurement. ``remote/`` (the client) is not measured: the package's ``__init__`` imports nothing until first
#: use, and no kernel module imports the client (tests/core/test_public_api.py checks both).
MEASURED_MODULES = ("__init__.py", "cli.py", "errors.py", "transports.py")
#: (import name, distribution names to try for the version)
UNSAFE_COMPONENTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("numpy", ("numpy",)),
    ("pandas", ("pandas",)),
    ("pyarrow", ("pyarrow",)),
    ("cryptography", ("cryptography",)),
    ("msgpack", ("msgpack",)),
    ("xgboost", ("xgboost-cpu", "xgboost")),
    ("sklearn", ("scikit-learn",)),
    ("scipy", ("scipy",)),
    ("tvm", ("apache-tvm",)),
    ("tvm_ffi", ("apache-tvm-ffi",)),
    ("onnx", ("onnx",)),
    ("onnxruntime", ("onnxruntime",)),  # the second ONNX engine, for graphs TVM cannot import (ml/onnx_engine.py)
    ("treelite", ("treelite",)),  # compiled trees: xgboost models and ONNX tree ensembles (ml/onnx_trees.py)
    ("tl2cgen", ("tl2cgen",)),  # generates the compiled trees' C code (ml/treecompile.py)
    ("tpm2_pytss", ("tpm2-pytss",)),  # the kernel's TPM stack at level tpm (links the system tpm2-tss)
    ("opendp", ("opendp",)),
    ("blake3", ("blake3",)),  # payload digests (wire/digest.py)
)
_LIB_SUFFIXES = (".so", ".dylib", ".pyd")
MANIFEST_FORMAT = 1


def canonical_json(value: Any) -> bytes:
    """The one JSON encoding that is hashed or signed: sorted keys, no spaces, ASCII."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


@functools.lru_cache(maxsize=4096)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    del size, mtime_ns  # part of the cache key only
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _digest(path: Path) -> str:
    st = path.stat()
    return _file_digest(str(path), st.st_size, st.st_mtime_ns)


def _package_root() -> Path:
    return Path(__file__).resolve().parent.parent


def _measured_files(root: Path) -> list[list[str]]:
    out: list[list[str]] = []
    for sub in MEASURED_SUBPACKAGES:
        base = root / sub
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*")):
            if not path.is_file() or "__pycache__" in path.parts or path.suffix in (".pyc", ".pyo"):
                continue
            out.append([path.relative_to(root).as_posix(), _digest(path)])
    for name in MEASURED_MODULES:
        path = root / name
        if path.is_file():
            out.append([name, _digest(path)])
    return out


def _component(name: str, dists: tuple[str, ...]) -> dict[str, Any]:
    version = None
    for dist in dists:
        try:
            version = importlib.metadata.version(dist)
            break
        except importlib.metadata.PackageNotFoundError:
            continue
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return {"name": name, "present": False}
    libs: list[list[str]] = []
    for location in spec.submodule_search_locations:
        pkg = Path(location)
        folders = [pkg, pkg.parent / f"{pkg.name}.libs"]
        for folder in folders:
            if not folder.is_dir():
                continue
            for path in sorted(folder.rglob("*")):
                if path.is_file() and any(s in path.name for s in _LIB_SUFFIXES):
                    libs.append([path.relative_to(pkg.parent).as_posix(), _digest(path)])
    return {"name": name, "present": True, "version": version, "libraries": libs}


def build_manifest(root: Path | None = None, *, sandboxed: bool = True) -> dict[str, Any]:
    """Build the deterministic manifest of the installed package at ``root``.

    ``sandboxed`` selects the sandbox profile that is measured with the code: a kernel
    started with ``--no-sandbox`` has a different measurement from one that sandboxes.
    """
    from mesatee_notebook.attestation.sandbox import sandbox_profile, unsandboxed_profile

    root = root or _package_root()
    return {
        "format": MANIFEST_FORMAT,
        "package": "mesatee_notebook",
        "python": f"{platform.python_implementation()} {sys.version_info.major}.{sys.version_info.minor}."
        f"{sys.version_info.micro}",
        "files": _measured_files(root),
        "unsafe_components": [_component(n, d) for n, d in UNSAFE_COMPONENTS],
        "sandbox": sandbox_profile() if sandboxed else unsandboxed_profile(),
    }


def measurement_of(manifest: dict[str, Any]) -> str:
    """SHA-256 hex of the canonical manifest."""
    return hashlib.sha256(canonical_json(manifest)).hexdigest()


def expected_measurement(root: Path | None = None, *, sandboxed: bool = True) -> str:
    """Recompute, from the installed package, the measurement a genuine (sandboxing) kernel reports."""
    return measurement_of(build_manifest(root, sandboxed=sandboxed))
