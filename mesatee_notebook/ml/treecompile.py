"""Low-latency tree prediction: trained xgboost trees compiled to a shared library.

The trees go through treelite (model import) and tl2cgen (C code generation),
and the machine's ``gcc`` compiles them into a ``.so`` that is cached under
``cache_dir`` by a digest of (model JSON, treelite/tl2cgen/gcc versions). Before
a library enters the cache it must reproduce xgboost's margins on probe rows
built from the model's own split thresholds (values at, just below and missing
for each threshold), so a version skew between treelite and tl2cgen cannot
silently change predictions.

Categorical splits (``enable_categorical=True`` models) compile too. treelite 4.8 refuses xgboost's
category *encoder* (the categories recorded at training), so it is left out of the JSON treelite reads:
the library takes training codes, which :meth:`GBDTModel.to_matrix` produces from the recorded categories
for both engines. The parity check then also covers the categorical features: codes of every category,
invalid codes (negative, past the last category, fractional) and NaN; and, from a DataFrame whose
categories come in another order, the codes this engine computes against xgboost's own re-coder.

:class:`TreePredictor` chooses per call: the compiled library for small batches,
xgboost ``inplace_predict`` (multi-threaded, vectorised) for large ones. The
crossover was measured with ``bench/p4_tree_predict.py`` on the 2-core dev
machine; see :data:`DEFAULT_CROSSOVER_ROWS`.

The cache directory must be enclave-private: a library in it is loaded and run,
and the metadata's SHA-256 only detects corruption, not a deliberate swap.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Literal, TypeAlias

import numpy as np
import numpy.typing as npt

from mesatee_notebook.ml._errors import CompileError, FeatureMismatch
from mesatee_notebook.ml.gbdt import Data, GBDTModel

__all__ = [
    "DEFAULT_CROSSOVER_ROWS",
    "CompiledTrees",
    "Engine",
    "TreePredictor",
    "compile_trees",
    "measure_crossover",
    "probe_rows",
]

Engine: TypeAlias = Literal["compiled", "xgboost"]
F32Array: TypeAlias = npt.NDArray[np.float32]

DEFAULT_CROSSOVER_ROWS = 80
"""Batches with fewer rows use the compiled library; from this size on, xgboost.

Measured with ``bench/p4_tree_predict.py`` (200 trees, depth 6, 30 features, 2 cores, quiet
machine, two runs): compiled trees win up to 64 rows (1.1x at 64, 6.5x at 1 row), xgboost's
2-thread ``inplace_predict`` wins from 96 rows on (1.35x at 96, 2.3x at 4096); 80 sits between.
On a busy machine xgboost's OpenMP barriers wait for a core (1 row: 8-18 ms instead of 0.12 ms)
and compiled trees won at every size up to 4096. Re-measure per model and machine with
:func:`measure_crossover` when it matters.
"""
_PARITY_RTOL = 1e-5
_PARITY_ATOL = 1e-5
_CACHE_PREFIX = "trees-"


@functools.cache
def _toolchain_id() -> str:
    """Versions that change the generated library: treelite, tl2cgen, gcc."""
    import tl2cgen
    import treelite

    try:
        gcc = subprocess.run(["gcc", "--version"], capture_output=True, text=True, check=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        msg = "gcc is needed to compile trees and could not be run"
        raise CompileError(msg) from exc
    first = gcc.stdout.splitlines()[0] if gcc.stdout else "gcc"
    return f"treelite {treelite.__version__}; tl2cgen {tl2cgen.__version__}; {first}"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def probe_rows(model: GBDTModel, rows: int = 512, seed: int = 0) -> F32Array:
    """Rows that exercise the model's splits: each value sits on, just below, or away from a threshold, or is NaN.

    A categorical feature gets codes instead: every category's, and invalid ones (see :func:`_category_probe`).
    """
    doc = json.loads(model.to_json())
    thresholds: list[list[float]] = [[] for _ in range(model.num_features)]
    top_code = [-1] * model.num_features
    for tree in doc["learner"]["gradient_booster"]["model"]["trees"]:
        kinds = tree.get("split_type") or [0] * len(tree["left_children"])
        for left, feature, cond, kind in zip(
            tree["left_children"], tree["split_indices"], tree["split_conditions"], kinds, strict=True
        ):
            if left != -1 and not kind:
                thresholds[int(feature)].append(float(cond))
        for cat in tree.get("categories") or []:  # categories named by categorical splits, all features together
            top_code = [max(t, int(cat)) for t in top_code]
    out = threshold_rows(thresholds, rows, seed, above=False)
    types = model.feature_types or ()
    known = model.categories
    for j, kind in enumerate(types):
        if kind == "c":
            count = len(known.get(model.feature_names[j], ())) or top_code[j] + 2
            out[:, j] = _category_probe(count, rows, seed + j)
    return out


def _category_probe(count: int, rows: int, seed: int) -> F32Array:
    """Codes of a categorical feature: mostly ``0..count-1``, some NaN, some invalid (-1, count, 10^6, 1.5)."""
    rng = np.random.default_rng(seed)
    col = rng.integers(0, max(1, count), size=rows).astype(np.float32)
    invalid = np.asarray([np.nan, -1.0, float(count), 1e6, 1.5, -0.5], dtype=np.float32)
    pick = rng.random(rows) < 0.2
    col[pick] = invalid[rng.integers(0, len(invalid), size=int(pick.sum()))]
    return col


def threshold_rows(thresholds: list[list[float]], rows: int, seed: int, *, above: bool) -> F32Array:
    """Probe rows that compiled trees are checked on before they are cached.

    Feature ``j`` sits on, just below (with ``above``: or just above), or away from one of ``thresholds[j]``, or is NaN.
    """
    rng = np.random.default_rng(seed)
    out = rng.normal(size=(rows, len(thresholds))).astype(np.float32)
    kinds = 5 if above else 4  # the last kind is NaN
    for j, ts in enumerate(thresholds):
        if not ts:
            continue
        t = np.asarray(ts, dtype=np.float32)
        picks = t[rng.integers(0, len(t), size=rows)]
        mode = rng.integers(0, kinds, size=rows)
        below = np.nextafter(picks, np.float32(-np.inf))
        if above:
            up = np.nextafter(picks, np.float32(np.inf))
            col = np.select([mode == 0, mode == 1, mode == 2], [picks, below, up], out[:, j] + picks)
        else:
            col = np.where(mode == 0, picks, np.where(mode == 1, below, out[:, j] + picks))
        out[:, j] = np.where(mode == kinds - 1, np.float32(np.nan), col).astype(np.float32)
    return out


class CompiledTrees:
    """One model's trees as a loaded tl2cgen library.

    ``digest`` is the cache key; ``library_sha256`` identifies the generated code that runs,
    for a receipt to bind next to the model digest.
    """

    __slots__ = (
        "_direct",
        "_predictor",
        "_width",
        "digest",
        "from_cache",
        "library_sha256",
        "num_class",
        "num_features",
        "objective",
        "path",
    )

    def __init__(
        self, path: Path, model: GBDTModel, digest: str, *, library_sha256: str, nthread: int, from_cache: bool
    ) -> None:
        import tl2cgen

        self.path = path
        self.digest = digest
        self.library_sha256 = library_sha256
        self.objective = model.objective
        self.num_features = model.num_features
        self.num_class = model.num_class
        self.from_cache = from_cache
        self._predictor = tl2cgen.Predictor(path, nthread=nthread)
        self._direct, self._width = _direct_entry(path)

    def predict_matrix(self, X: F32Array, *, margin: bool = False) -> F32Array:
        """Predict a float32 ``(rows, features)`` matrix; shapes and values match xgboost's ``inplace_predict``."""
        import tl2cgen

        if X.ndim != 2 or X.shape[1] != self.num_features:
            msg = f"compiled trees expect {self.num_features} features, got shape {X.shape}"
            raise FeatureMismatch(msg, expected=self.num_features, got=list(X.shape))
        if self._direct is not None and X.shape[0] <= DIRECT_MAX_ROWS:
            out = self._predict_direct(X, margin)
        else:
            raw = np.asarray(self._predictor.predict(tl2cgen.DMatrix(X, dtype="float32"), pred_margin=margin))
            out = raw.reshape(X.shape[0], -1)
        if self.num_class > 1:
            if self.objective == "multi:softmax" and not margin:
                return np.asarray(out.argmax(axis=1), dtype=np.float32)
            return out.astype(np.float32, copy=False)
        return out.reshape(-1).astype(np.float32, copy=False)

    def _predict_direct(self, X: F32Array, margin: bool) -> F32Array:
        """Call the generated ``predict(Entry*, margin, float*)`` row by row: no DMatrix, no thread pool.

        tl2cgen's wrapper costs ~15 µs a call; a ctypes call into the same generated function ~2 µs.
        ``Entry`` is a union of a float value and a ``missing == -1`` flag, so NaN becomes -1.
        """
        assert self._direct is not None
        rows = np.ascontiguousarray(X, dtype=np.float32)
        entries = rows.view(np.int32).copy()
        entries[np.isnan(rows)] = -1
        out = np.zeros((rows.shape[0], self._width), dtype=np.float32)
        flag = int(margin)
        for i in range(rows.shape[0]):
            self._direct(entries[i].ctypes.data, flag, out[i].ctypes.data)
        return out


#: Up to this many rows, prediction calls the generated C function directly (see ``_predict_direct``).
DIRECT_MAX_ROWS = 16


def _direct_entry(path: Path) -> tuple[Any, int]:
    """The generated library's ``predict`` symbol and its output width, or (None, 0) if not usable."""
    import ctypes

    lib = ctypes.CDLL(str(path))
    for name in ("get_threshold_type", "get_leaf_output_type"):
        getattr(lib, name).restype = ctypes.c_char_p
    # The Entry union and the result buffer are float32 only for float32 models with one target.
    if lib.get_num_target() != 1 or lib.get_threshold_type() != b"float32" or lib.get_leaf_output_type() != b"float32":
        return None, 0
    width = ctypes.c_int32()
    lib.get_num_class(ctypes.byref(width))
    fn = lib.predict
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    fn.restype = None
    return fn, max(1, int(width.value))


def _compile_into(model: GBDTModel, workdir: Path, threads: int) -> Path:
    import tl2cgen
    import treelite

    libpath = workdir / "model.so"
    try:
        tl_model = treelite.frontend.from_xgboost_json(_treelite_json(model), allow_unknown_field=True)
        tl2cgen.export_lib(
            tl_model,
            toolchain="gcc",
            libpath=libpath,
            params={"parallel_comp": max(1, threads)},
            nthread=max(1, threads),
        )
    except (tl2cgen.TL2cgenError, treelite.TreeliteError, OSError, subprocess.SubprocessError) as exc:
        msg = f"tree compilation failed: {str(exc).strip().splitlines()[-1] if str(exc).strip() else exc!r}"
        raise CompileError(msg) from exc
    return libpath


def _treelite_json(model: GBDTModel) -> bytes:
    """The model's JSON for treelite: without xgboost's category encoder, which treelite 4.8 refuses.

    The trees' categorical splits stay; they read training codes, which ``to_matrix`` gives both engines.
    """
    raw = model.to_json()
    if not model.categorical:
        return raw
    doc = json.loads(raw)
    booster = doc["learner"]["gradient_booster"]
    for holder in (booster.get("model"), booster.get("gbtree", {}).get("model")):
        if isinstance(holder, dict) and "cats" in holder:
            holder["cats"] = {"enc": [], "feature_segments": [], "sorted_idx": []}
    return json.dumps(doc).encode()


def compile_trees(model: GBDTModel, cache_dir: str | os.PathLike[str], *, nthread: int = 1) -> CompiledTrees:
    """Compile ``model``'s trees (or load them from ``cache_dir``); ``nthread`` is the predictor's thread count."""
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(model.to_json() + b"\0" + _toolchain_id().encode()).hexdigest()
    final = cache / f"{_CACHE_PREFIX}{key}"
    cached = _load_cached(final, model, key, nthread)
    if cached is not None:
        return cached

    workdir = Path(tempfile.mkdtemp(prefix=".build-", dir=cache))
    try:
        t0 = time.perf_counter()
        libpath = _compile_into(model, workdir, os.cpu_count() or 1)
        compiled = CompiledTrees(
            libpath, model, key, library_sha256=_sha256_file(libpath), nthread=nthread, from_cache=False
        )
        _check_parity(model, compiled)
        meta = {
            "model_digest": model.digest,
            "so_sha256": compiled.library_sha256,
            "toolchain": _toolchain_id(),
            "compile_seconds": time.perf_counter() - t0,
        }
        (workdir / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            workdir.rename(final)
        except OSError:
            shutil.rmtree(workdir, ignore_errors=True)  # another process cached it first
        loaded = _load_cached(final, model, key, nthread)
        if loaded is None:
            msg = f"compiled trees vanished from the cache at {final}"
            raise CompileError(msg)
        loaded.from_cache = False
        return loaded
    finally:
        if workdir.exists():
            shutil.rmtree(workdir, ignore_errors=True)


def _load_cached(final: Path, model: GBDTModel, key: str, nthread: int) -> CompiledTrees | None:
    meta_path, libpath = final / "meta.json", final / "model.so"
    if not (meta_path.is_file() and libpath.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        meta = {}
    library_sha256 = _sha256_file(libpath)
    if meta.get("so_sha256") != library_sha256:  # checked before the library is loaded
        shutil.rmtree(final, ignore_errors=True)  # corrupt or half-written: rebuild
        return None
    return CompiledTrees(libpath, model, key, library_sha256=library_sha256, nthread=nthread, from_cache=True)


def _check_parity(model: GBDTModel, compiled: CompiledTrees) -> None:
    X = probe_rows(model, seed=int(model.digest[:8], 16))
    _compare(model.predict(X, margin=True), compiled.predict_matrix(X, margin=True), "probe rows")
    if model.categories:
        frame = _category_frame(model, X)
        native = np.asarray(model.booster.inplace_predict(frame, predict_type="margin"), dtype=np.float32)
        _compare(native, compiled.predict_matrix(model.to_matrix(frame), margin=True), "re-coded category probe rows")


def _compare(want: F32Array, got: F32Array, what: str) -> None:
    if want.shape != got.shape or not np.allclose(got, want, rtol=_PARITY_RTOL, atol=_PARITY_ATOL):
        worst = float(np.max(np.abs(got.astype(np.float64) - want))) if want.shape == got.shape else float("nan")
        msg = f"compiled trees disagree with xgboost on {what} (max |diff| {worst:.3g}); not cached"
        raise CompileError(msg, max_abs_diff=worst)


def _category_frame(model: GBDTModel, X: F32Array) -> Any:
    """The probe rows as a DataFrame: categorical features as pandas categories in *reversed* training order.

    Invalid codes become missing (a DataFrame cannot hold them). xgboost re-codes such a frame itself, so the
    check compares its re-coder with ``to_matrix``'s encoding as well as the two engines.
    """
    import pandas as pd

    cats = {k: pd.Index(v) for k, v in model.categories.items()}
    columns: dict[str, Any] = {}
    for j, name in enumerate(model.feature_names):
        col = X[:, j]
        if name in cats:
            known = cats[name]
            valid = np.isfinite(col) & (col >= 0) & (col < len(known)) & (col == np.floor(col))
            codes = np.where(valid, col, -1).astype(np.int64)
            values = pd.Categorical.from_codes(codes, categories=known)
            columns[name] = values.reorder_categories(list(known[::-1]))
        else:
            columns[name] = col
    return pd.DataFrame(columns)


class TreePredictor:
    """Predict with compiled trees for small batches and xgboost for large ones."""

    __slots__ = ("compiled", "crossover_rows", "model")

    def __init__(
        self,
        model: GBDTModel,
        cache_dir: str | os.PathLike[str],
        *,
        crossover_rows: int = DEFAULT_CROSSOVER_ROWS,
        nthread: int = 1,
    ) -> None:
        self.model = model
        self.compiled = compile_trees(model, cache_dir, nthread=nthread)
        self.crossover_rows = crossover_rows

    def engine_for(self, rows: int) -> Engine:
        """Return the engine that a batch of ``rows`` rows goes to."""
        return "compiled" if rows < self.crossover_rows else "xgboost"

    def predict(self, data: Data, *, margin: bool = False) -> F32Array:
        """Predict like :meth:`GBDTModel.predict`, through the faster engine for this batch size."""
        X = self.model.to_matrix(data)
        if self.engine_for(X.shape[0]) == "compiled":
            return self.compiled.predict_matrix(X, margin=margin)
        return self.model.predict(X, margin=margin)


def measure_crossover(
    model: GBDTModel,
    compiled: CompiledTrees,
    sizes: tuple[int, ...] = (1, 8, 32, 64, 128, 256, 512, 1024, 4096),
    repeats: int = 7,
    min_time: float = 0.02,
) -> tuple[int, dict[int, dict[Engine, float]]]:
    """Time both engines per batch size; return (crossover, median seconds per call per size).

    The crossover is the smallest measured size from which xgboost wins at every larger
    size too (one noisy size cannot move it); ``2 * max(sizes)`` if compiled trees always win.
    Each of the ``repeats`` samples loops for about ``min_time`` seconds.
    """
    rng = np.random.default_rng(0)
    base = probe_rows(model, rows=max(sizes), seed=1)
    timings: dict[int, dict[Engine, float]] = {}
    for n in sizes:
        X = np.ascontiguousarray(base[rng.permutation(base.shape[0])[:n]])
        row: dict[Engine, float] = {}
        for engine in ("compiled", "xgboost"):
            fn: Any = compiled.predict_matrix if engine == "compiled" else model.predict
            t0 = time.perf_counter()
            fn(X)
            inner = max(1, int(min_time / max(time.perf_counter() - t0, 1e-7)))
            samples = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn(X)
                samples.append((time.perf_counter() - t0) / inner)
            row[engine] = float(np.median(samples))
        timings[n] = row
    crossover = max(sizes) * 2
    for n in sorted(timings, reverse=True):
        if timings[n]["xgboost"] > timings[n]["compiled"]:
            break
        crossover = n
    return crossover, timings
