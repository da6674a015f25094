"""onnxruntime as the enclave's second ONNX engine, for graphs TVM 0.27's relax frontend cannot take.

TVM stays the compiler for what it supports. A graph with an operator its frontend has no converter for
(the ``ai.onnx.ml`` operators skl2onnx emits: ``LinearClassifier``, ``LinearRegressor``, ``ZipMap``,
``Scaler``, ``ArrayFeatureExtractor``, ``TreeEnsemble*``...; ``LSTM``, ``GRU``) runs on onnxruntime's CPU
execution provider instead, in the same service worker (``engine="auto"``; an operator of a domain
onnxruntime does not implement stays an ``UnsupportedOperator`` error from TVM's path). A caller may pin
an engine: ``"tvm"`` (an unsupported operator is then an ``UnsupportedOperator`` error), ``"onnxruntime"``,
or ``"treelite"``: tree ensembles (``TreeEnsembleRegressor`` / ``TreeEnsembleClassifier``, optionally followed by
``ZipMap``/``Cast``/``Identity``) compiled to a library by the compiled-tree path (``ml/onnx_trees.py``);
``auto`` sends such a graph there, and on to onnxruntime if treelite refuses it.

onnxruntime is native code the enclave loads, so it is listed in the measurement's unsafe components
(``attestation/measurement.py``). The module's ``library_sha256`` is the digest of (onnxruntime's
version, the model bytes), and the service's reply names the engine, so the receipt binds which engine
ran on which model. Outputs that onnxruntime returns as a sequence of maps (``ZipMap``: one
``{class: probability}`` per row) become a 2-D array, one column per class in the map's order.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mesatee_notebook.ml._errors import InputShapeError, MLInputError, ModelFormatError, UnsupportedOperator
from mesatee_notebook.ml.tvm_runtime import TensorSpec

__all__ = ["ENGINES", "ORTModel", "choose_engine", "model_digest", "ort_version"]

ENGINES = ("auto", "tvm", "onnxruntime", "treelite")
_ORT_DOMAINS = frozenset({"ai.onnx.ml", "com.microsoft"})

_ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(bool)": "bool",
}


def ort_version() -> str:
    """The onnxruntime version that runs (part of every module digest)."""
    import onnxruntime

    return str(onnxruntime.__version__)


def choose_engine(model_bytes: bytes, requested: str, input_shapes: Mapping[str, Sequence[int]] | None = None) -> str:
    """``"tvm"``, ``"onnxruntime"`` or ``"treelite"`` for this model.

    ``auto`` picks treelite for a tree-ensemble graph it can take (``ml/onnx_trees.py``), onnxruntime for
    other graphs TVM cannot import, TVM for the rest.
    """
    if requested not in ENGINES:
        msg = f"engine must be one of {', '.join(ENGINES)}, not {requested!r}"
        raise MLInputError(msg, engine=requested)
    if requested != "auto":
        return requested
    import onnx

    from mesatee_notebook.ml.tvm_runtime import unsupported_ops

    try:
        model = onnx.load_from_string(model_bytes)
    except Exception:  # protobuf's DecodeError among others: TVM's path reports ModelFormatError
        return "tvm"
    bad = unsupported_ops(model)
    if bad and _takes_trees(model, input_shapes):
        return "treelite"
    # Only domains onnxruntime implements: an unknown domain stays on TVM's path, which names the operator.
    if bad and all(op.split(":")[0] in _ORT_DOMAINS for op in bad if ":" in op):
        return "onnxruntime"
    return "tvm"


def _takes_trees(model: Any, input_shapes: Mapping[str, Sequence[int]] | None) -> bool:
    """Whether the treelite engine can take this graph (a refusal here only means: not treelite)."""
    from mesatee_notebook.ml.onnx_trees import parse_tree_graph

    shapes = list((input_shapes or {}).values())
    width = int(shapes[0][-1]) if len(shapes) == 1 and len(shapes[0]) == 2 else 1 << 30
    try:
        parse_tree_graph(model, width)
    except UnsupportedOperator:
        return False
    return True


def model_digest(model_bytes: bytes, input_shapes: Mapping[str, Sequence[int]]) -> str:
    """Handle of an onnxruntime module: (engine, version, model, shapes)."""
    shapes = json.dumps({str(k): [int(d) for d in v] for k, v in input_shapes.items()}, sort_keys=True)
    h = hashlib.sha256(b"onnxruntime\0" + ort_version().encode() + b"\0")
    h.update(hashlib.sha256(model_bytes).digest() + shapes.encode())
    return h.hexdigest()


def _as_array(value: Any) -> np.ndarray:
    """An onnxruntime output as an array: a ZipMap's list of ``{class: p}`` becomes ``(rows, classes)``."""
    if isinstance(value, list) and value and isinstance(value[0], dict):
        keys = list(value[0])
        return np.asarray([[row[k] for k in keys] for row in value], dtype=np.float32)
    return np.asarray(value)


class ORTModel:
    """An ONNX model loaded into an onnxruntime ``InferenceSession`` (CPU, one thread) for static shapes."""

    __slots__ = ("_session", "digest", "from_cache", "inputs", "meta", "outputs")

    engine = "onnxruntime"

    def __init__(self, model_bytes: bytes, input_shapes: Mapping[str, Sequence[int]], *, from_cache: bool) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        try:
            self._session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph classes from C++
            msg = f"onnxruntime cannot load the model: {str(exc).strip().splitlines()[0][:300]}"
            raise ModelFormatError(msg) from exc
        self.digest = model_digest(model_bytes, input_shapes)
        self.from_cache = from_cache
        self.inputs = tuple(self._input_specs(input_shapes))
        probe = self._raw({s.name: np.zeros(s.shape, dtype=s.dtype) for s in self.inputs})
        self.outputs = tuple(
            TensorSpec(name, tuple(int(d) for d in v.shape), str(v.dtype)) for name, v in probe.items()
        )
        self.meta: dict[str, Any] = {
            "engine": self.engine,
            "onnxruntime": ort_version(),
            "model_sha256": hashlib.sha256(model_bytes).hexdigest(),
        }

    def _input_specs(self, input_shapes: Mapping[str, Sequence[int]]) -> list[TensorSpec]:
        graph = self._session.get_inputs()
        names = [i.name for i in graph]
        missing, extra = [n for n in names if n not in input_shapes], sorted(set(input_shapes) - set(names))
        if missing or extra:
            msg = f"input_shapes must name exactly the model's inputs {names}; missing {missing}, unknown {extra}"
            raise InputShapeError(msg, inputs=names, missing=missing, extra=extra)
        specs = []
        for item in graph:
            dtype = _ORT_DTYPES.get(str(item.type))
            if dtype is None:
                msg = f"input {item.name!r} has type {item.type}; tensors of float, double, int32/64 or bool only"
                raise InputShapeError(msg, input=item.name)
            shape = tuple(int(d) for d in input_shapes[item.name])
            declared = item.shape
            if len(declared) != len(shape) or any(
                isinstance(d, int) and d != s for d, s in zip(declared, shape, strict=False)
            ):
                msg = f"input_shapes[{item.name!r}] = {list(shape)} does not fit the model's shape {declared}"
                raise InputShapeError(msg, input=item.name, shape=list(shape))
            specs.append(TensorSpec(item.name, shape, dtype))
        return specs

    @property
    def library_sha256(self) -> str:
        """Digest of (onnxruntime version, model bytes): what ran, for receipts."""
        text = f"onnxruntime:{self.meta['onnxruntime']}:{self.meta['model_sha256']}"
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def tuned_trials(self) -> int:
        """Always 0 (onnxruntime is not tuned)."""
        return 0

    def _raw(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [o.name for o in self._session.get_outputs()]
        try:
            values = self._session.run(names, dict(feeds))
        except Exception as exc:  # onnxruntime's RuntimeException and friends
            msg = f"onnxruntime failed to run the model: {str(exc).strip().splitlines()[0][:300]}"
            raise MLInputError(msg) from exc
        return {n: _as_array(v) for n, v in zip(names, values, strict=True)}

    def run(self, inputs: Mapping[str, Any] | np.ndarray) -> dict[str, np.ndarray]:
        """Run the model; ``inputs`` maps input names to arrays (or is the array of a one-input model)."""
        if isinstance(inputs, np.ndarray):
            if len(self.inputs) != 1:
                msg = f"the model has {len(self.inputs)} inputs; pass a mapping of name to array"
                raise InputShapeError(msg, inputs=[s.name for s in self.inputs])
            inputs = {self.inputs[0].name: inputs}
        want = {s.name for s in self.inputs}
        missing, extra = sorted(want - set(inputs)), sorted(set(inputs) - want)
        if missing or extra:
            msg = f"model inputs are {sorted(want)}; missing {missing}, unexpected {extra}"
            raise InputShapeError(msg, missing=missing, extra=extra)
        feeds = {}
        for spec in self.inputs:
            value = np.asarray(inputs[spec.name])
            if value.dtype != np.dtype(spec.dtype) and not np.can_cast(value.dtype, spec.dtype, casting="same_kind"):
                msg = f"input {spec.name!r} has dtype {value.dtype}; the model takes {spec.dtype}"
                raise InputShapeError(msg, input=spec.name, dtype=str(value.dtype), expected=spec.dtype)
            if tuple(value.shape) != spec.shape:
                msg = f"input {spec.name!r} has shape {tuple(value.shape)}; the module was compiled for {spec.shape}"
                raise InputShapeError(msg, input=spec.name, shape=list(value.shape), expected=list(spec.shape))
            feeds[spec.name] = np.ascontiguousarray(value.astype(spec.dtype, copy=False))
        return self._raw(feeds)

    def __repr__(self) -> str:
        return f"ORTModel({self.digest[:12]}…, inputs={[s.name for s in self.inputs]})"
