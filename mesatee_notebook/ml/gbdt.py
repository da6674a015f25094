"""Gradient-boosted trees with native xgboost (``hist``), as run inside the enclave.

The engine takes pandas DataFrames (label given by column name) or numpy arrays
(label given as an array), streams per-round metrics through a ``progress``
callback, and keeps the model as a :class:`GBDTModel` handle. Models leave only
as xgboost JSON bytes (:meth:`GBDTModel.to_json`), never pickled.

Every input problem is a typed error from :mod:`mesatee_notebook.ml._errors`.

Why this module is over ~500 lines: the xgboost engine (train, continue, predict, evaluate, export) and the
parameter checks that keep exact parity with native xgboost.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, TypeAlias

import numpy as np
import numpy.typing as npt
import pandas as pd
import xgboost as xgb

from mesatee_notebook.ml import gbdt_cats
from mesatee_notebook.ml._errors import (
    FeatureMismatch,
    InvalidLabels,
    MissingLabel,
    MLInputError,
    ModelFormatError,
    NonNumericFeatures,
)
from mesatee_notebook.wire.frame_layouts import single_dtype

__all__ = [
    "BINARY_OBJECTIVES",
    "IMPORTANCE_KINDS",
    "MULTICLASS_OBJECTIVES",
    "REGRESSION_OBJECTIVES",
    "Data",
    "EvalSet",
    "GBDTModel",
    "Label",
    "Progress",
    "Task",
    "load_model",
    "train",
]

Data: TypeAlias = pd.DataFrame | np.ndarray
"""Features: a DataFrame of numeric columns, or a 2-D numeric array."""
Label: TypeAlias = str | np.ndarray | pd.Series | Sequence[float]
"""A label column name (DataFrames only) or one label per row."""
EvalSet: TypeAlias = Data | tuple[Data, Label]
"""An eval set: a DataFrame holding the label column, or ``(features, label)``."""
Progress: TypeAlias = Callable[[dict[str, Any]], None]
"""Called after each boosting round of this call (``round`` counts from 0) with
``{"event": "round", "round", "rounds", "metrics": {eval_name: {metric: value}}, "elapsed_s"}``."""
Task: TypeAlias = Literal["binary", "multiclass", "regression"]
F32Array: TypeAlias = npt.NDArray[np.float32]

BINARY_OBJECTIVES = frozenset({"binary:logistic", "binary:logitraw", "binary:hinge"})
MULTICLASS_OBJECTIVES = frozenset({"multi:softprob", "multi:softmax"})
REGRESSION_OBJECTIVES = frozenset(
    {
        "reg:squarederror",
        "reg:squaredlogerror",
        "reg:logistic",
        "reg:pseudohubererror",
        "reg:absoluteerror",
        "reg:gamma",
        "reg:tweedie",
        "count:poisson",
    }
)
IMPORTANCE_KINDS = ("gain", "weight", "cover", "total_gain", "total_cover")
_LABEL_ATTR = "mesatee_label"


def _task_of(objective: str) -> Task:
    if objective in BINARY_OBJECTIVES:
        return "binary"
    if objective in MULTICLASS_OBJECTIVES:
        return "multiclass"
    if objective in REGRESSION_OBJECTIVES:
        return "regression"
    supported = sorted(BINARY_OBJECTIVES | MULTICLASS_OBJECTIVES | REGRESSION_OBJECTIVES)
    msg = f"objective {objective!r} is not supported here; use one of {', '.join(supported)}"
    raise MLInputError(msg, objective=objective)


def _numeric_kind(dtype: Any) -> bool:
    """Tell whether a dtype is bool, integer or float (numpy or pandas nullable)."""
    return bool(pd.api.types.is_bool_dtype(dtype) or pd.api.types.is_numeric_dtype(dtype)) and not (
        pd.api.types.is_complex_dtype(dtype)
    )


def _dtype_kinds(frame: pd.DataFrame) -> dict[Any, bool]:
    """Whether each of the frame's dtypes is numeric (read once: pandas 3's column index is slow to iterate)."""
    return {t: _numeric_kind(t) for t in set(frame.dtypes.tolist())}


def _frame_to_matrix(frame: pd.DataFrame) -> F32Array:
    # frame.dtypes builds a Series and iterating pandas 3's Arrow-backed column index is slow: on a 1-row
    # predict these checks cost more than the prediction, so read both once and check each dtype once
    # (or not at all for a frame of one numpy bool/int/float dtype, whose every column is numeric).
    one = single_dtype(frame) if frame.shape[1] else None
    if one is not None and one.kind in "biuf":
        return np.ascontiguousarray(frame.to_numpy(dtype=np.float32, na_value=np.nan))
    dtypes = frame.dtypes.tolist()
    numeric = {t: _numeric_kind(t) for t in set(dtypes)}
    bad = [str(c) for c, t in zip(frame.columns.tolist(), dtypes, strict=True) if not numeric[t]]
    if bad:
        kinds = ", ".join(f"{c!r} ({frame[c].dtype})" for c in frame.columns if str(c) in bad)
        cats = gbdt_cats.category_columns(frame)
        hint = " or train with enable_categorical=True for the 'category' columns" if cats else ""
        msg = f"feature columns must be numeric; encode these first (e.g. one-hot or category codes){hint}: {kinds}"
        raise NonNumericFeatures(msg, columns=bad)
    return np.ascontiguousarray(frame.to_numpy(dtype=np.float32, na_value=np.nan))


_NUMBER_TYPES = (bool, int, float, np.number, np.bool_)


def _array_to_matrix(array: np.ndarray, expected: int | None) -> F32Array:
    if array.dtype.kind == "O" and all(isinstance(v, _NUMBER_TYPES) or v is None for v in array.flat):
        array = np.asarray([np.nan if v is None else v for v in array.flat], dtype=np.float32).reshape(array.shape)
    if array.dtype.kind not in "biuf":
        msg = f"feature array must be numeric, got dtype {array.dtype}; encode non-numeric values first"
        raise NonNumericFeatures(msg, columns=[], dtype=str(array.dtype))
    if array.ndim == 1 and expected is not None and array.shape[0] == expected:
        array = array.reshape(1, -1)
    if array.ndim != 2:
        msg = f"feature array must be 2-D (rows, features), got shape {array.shape}"
        raise MLInputError(msg, shape=list(array.shape))
    return np.ascontiguousarray(array, dtype=np.float32)


def _column_names(frame: pd.DataFrame) -> list[str]:
    names = [str(c) for c in frame.columns.tolist()]
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        msg = f"duplicate feature column names: {', '.join(dupes)}"
        raise MLInputError(msg, columns=dupes)
    return names


def _labels(values: Any, rows: int, name: str) -> npt.NDArray[np.float64]:
    try:
        # a copy, never a view: a view would keep the received buffers alive while boosting (P8)
        y = np.array(values, dtype=np.float64, copy=True)
    except (TypeError, ValueError) as exc:
        msg = f"{name} must be numeric"
        raise InvalidLabels(msg) from exc
    if y.ndim != 1:
        y = y.reshape(-1) if y.size == rows else y
    if y.ndim != 1 or y.shape[0] != rows:
        msg = f"{name} has {y.size} values for {rows} rows"
        raise InvalidLabels(msg, rows=rows, labels=int(y.size))
    bad = int(np.count_nonzero(~np.isfinite(y)))
    if bad:
        msg = f"{name} has {bad} NaN or infinite value(s); drop or impute those rows first"
        raise InvalidLabels(msg, count=bad)
    return y


_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
Features: TypeAlias = F32Array | pd.DataFrame
"""Training features: a float32 matrix, or a DataFrame whose columns are all plain numpy floats."""


def _float_columns(frame: pd.DataFrame) -> bool:
    """Whether xgboost can read ``frame``'s columns in place (numpy float32/float64, no extension types)."""
    return all(isinstance(t, np.dtype) and t in _FLOAT_DTYPES for t in frame.dtypes)


def _frame_features(frame: pd.DataFrame, names: list[str], in_place: bool, categorical: bool) -> Features:
    """The features xgboost reads: the frame itself, or a float32 copy.

    Float columns are read in place; with ``categorical``, numeric and ``category`` columns as they are (as
    native xgboost takes them).
    """
    if categorical and gbdt_cats.category_columns(frame):
        gbdt_cats.check_categorical_frame(frame, _dtype_kinds(frame))
        return frame.set_axis(names, axis=1)
    if in_place and _float_columns(frame):
        return frame.set_axis(names, axis=1)
    return _frame_to_matrix(frame)


def _split(
    data: Data, label: Label, what: str = "label", *, in_place: bool = False, categorical: bool = False
) -> tuple[Features, npt.NDArray[np.float64], list[str] | None]:
    """Return (features, labels, feature names or None for arrays).

    With ``in_place``, a DataFrame of plain float columns is returned as it is (xgboost reads its
    columns where they lie, casting to float32 as ``_frame_to_matrix`` does), not copied into a matrix.
    With ``categorical``, a DataFrame with ``category`` columns is returned as it is too.
    """
    if isinstance(data, pd.DataFrame):
        if isinstance(label, str):
            if label not in data.columns:
                msg = f"label column {label!r} is not in the DataFrame (columns: {', '.join(map(str, data.columns))})"
                raise MissingLabel(msg, label=label)
            y_values: Any = data[label].to_numpy()
            frame = data.drop(columns=[label])
        else:
            y_values, frame = label, data
        names = _column_names(frame)
        X = _frame_features(frame, names, in_place, categorical)
        return X, _labels(y_values, X.shape[0], f"{what} {label!r}" if isinstance(label, str) else what), names
    if isinstance(data, np.ndarray):
        if isinstance(label, str):
            msg = f"a label given by name ({label!r}) needs a DataFrame; pass the labels as an array"
            raise MissingLabel(msg, label=label)
        X = _array_to_matrix(data, None)
        return X, _labels(label, X.shape[0], what), None
    msg = f"features must be a pandas DataFrame or a numpy array, not {type(data).__name__}"
    raise MLInputError(msg, type=type(data).__name__)


def _check_labels(objective: str, y: npt.NDArray[np.float64], num_class: int | None) -> None:
    task = _task_of(objective)
    if task == "binary" and (y.min() < 0 or y.max() > 1):
        msg = f"{objective} needs labels in [0, 1], got values in [{y.min()}, {y.max()}]"
        raise InvalidLabels(msg, objective=objective)
    if task == "multiclass":
        if np.any(y < 0) or np.any(y != np.round(y)):
            msg = f"{objective} needs integer class labels 0..num_class-1"
            raise InvalidLabels(msg, objective=objective)
        if num_class is not None and y.max() >= num_class:
            msg = f"label {int(y.max())} is out of range for num_class={num_class}"
            raise InvalidLabels(msg, objective=objective, num_class=num_class)


class _ProgressCallback(xgb.callback.TrainingCallback):
    """Forwards the latest value of every eval metric after each round."""

    def __init__(self, progress: Progress, rounds: int) -> None:
        super().__init__()
        self._progress = progress
        self._rounds = rounds
        self._t0 = time.perf_counter()

    def after_iteration(self, model: Any, epoch: int, evals_log: Any) -> bool:
        metrics: dict[str, dict[str, float]] = {}
        for data_name, per_metric in evals_log.items():
            metrics[data_name] = {}
            for metric, values in per_metric.items():
                last = values[-1]
                metrics[data_name][metric] = float(last[0] if isinstance(last, tuple) else last)
        self._progress(
            {
                "event": "round",
                "round": epoch,
                "rounds": self._rounds,
                "metrics": metrics,
                "elapsed_s": time.perf_counter() - self._t0,
            }
        )
        return False


class GBDTModel:
    """A trained xgboost booster plus what the engine needs to check its inputs.

    ``booster`` is the raw xgboost object: other engines (treecompile) use it,
    user code should go through the methods.
    """

    __slots__ = ("_booster", "_cats", "_history", "_names", "_num_class", "_objective", "_types")

    def __init__(self, booster: xgb.Booster, history: Mapping[str, Mapping[str, list[float]]] | None = None) -> None:
        self._booster = booster
        config = json.loads(booster.save_config())["learner"]
        self._objective = str(config["objective"]["name"])
        self._num_class = int(config["learner_model_param"].get("num_class", "0"))
        self._history = {k: dict(v) for k, v in (history or {}).items()}
        self._types: tuple[str, ...] | None = tuple(booster.feature_types) if booster.feature_types else None
        # Read once, like the types: the booster's property is a C call that builds the list (0.1 ms per predict).
        self._names: tuple[str, ...] | None = tuple(booster.feature_names) if booster.feature_names else None
        self._cats = gbdt_cats.model_categories(booster) if self.categorical else {}
        _task_of(self._objective)

    @property
    def booster(self) -> xgb.Booster:
        """The underlying xgboost booster (for other engines, not for user code)."""
        return self._booster

    @property
    def objective(self) -> str:
        """The xgboost objective, e.g. ``binary:logistic``."""
        return self._objective

    @property
    def task(self) -> Task:
        """``binary``, ``multiclass`` or ``regression``."""
        return _task_of(self._objective)

    @property
    def num_class(self) -> int:
        """Number of classes for multiclass models, else 1."""
        return self._num_class if self.task == "multiclass" else 1

    @property
    def num_features(self) -> int:
        """Number of feature columns the model expects."""
        return int(self._booster.num_features())

    @property
    def feature_names(self) -> tuple[str, ...]:
        """Feature names (``f0``, ``f1``, ... when trained on an array)."""
        return self._names or tuple(f"f{i}" for i in range(self.num_features))

    @property
    def feature_types(self) -> tuple[str, ...] | None:
        """The xgboost feature types (``"c"`` for a categorical feature), or None when all are numbers."""
        return self._types

    @property
    def categorical(self) -> bool:
        """Whether the model has categorical features (trained with ``enable_categorical=True``)."""
        return self._types is not None and "c" in self._types

    @property
    def categories(self) -> dict[str, list[Any]]:
        """The categories recorded at training per categorical feature, in code order (they came from the data)."""
        return {k: v.tolist() for k, v in self._cats.items()}

    @property
    def label(self) -> str | None:
        """The label column name, when trained on a DataFrame by name."""
        return self._booster.attr(_LABEL_ATTR)

    @property
    def num_rounds(self) -> int:
        """Number of boosting rounds held by the model."""
        return int(self._booster.num_boosted_rounds())

    @property
    def best_iteration(self) -> int | None:
        """Best round found by early stopping (0-based), if it ran."""
        value = self._booster.attr("best_iteration")
        return None if value is None else int(value)

    @property
    def history(self) -> dict[str, dict[str, list[float]]]:
        """Per-round eval metrics of the last training call: ``{eval_name: {metric: [values]}}``."""
        return {k: {m: list(v) for m, v in d.items()} for k, d in self._history.items()}

    @property
    def digest(self) -> str:
        """SHA-256 (hex) of the model's xgboost JSON; a stable cache key."""
        return hashlib.sha256(self.to_json()).hexdigest()

    def to_matrix(self, data: Data) -> F32Array:
        """Check features against the model and return them as a float32 matrix in training order."""
        if isinstance(data, pd.DataFrame):
            trained_names = self._names
            if trained_names is None:
                frame = data.drop(columns=[c for c in data.columns if str(c) == self.label])
                X = self._frame_matrix(frame)
            else:
                names = _column_names(data)
                have, want = set(names), set(trained_names)
                missing = [n for n in trained_names if n not in have]
                extra = [n for n in names if n not in want and n != self.label]
                if missing or extra:
                    parts = []
                    if missing:
                        parts.append(f"missing: {', '.join(missing)}")
                    if extra:
                        parts.append(f"not in the model: {', '.join(extra)}")
                    msg = f"feature columns differ from training ({'; '.join(parts)})"
                    raise FeatureMismatch(msg, missing=missing, extra=extra)
                ordered = names == list(trained_names)  # the usual case: no renaming or reordering needed
                sub = data if ordered else data.set_axis(names, axis=1)[list(trained_names)]
                X = self._frame_matrix(sub)
        elif isinstance(data, np.ndarray):
            X = _array_to_matrix(data, self.num_features)
        else:
            msg = f"features must be a pandas DataFrame or a numpy array, not {type(data).__name__}"
            raise MLInputError(msg, type=type(data).__name__)
        if X.shape[1] != self.num_features:
            msg = f"model expects {self.num_features} features, got {X.shape[1]}"
            raise FeatureMismatch(msg, expected=self.num_features, got=int(X.shape[1]))
        return X

    def _frame_matrix(self, frame: pd.DataFrame) -> F32Array:
        """Numbers as float32; categorical columns as the codes of the categories recorded at training."""
        if self._types is None or not self.categorical:
            return _frame_to_matrix(frame)
        if frame.shape[1] != len(self._types):
            msg = f"model expects {len(self._types)} features, got {frame.shape[1]}"
            raise FeatureMismatch(msg, expected=len(self._types), got=int(frame.shape[1]))
        return gbdt_cats.encode_frame(frame, self._types, self._cats)

    def predict(self, data: Data, *, margin: bool = False) -> npt.NDArray[np.float32]:
        """Predict: probabilities (binary ``(n,)``, multiclass ``(n, k)``), values, or raw margins."""
        X = self.to_matrix(data)
        out = self._booster.inplace_predict(X, predict_type="margin" if margin else "value", validate_features=False)
        return np.asarray(out, dtype=np.float32)

    def evaluate(self, data: Data, label: Label | None = None) -> dict[str, float]:
        """Metrics for the objective: logloss/auc/accuracy, mlogloss/accuracy, or rmse/mae/r2."""
        if label is None:
            if self.label is None:
                msg = "pass the labels: this model was not trained with a label column name"
                raise MissingLabel(msg)
            label = self.label
        if isinstance(data, pd.DataFrame) and isinstance(label, str):
            if label not in data.columns:
                msg = f"label column {label!r} is not in the DataFrame"
                raise MissingLabel(msg, label=label)
            X = self.to_matrix(data.drop(columns=[label]))
            y = _labels(data[label].to_numpy(), X.shape[0], f"label {label!r}")
        elif isinstance(label, str):
            msg = f"a label given by name ({label!r}) needs a DataFrame; pass the labels as an array"
            raise MissingLabel(msg, label=label)
        else:
            X = self.to_matrix(data)
            y = _labels(label, X.shape[0], "label")
        task = self.task
        if task == "regression":
            pred = self._booster.inplace_predict(X, validate_features=False).astype(np.float64)
            return _regression_metrics(y, pred)
        margin = np.asarray(self._booster.inplace_predict(X, predict_type="margin", validate_features=False))
        if task == "binary":
            return _binary_metrics(y, self._objective, margin.astype(np.float64).reshape(-1))
        return _multiclass_metrics(y, margin.astype(np.float64).reshape(len(y), -1))

    def feature_importance(self, kind: str = "gain") -> dict[str, float]:
        """Return every feature's importance (0.0 when unused) by ``gain``, ``weight``, ``cover`` or totals."""
        if kind not in IMPORTANCE_KINDS:
            msg = f"importance kind must be one of {', '.join(IMPORTANCE_KINDS)}, not {kind!r}"
            raise MLInputError(msg, kind=kind)
        scores = self._booster.get_score(importance_type=kind)
        return {name: float(np.asarray(scores.get(name, 0.0)).sum()) for name in self.feature_names}

    def to_json(self) -> bytes:
        """Return the model as xgboost JSON bytes (loadable by stock xgboost)."""
        return bytes(self._booster.save_raw(raw_format="json"))

    def __repr__(self) -> str:
        return (
            f"GBDTModel(objective={self._objective!r}, features={self.num_features}, "
            f"rounds={self.num_rounds}, digest={self.digest[:12]})"
        )


def _sigmoid(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    return np.asarray(0.5 * (1.0 + np.tanh(0.5 * x)))


def _auc(y: npt.NDArray[np.float64], score: npt.NDArray[np.float64]) -> float:
    """Area under the ROC curve (Mann-Whitney, ties averaged); NaN with one class."""
    pos = y >= 0.5
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = pd.Series(score).rank(method="average").to_numpy()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _binary_metrics(y: npt.NDArray[np.float64], objective: str, margin: npt.NDArray[np.float64]) -> dict[str, float]:
    eps = 1e-15
    p = (margin > 0).astype(np.float64) if objective == "binary:hinge" else _sigmoid(margin)
    pc = np.clip(p, eps, 1 - eps)
    logloss = float(-np.mean(y * np.log(pc) + (1 - y) * np.log(1 - pc)))
    return {
        "logloss": logloss,
        "auc": _auc(y, margin),
        "accuracy": float(np.mean((p >= 0.5) == (y >= 0.5))),
        "rows": float(len(y)),
    }


def _multiclass_metrics(y: npt.NDArray[np.float64], margin: npt.NDArray[np.float64]) -> dict[str, float]:
    shifted = margin - margin.max(axis=1, keepdims=True)
    probs = np.exp(shifted)
    probs /= probs.sum(axis=1, keepdims=True)
    k = probs.shape[1]
    idx = y.astype(np.int64)
    if idx.min() < 0 or idx.max() >= k:
        msg = f"labels must be class indices 0..{k - 1}"
        raise InvalidLabels(msg, num_class=k)
    picked = np.clip(probs[np.arange(len(idx)), idx], 1e-15, 1.0)
    return {
        "mlogloss": float(-np.mean(np.log(picked))),
        "accuracy": float(np.mean(probs.argmax(axis=1) == idx)),
        "rows": float(len(y)),
    }


def _regression_metrics(y: npt.NDArray[np.float64], pred: npt.NDArray[np.float64]) -> dict[str, float]:
    err = pred.reshape(-1) - y
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(np.sum(err**2)) / ss_tot if ss_tot > 0 else math.nan
    return {
        "rmse": float(np.sqrt(np.mean(err**2))),
        "mae": float(np.mean(np.abs(err))),
        "r2": r2,
        "rows": float(len(y)),
    }


def _dmatrix(
    X: Features,
    y: npt.NDArray[np.float64],
    names: list[str] | None,
    ref: xgb.QuantileDMatrix | None = None,
    weight: npt.NDArray[np.float64] | None = None,
    cat: _CatSpec | None = None,
    max_bin: int | None = None,
) -> xgb.QuantileDMatrix:
    """A quantised matrix: ``hist`` trains on bin indices (1 byte a value), so no float copy is kept.

    Models are identical to those trained from a plain ``DMatrix`` with ``hist``; eval sets share the
    training matrix's cuts through ``ref``. A DataFrame of float columns is read column by column in
    place (no float32 copy of the whole table).
    """
    kw: dict[str, Any] = {} if cat is None else {"enable_categorical": cat.enabled, "feature_types": cat.types}
    if max_bin is not None:  # the cuts are made here: the booster's max_bin must match them (issue 16, B1)
        kw["max_bin"] = max_bin
    try:
        return xgb.QuantileDMatrix(X, label=y, weight=weight, feature_names=names, ref=ref, **kw)
    except (ValueError, xgb.core.XGBoostError) as exc:
        msg = f"xgboost refused the data: {exc}"
        raise MLInputError(msg) from exc


class _CatSpec:
    """The categorical settings of one training call (``enable_categorical``, ``feature_types``)."""

    __slots__ = ("categories", "enabled", "types")

    def __init__(self, enabled: bool, types: Sequence[str] | None) -> None:
        self.enabled = enabled
        self.types = None if types is None else [str(t) for t in types]
        self.categories: dict[str, pd.Index] = {}  # the training frame's, that eval sets are re-coded to

    @classmethod
    def of(cls, merged: dict[str, Any], enabled: bool, types: Sequence[str] | None) -> _CatSpec | None:
        """Take the DMatrix settings out of ``merged`` (``params={"enable_categorical": True}`` works too)."""
        enabled = bool(merged.pop("enable_categorical", False)) or enabled
        types = merged.pop("feature_types", None) if types is None else types
        return cls(enabled, types) if enabled or types is not None else None

    def align(self, X: Features, what: str) -> Features:
        """Eval-set and continuation frames in the training frame's category order (values checked)."""
        if isinstance(X, pd.DataFrame) and self.categories:
            return gbdt_cats.align_categories(X, self.categories, what)
        return X


def _trim_heap() -> None:
    """Hand the sketching's freed temporaries back to the OS (glibc keeps them mapped otherwise)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def _train_params(
    params: Mapping[str, Any] | None, init_model: GBDTModel | None, num_boost_round: int
) -> dict[str, Any]:
    merged: dict[str, Any] = {"objective": "reg:squarederror", "seed": 0, "tree_method": "hist"}
    if init_model is not None:
        merged["objective"] = init_model.objective
        if init_model.task == "multiclass":
            merged["num_class"] = init_model.num_class
    merged.update(params or {})
    if merged["tree_method"] != "hist":
        msg = f"this engine trains with tree_method='hist', not {merged['tree_method']!r}"
        raise MLInputError(msg, tree_method=merged["tree_method"])
    if str(merged.get("device", "cpu")) != "cpu":
        msg = "the enclave has no GPU: device must be 'cpu'"
        raise MLInputError(msg, device=merged["device"])
    if num_boost_round < 1:
        msg = f"num_boost_round must be at least 1, got {num_boost_round}"
        raise MLInputError(msg)
    _task_of(str(merged["objective"]))
    return merged


def _watchlist(
    evals: Mapping[str, EvalSet] | None,
    label: Label,
    dtrain: xgb.QuantileDMatrix,
    n_features: int,
    names: list[str] | None,
    cat: _CatSpec | None = None,
    max_bin: int | None = None,
) -> list[tuple[xgb.DMatrix, str]]:
    watch: list[tuple[xgb.DMatrix, str]] = []
    categorical = cat is not None and cat.enabled
    for name, eval_set in (evals or {}).items():
        if isinstance(eval_set, tuple):
            eX, ey, enames = _split(
                eval_set[0], eval_set[1], f"eval set {name!r} label", in_place=True, categorical=categorical
            )
        elif not isinstance(label, str):
            msg = f"eval set {name!r} must be a (features, labels) pair when the label is not a column name"
            raise MLInputError(msg, eval_set=name)
        else:
            eX, ey, enames = _split(eval_set, label, f"eval set {name!r} label", in_place=True, categorical=categorical)
        if eX.shape[1] != n_features or (names is not None and enames is not None and enames != names):
            msg = f"eval set {name!r} has features {enames or eX.shape[1]}, training has {names or n_features}"
            raise FeatureMismatch(msg, eval_set=name)
        if cat is not None:
            eX = cat.align(eX, f"eval set {name!r}")
        watch.append((_dmatrix(eX, ey, names, ref=dtrain, cat=cat, max_bin=max_bin), name))
    return watch


def train(
    data: Data,
    label: Label,
    *,
    params: Mapping[str, Any] | None = None,
    num_boost_round: int = 100,
    evals: Mapping[str, EvalSet] | None = None,
    early_stopping_rounds: int | None = None,
    progress: Progress | None = None,
    init_model: GBDTModel | None = None,
    weight: Sequence[float] | np.ndarray | None = None,
    enable_categorical: bool = False,
    feature_types: Sequence[str] | None = None,
    release: Callable[[], None] | None = None,
) -> GBDTModel:
    """Train (or continue training) an xgboost ``hist`` model.

    ``params`` are xgboost parameters (``objective`` defaults to ``reg:squarederror``,
    ``seed`` to 0; ``tree_method`` must stay ``hist`` and ``device`` ``cpu``).
    ``evals`` maps a name to an eval set; with ``early_stopping_rounds`` the last
    eval set's last metric decides, and the model is cut back to its best round.
    ``weight`` is one non-negative sample weight per training row.
    ``enable_categorical`` (or ``params["enable_categorical"]``): train on pandas ``category`` columns with
    xgboost's native categorical splits (``max_cat_to_onehot``, ``max_cat_threshold`` are ordinary params);
    ``feature_types`` (``"q"``/``"c"`` per feature) as in ``xgboost.DMatrix``.
    ``release`` is called once the quantised matrices exist and this function holds no reference to ``data``
    any more: a caller that drops its own references there lets the data's buffers go while boosting.
    """
    merged = _train_params(params, init_model, num_boost_round)
    cat = _CatSpec.of(merged, enable_categorical, feature_types)
    objective = str(merged["objective"])
    X, y, names = _split(data, label, in_place=True, categorical=cat is not None and cat.enabled)
    if cat is not None and isinstance(X, pd.DataFrame):
        if init_model is not None and init_model.categorical:
            X = gbdt_cats.align_categories(X, dict(init_model._cats), "continued training data")
        cat.categories = {n: X[n].cat.categories for n in gbdt_cats.category_columns(X)}
    if X.shape[0] == 0:
        msg = "no training rows"
        raise MLInputError(msg)
    if objective in MULTICLASS_OBJECTIVES and "num_class" not in merged:
        merged["num_class"] = int(y.max()) + 1
    _check_labels(objective, y, merged.get("num_class"))
    n_features = X.shape[1]
    if init_model is not None:
        _check_continuation(init_model, objective, n_features, names)

    max_bin = _max_bin(merged)
    w = None if weight is None else _weights(weight, X.shape[0])
    dtrain = _dmatrix(X, y, names, weight=w, cat=cat, max_bin=max_bin)
    del X  # the quantised matrix is all training needs; drop any float32 copy before boosting
    watch = _watchlist(evals, label, dtrain, n_features, names, cat, max_bin)
    del data, evals
    if release is not None:
        release()  # the received buffers are freed here (reference counts: no cycles hold a decoded frame)
    _trim_heap()
    callbacks: list[xgb.callback.TrainingCallback] = []
    if early_stopping_rounds is not None:
        if not watch:
            msg = "early stopping needs at least one eval set"
            raise MLInputError(msg)
        callbacks.append(xgb.callback.EarlyStopping(rounds=early_stopping_rounds, save_best=True))
    if progress is not None:
        callbacks.append(_ProgressCallback(progress, num_boost_round))

    history: dict[str, dict[str, list[float]]] = {}
    try:
        booster = xgb.train(
            merged,
            dtrain,
            num_boost_round=num_boost_round,
            evals=watch,
            evals_result=history,
            verbose_eval=False,
            xgb_model=init_model.booster.copy() if init_model is not None else None,
            callbacks=callbacks,
        )
    except xgb.core.XGBoostError as exc:
        msg = f"xgboost refused the training request: {str(exc).splitlines()[0]}"
        raise MLInputError(msg) from exc
    if isinstance(label, str):
        booster.set_attr(**{_LABEL_ATTR: label})
    elif init_model is not None and init_model.label is not None:
        booster.set_attr(**{_LABEL_ATTR: init_model.label})
    return GBDTModel(booster, history)


def _max_bin(merged: Mapping[str, Any]) -> int | None:
    value = merged.get("max_bin")
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        msg = f"max_bin must be an integer, not {value!r}"
        raise MLInputError(msg) from exc


def _weights(values: Sequence[float] | np.ndarray, rows: int) -> npt.NDArray[np.float64]:
    w = _labels(values, rows, "sample_weight")
    if np.any(w < 0):
        msg = "sample_weight must be non-negative"
        raise InvalidLabels(msg)
    return w


def _check_continuation(model: GBDTModel, objective: str, n_features: int, names: list[str] | None) -> None:
    if objective != model.objective:
        msg = f"cannot continue a {model.objective} model with objective {objective}"
        raise MLInputError(msg, objective=objective)
    if n_features != model.num_features:
        msg = f"model was trained on {model.num_features} features, got {n_features}"
        raise FeatureMismatch(msg, expected=model.num_features, got=n_features)
    trained = model.booster.feature_names
    if names is not None and trained is not None and list(trained) != names:
        msg = f"feature columns differ from the model's: {list(trained)} vs {names}"
        raise FeatureMismatch(msg)


def load_model(data: bytes) -> GBDTModel:
    """Load a model from xgboost JSON (or UBJSON) bytes."""
    booster = xgb.Booster()
    try:
        booster.load_model(bytearray(data))
    except xgb.core.XGBoostError as exc:
        msg = f"not an xgboost model: {str(exc).splitlines()[0]}"
        raise ModelFormatError(msg) from exc
    return GBDTModel(booster)
