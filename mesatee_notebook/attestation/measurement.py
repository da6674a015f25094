"""The enclave measurement: SHA-256 over a deterministic manifest of the trusted code.

The manifest lists, sorted and hashed file by file:

* every file of the measured subpackages (``attestation``, ``enclave``, ``ml``, ``wire``),
* the Python implementation and version,
* the *unsafe components*: the native engines the enclave may load (numpy, pandas,
  pyarrow, xgboost, tvm, …) with their versions and the SHA-256 of each shared library.

Reading the package's own files is the one piece of I/O in ``attestation/``; it opens
nothing else. Library digests are cached per (path, size, mtime) for the process, never across processes: every
process that reports or checks a measurement hashes the bytes itself. The libraries (about 1 GB with every extra) are
hashed on a few threads (``hashlib`` releases the GIL), and a kernel starts that hashing (:func:`prefetch`) before its
sandbox self-test, so the two overlap; the manifest is the same either way.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
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
    "prefetch",
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


def _tree_files(base: Path, keep: Callable[[str], bool] | None = None) -> list[Path]:
    """The files under ``base`` (only those whose name ``keep`` accepts), in ``sorted(base.rglob("*"))`` order.

    ``os.scandir`` instead of ``rglob`` and sorting ``Path`` objects: the same list (directories entered unless they
    are symlinks; a symlink counts when it leads to a file, as with ``Path.is_file``; unreadable directories skipped)
    in a fraction of the time.
    """
    found: list[tuple[tuple[str, ...], str]] = []
    stack: list[tuple[str, tuple[str, ...]]] = [(str(base), ())]
    while stack:
        folder, rel = stack.pop()
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append((entry.path, (*rel, entry.name)))
                    elif (keep is None or keep(entry.name)) and entry.is_file():
                        found.append(((*rel, entry.name), entry.path))
        except PermissionError:
            continue
    found.sort()
    return [Path(full) for _, full in found]


def _package_root() -> Path:
    return Path(__file__).resolve().parent.parent


def _measured_files(root: Path) -> list[list[str]]:
    out: list[list[str]] = []
    for sub in MEASURED_SUBPACKAGES:
        base = root / sub
        if not base.is_dir():
            continue
        for path in _tree_files(base):
            if "__pycache__" in path.parts or path.suffix in (".pyc", ".pyo"):
                continue
            out.append([path.relative_to(root).as_posix(), _digest(path)])
    for name in MEASURED_MODULES:
        path = root / name
        if path.is_file():
            out.append([name, _digest(path)])
    return out


def _is_library(name: str) -> bool:
    return any(s in name for s in _LIB_SUFFIXES)


def _libraries(name: str) -> list[tuple[str, Path]] | None:
    """The shared libraries of the package ``name`` (manifest name, path), in manifest order; None if absent."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return None
    libs: list[tuple[str, Path]] = []
    for location in spec.submodule_search_locations:
        pkg = Path(location)
        for folder in (pkg, pkg.parent / f"{pkg.name}.libs"):
            if folder.is_dir():
                libs.extend(
                    (path.relative_to(pkg.parent).as_posix(), path) for path in _tree_files(folder, _is_library)
                )
    return libs


def _hash_all(paths: list[Path]) -> None:
    """Fill the digest cache for ``paths`` on up to four threads, largest file first."""

    def size(path: Path) -> int:
        try:
            return path.stat().st_size
        except OSError:
            return 0

    todo = sorted(set(paths), key=size, reverse=True)
    workers = min(4, os.cpu_count() or 1, len(todo))
    if workers <= 1:
        for path in todo:
            _digest(path)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="measure") as pool:
        list(pool.map(_digest, todo))  # raises the first OSError, as the one-by-one walk would


def _components() -> list[dict[str, Any]]:
    found = [(name, dists, _libraries(name)) for name, dists in UNSAFE_COMPONENTS]
    _hash_all([path for *_, libs in found for _, path in libs or ()])
    out: list[dict[str, Any]] = []
    for name, dists, libs in found:
        if libs is None:
            out.append({"name": name, "present": False})
            continue
        version = None
        for dist in dists:
            try:
                version = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
        libraries = [[rel, _digest(path)] for rel, path in libs]
        out.append({"name": name, "present": True, "version": version, "libraries": libraries})
    return out


_prefetch_lock = threading.Lock()
_prefetching: threading.Thread | None = None


def prefetch() -> None:
    """Start hashing the unsafe components' libraries in the background (the kernel, before its sandbox self-test).

    It only fills this process's digest cache; :func:`build_manifest` waits for it, then walks and stats everything
    again, so a file changed meanwhile is hashed anew. An error here is left for ``build_manifest`` to raise.
    """
    global _prefetching

    def run() -> None:
        try:
            _hash_all([path for name, _ in UNSAFE_COMPONENTS for _, path in _libraries(name) or ()])
        except OSError:
            pass

    with _prefetch_lock:
        if _prefetching is None:
            _prefetching = threading.Thread(target=run, name="measure-prefetch", daemon=True)
            _prefetching.start()


def _wait_prefetch() -> None:
    with _prefetch_lock:
        thread = _prefetching
    if thread is not None:
        thread.join()


def build_manifest(root: Path | None = None, *, sandboxed: bool = True) -> dict[str, Any]:
    """Build the deterministic manifest of the installed package at ``root``.

    ``sandboxed`` selects the sandbox profile that is measured with the code: a kernel
    started with ``--no-sandbox`` has a different measurement from one that sandboxes.
    """
    from mesatee_notebook.attestation.sandbox import sandbox_profile, unsandboxed_profile

    root = root or _package_root()
    _wait_prefetch()
    return {
        "format": MANIFEST_FORMAT,
        "package": "mesatee_notebook",
        "python": f"{platform.python_implementation()} {sys.version_info.major}.{sys.version_info.minor}."
        f"{sys.version_info.micro}",
        "files": _measured_files(root),
        "unsafe_components": _components(),
        "sandbox": sandbox_profile() if sandboxed else unsandboxed_profile(),
    }


def measurement_of(manifest: dict[str, Any]) -> str:
    """SHA-256 hex of the canonical manifest."""
    return hashlib.sha256(canonical_json(manifest)).hexdigest()


def expected_measurement(root: Path | None = None, *, sandboxed: bool = True) -> str:
    """Recompute, from the installed package, the measurement a genuine (sandboxing) kernel reports."""
    return measurement_of(build_manifest(root, sandboxed=sandboxed))
