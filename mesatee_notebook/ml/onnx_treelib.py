"""ONNX tree ensembles compiled to a shared library: the ``treelite`` engine of ``tvm.compile``.

``onnx_trees.py`` turns the graph into a treelite model; here tl2cgen generates C and ``gcc`` builds it into
``model.so`` in ``<cache_dir>/onnxtrees-<digest>/`` (next to ``model.onnx`` and ``meta.json``), with the
toolchain of the compiled-tree path (``treecompile.py``: same versions in the digest, same direct ctypes call
for small batches). Before a library is cached it must reproduce onnxruntime's outputs on probe rows built
from the graph's own thresholds (each value on, just below or just above a threshold, or NaN): probabilities
and values at 1e-4, labels exactly. A graph that fails is refused with :class:`CompileError`, and
``engine="auto"`` then runs it on onnxruntime.

The digest binds (engine, toolchain, model bytes, input shapes); ``library_sha256`` is the generated library's
SHA-256, for the receipt. The cache directory must be enclave-private, as for ``treecompile.py``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from mesatee_notebook.ml._errors import CompileError, InputShapeError, ModelFormatError
from mesatee_notebook.ml.onnx_trees import ENGINE, TreeGraph, build_treelite, finalize, parse_tree_graph
from mesatee_notebook.ml.treecompile import DIRECT_MAX_ROWS, _direct_entry, _sha256_file, _toolchain_id, threshold_rows
from mesatee_notebook.ml.tvm_runtime import TensorSpec

__all__ = ["TreeliteONNXModel", "compile_onnx_trees", "model_digest", "probe_rows"]

_PREFIX = "onnxtrees-"
_TOL = 1e-4


def _parse(model_bytes: bytes, input_shapes: Mapping[str, Sequence[int]]) -> tuple[TreeGraph, tuple[int, int]]:
    import onnx

    try:
        model = onnx.load_from_string(model_bytes)
    except Exception as exc:  # protobuf's DecodeError, among others
        msg = f"not a valid ONNX model: {exc}"
        raise ModelFormatError(msg) from exc
    names = [i.name for i in model.graph.input]
    if len(input_shapes) != 1 or names[:1] != list(input_shapes):
        msg = f"input_shapes must name exactly the model's input {names[:1]}"
        raise InputShapeError(msg, inputs=names)
    shape = tuple(int(d) for d in next(iter(input_shapes.values())))
    if len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
        msg = f"a tree ensemble takes a (rows, features) input; got shape {list(shape)}"
        raise InputShapeError(msg, shape=list(shape))
    return parse_tree_graph(model, shape[1]), (shape[0], shape[1])


def model_digest(model_bytes: bytes, input_shapes: Mapping[str, Sequence[int]]) -> str:
    """Handle of a treelite module: (engine, toolchain, model, shapes)."""
    shapes = json.dumps({str(k): [int(d) for d in v] for k, v in input_shapes.items()}, sort_keys=True)
    h = hashlib.sha256(f"{ENGINE}\0{_toolchain_id()}\0".encode())
    h.update(hashlib.sha256(model_bytes).digest() + shapes.encode())
    return h.hexdigest()


def probe_rows(graph: TreeGraph, rows: int = 512, seed: int = 0) -> npt.NDArray[np.float32]:
    """Rows on, just below and just above the graph's thresholds, and NaN, per feature."""
    thresholds: list[list[float]] = [[] for _ in range(graph.num_features)]
    for tree in graph.trees:
        for nd in tree:
            if nd.op is not None:
                thresholds[nd.feature].append(nd.threshold)
    return threshold_rows(thresholds, rows, seed, above=True)


class TreeliteONNXModel:
    """A compiled tree-ensemble graph: same interface as ``ORTModel`` / ``TVMModel`` (``run``, specs, digest)."""

    __slots__ = (
        "_buffers",
        "_direct",
        "_graph",
        "_predictor",
        "_width",
        "digest",
        "from_cache",
        "inputs",
        "meta",
        "outputs",
        "path",
    )

    engine = ENGINE

    def __init__(self, directory: Path, *, from_cache: bool) -> None:
        import tl2cgen

        self.meta: dict[str, Any] = json.loads((directory / "meta.json").read_text())
        shapes = {str(k): v for k, v in self.meta["input_shapes"].items()}
        self._graph, (rows, width) = _parse((directory / "model.onnx").read_bytes(), shapes)
        self.path = directory / "model.so"
        self.digest = str(self.meta["digest"])
        self.from_cache = from_cache
        self.inputs = (TensorSpec(self._graph.input_name, (rows, width), "float32"),)
        self.outputs = tuple(
            TensorSpec(name, (rows,) if role == "label" else (rows, self._graph.out_columns), dtype)
            for name, role, dtype in self._graph.outputs
        )
        self._predictor = tl2cgen.Predictor(self.path, nthread=1)
        self._direct, self._width = _direct_entry(self.path)
        self._buffers: dict[int, tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]] = {}

    @property
    def library_sha256(self) -> str:
        """SHA-256 of the generated library that runs."""
        return str(self.meta["so_sha256"])

    @property
    def tuned_trials(self) -> int:
        """Always 0 (nothing to tune)."""
        return 0

    def scores(self, X: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Raw tree scores ``(rows, width)``: sum or average of the trees plus ``base_values``."""
        import tl2cgen

        if self._direct is not None and X.shape[0] <= DIRECT_MAX_ROWS:
            return self._scores_direct(X)
        raw = np.asarray(self._predictor.predict(tl2cgen.DMatrix(X, dtype="float32"), pred_margin=True))
        return raw.reshape(X.shape[0], -1).astype(np.float32, copy=False)

    def _scores_direct(self, X: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Call the generated ``predict(Entry*, margin, float*)`` per row, through buffers kept per batch size."""
        assert self._direct is not None
        bufs = self._buffers.get(X.shape[0])
        if bufs is None:
            entries = np.zeros(X.shape, dtype=np.float32)
            out = np.zeros((X.shape[0], self._width), dtype=np.float32)
            ptrs = [(entries[i].ctypes.data, out[i].ctypes.data) for i in range(X.shape[0])]
            bufs = self._buffers[X.shape[0]] = (entries, out, ptrs)
        entries, out, ptrs = bufs
        np.copyto(entries, X)
        missing = np.isnan(entries)
        if missing.any():
            entries.view(np.int32)[missing] = -1  # tl2cgen's Entry union: missing == -1
        out.fill(0.0)  # the generated function adds the trees' outputs into the result buffer
        for row, res in ptrs:
            self._direct(row, 0, res)
        return out.copy()

    def run(self, inputs: Mapping[str, Any] | np.ndarray) -> dict[str, np.ndarray]:
        """Run on ``{input name: array}`` (or the array); outputs named and shaped as the ONNX graph's."""
        spec = self.inputs[0]
        if not isinstance(inputs, np.ndarray):
            if set(inputs) != {spec.name}:
                msg = f"model inputs are [{spec.name!r}]; got {sorted(inputs)}"
                raise InputShapeError(msg, expected=[spec.name], got=sorted(inputs))
            inputs = inputs[spec.name]
        value = np.asarray(inputs)
        if value.dtype != np.float32 and not np.can_cast(value.dtype, np.float32, casting="same_kind"):
            msg = f"input {spec.name!r} has dtype {value.dtype}; the model takes float32"
            raise InputShapeError(msg, input=spec.name, dtype=str(value.dtype))
        if tuple(value.shape) != spec.shape:
            msg = f"input {spec.name!r} has shape {tuple(value.shape)}; the module was compiled for {spec.shape}"
            raise InputShapeError(msg, input=spec.name, shape=list(value.shape), expected=list(spec.shape))
        return finalize(self._graph, self.scores(np.ascontiguousarray(value, dtype=np.float32)))

    def check_parity(self, model_bytes: bytes) -> float:
        """Compare with onnxruntime on probe rows; the worst difference, or :class:`CompileError`."""
        from mesatee_notebook.ml.onnx_engine import ORTModel

        spec = self.inputs[0]
        X = probe_rows(self._graph, rows=max(spec.shape[0], 256), seed=int(self.digest[:8], 16))
        ort = ORTModel(model_bytes, {spec.name: (X.shape[0], spec.shape[1])}, from_cache=False)
        want = ort.run({spec.name: X})
        got = finalize(self._graph, self.scores(X))
        worst = 0.0
        for name, value in want.items():
            mine = got.get(name)
            if mine is None or mine.shape != value.shape:
                msg = f"the treelite engine disagrees with onnxruntime on output {name!r} (shape); not used"
                raise CompileError(msg, output=name)
            if np.issubdtype(value.dtype, np.floating):
                diff = float(np.nanmax(np.abs(mine.astype(np.float64) - value))) if value.size else 0.0
                ok = np.allclose(mine, value, rtol=_TOL, atol=_TOL, equal_nan=True)
            else:
                diff, ok = float(np.count_nonzero(mine != value)), bool(np.array_equal(mine, value))
            worst = max(worst, diff)
            if not ok:
                msg = f"the treelite engine disagrees with onnxruntime on probe rows ({name}: {diff:.3g}); not used"
                raise CompileError(msg, output=name, max_abs_diff=diff)
        return worst

    def __repr__(self) -> str:
        return f"TreeliteONNXModel({self.digest[:12]}…, inputs={[s.name for s in self.inputs]})"


def _export(graph: TreeGraph, libpath: Path) -> None:
    import tl2cgen
    import treelite

    try:
        tl2cgen.export_lib(build_treelite(graph), toolchain="gcc", libpath=libpath, params={"parallel_comp": 1})
    except (tl2cgen.TL2cgenError, treelite.TreeliteError, OSError, subprocess.SubprocessError) as exc:
        text = str(exc).strip()
        msg = f"tree compilation failed: {text.splitlines()[-1] if text else repr(exc)}"
        raise CompileError(msg) from exc


def compile_onnx_trees(
    model_bytes: bytes, input_shapes: Mapping[str, Sequence[int]], cache_dir: Path
) -> TreeliteONNXModel:
    """Compile (or load from ``cache_dir``) a tree-ensemble graph; refused graphs raise ``UnsupportedOperator``."""
    graph, _ = _parse(model_bytes, input_shapes)  # refuses before any compiler runs
    key = model_digest(model_bytes, input_shapes)
    final = cache_dir / f"{_PREFIX}{key}"
    if (final / "meta.json").is_file() and (final / "model.so").is_file():
        meta = json.loads((final / "meta.json").read_text())
        if meta.get("so_sha256") == _sha256_file(final / "model.so"):  # checked before the library is loaded
            return TreeliteONNXModel(final, from_cache=True)
        shutil.rmtree(final, ignore_errors=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=cache_dir))
    try:
        t0 = time.perf_counter()
        _export(graph, work / "model.so")
        (work / "model.onnx").write_bytes(model_bytes)
        meta = {
            "digest": key,
            "engine": ENGINE,
            "input_shapes": {str(k): [int(d) for d in v] for k, v in input_shapes.items()},
            "so_sha256": _sha256_file(work / "model.so"),
            "model_sha256": hashlib.sha256(model_bytes).hexdigest(),
            "toolchain": _toolchain_id(),
            "trees": len(graph.trees),
        }
        (work / "meta.json").write_text(json.dumps(meta))
        module = TreeliteONNXModel(work, from_cache=False)
        meta["parity_max_abs_diff"] = module.check_parity(model_bytes)
        meta["compile_seconds"] = time.perf_counter() - t0
        (work / "meta.json").write_text(json.dumps(meta))
        shutil.rmtree(final, ignore_errors=True)
        work.rename(final)
        return TreeliteONNXModel(final, from_cache=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)
