"""Categorical features for the xgboost engine (``enable_categorical=True``): checks and encoding by the model.

Training hands xgboost the DataFrame with its pandas ``category`` columns, exactly as a user of native
xgboost does (``QuantileDMatrix(df, enable_categorical=True)``): the model records each categorical
feature's categories in training order (``booster.get_categories()``), and its trees split on the codes
of that order.

Prediction encodes every categorical column *by the categories recorded at training*, here, into a float32
codes matrix (NaN stays missing) that both xgboost's predictor and the compiled trees read. A frame whose
categories come in another order, or hold extra unused categories, is re-coded to the training codes, as
xgboost's own re-coder does. A value that was not a training category is refused
(:class:`~mesatee_notebook.ml._errors.FeatureMismatch`, naming it). Native xgboost 3.2 refuses such a value
only when it sorts after every training category; one that sorts before or between them it silently maps to
a neighbouring code (a wrong answer), so this engine refuses them all rather than copy that.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt
import pandas as pd

from mesatee_notebook.ml._errors import FeatureMismatch, MLInputError, NonNumericFeatures

__all__ = [
    "Categories",
    "align_categories",
    "category_columns",
    "check_categorical_frame",
    "encode_frame",
    "model_categories",
]

Categories: TypeAlias = dict[str, pd.Index]
"""Feature name -> the categories the model recorded for it, in training (code) order."""
F32Array: TypeAlias = npt.NDArray[np.float32]


def category_columns(frame: pd.DataFrame) -> list[str]:
    """Names of the frame's pandas ``category`` columns."""
    return [str(c) for c, t in zip(frame.columns.tolist(), frame.dtypes.tolist(), strict=True) if _is_cat(t)]


def _is_cat(dtype: Any) -> bool:
    return isinstance(dtype, pd.CategoricalDtype)


def check_categorical_frame(frame: pd.DataFrame, numeric: Mapping[Any, bool]) -> None:
    """Every column is numeric or a pandas category (the DataFrame xgboost takes with ``enable_categorical``)."""
    bad = [
        f"{c!r} ({t})"
        for c, t in zip(frame.columns.tolist(), frame.dtypes.tolist(), strict=True)
        if not (_is_cat(t) or numeric[t])
    ]
    if bad:
        msg = (
            "with enable_categorical=True, feature columns must be numeric or pandas 'category' "
            f"(e.g. df[c].astype('category')): {', '.join(bad)}"
        )
        raise NonNumericFeatures(msg, columns=bad)


def model_categories(booster: Any) -> Categories:
    """The categories a model recorded at training, per categorical feature (empty for numeric models)."""
    types = booster.feature_types or []
    if "c" not in types:
        return {}
    try:
        recorded = booster.get_categories(export_to_arrow=True).to_arrow() or []
    except (AttributeError, ValueError, TypeError):  # trained on codes (arrays): nothing recorded
        return {}
    return {str(name): pd.Index(arr.to_pylist()) for name, arr in recorded if arr is not None}


def _unseen(values: pd.Index, frame_codes: npt.NDArray[Any], lookup: npt.NDArray[np.intp]) -> list[Any]:
    """The frame's categories that rows hold but training never saw."""
    used = np.unique(frame_codes[frame_codes >= 0])
    return [values[i] for i in used if lookup[i] < 0]


def _recode(name: str, col: pd.Series, cats: pd.Index) -> npt.NDArray[np.float32]:
    """Training codes of a category column (NaN for missing); refuses values training did not see."""
    own = col.cat.categories
    codes = col.cat.codes.to_numpy()
    if own.equals(cats):
        lookup = np.arange(len(cats), dtype=np.intp)
    else:
        lookup = np.asarray(cats.get_indexer(own), dtype=np.intp)
        unseen = _unseen(own, codes, lookup)
        if unseen:
            shown = ", ".join(repr(v) for v in unseen[:5]) + (" ..." if len(unseen) > 5 else "")
            msg = (
                f"column {name!r} holds categor{'y' if len(unseen) == 1 else 'ies'} {shown} not seen in training "
                f"(the model knows {len(cats)}); map them to a training category or to NaN (missing) first"
            )
            raise FeatureMismatch(msg, column=name, unseen=[str(v) for v in unseen[:20]])
    out = np.full(codes.shape, np.nan, dtype=np.float32)
    present = codes >= 0
    out[present] = lookup[codes[present]]
    return out


def encode_frame(frame: pd.DataFrame, types: Sequence[str], cats: Categories) -> F32Array:
    """A float32 matrix of ``frame`` (in the model's column order): categorical columns as training codes."""
    rows, width = frame.shape
    out = np.empty((rows, width), dtype=np.float32)
    for j, (name, kind) in enumerate(zip(frame.columns.tolist(), types, strict=True)):
        col = frame.iloc[:, j]
        if kind == "c" and str(name) in cats:
            if not _is_cat(col.dtype):
                msg = (
                    f"column {str(name)!r} was categorical at training; pass it as a pandas 'category' column "
                    f"(df[{str(name)!r}].astype('category')), not {col.dtype}"
                )
                raise FeatureMismatch(msg, column=str(name))
            out[:, j] = _recode(str(name), col, cats[str(name)])
        elif _is_cat(col.dtype):
            why = "recorded no categories for it (trained on codes): pass the codes" if kind == "c" else "reads numbers"
            msg = f"column {str(name)!r} is a pandas category but the model {why}"
            raise FeatureMismatch(msg, column=str(name))
        else:
            try:
                out[:, j] = col.to_numpy(dtype=np.float32, na_value=np.nan)
            except (TypeError, ValueError) as exc:
                msg = f"feature column {str(name)!r} must be numeric, got {col.dtype}"
                raise NonNumericFeatures(msg, columns=[str(name)]) from exc
    return out


def align_categories(frame: pd.DataFrame, cats: Mapping[str, pd.Index], what: str) -> pd.DataFrame:
    """``frame`` with each category column re-coded to ``cats``' order (eval sets, continued training).

    A no-op (the same frame) when the categories already match, the usual case; values outside ``cats`` are
    refused as at prediction.
    """
    changed: dict[str, pd.Series] = {}
    for name in category_columns(frame):
        want = cats.get(name)
        if want is None:
            msg = f"{what}: column {name!r} is categorical here but not in the training data"
            raise FeatureMismatch(msg, column=name)
        col = frame[name]
        if col.cat.categories.equals(want):
            continue
        codes = _recode(name, col, want)  # refuses unseen values
        ints = np.where(np.isnan(codes), -1, codes).astype(np.int64)
        changed[name] = pd.Series(pd.Categorical.from_codes(ints, categories=want), index=frame.index, name=name)
    missing = [n for n in cats if n in frame.columns and n not in category_columns(frame)]
    if missing:
        msg = f"{what}: column(s) {', '.join(map(repr, missing))} must be pandas 'category' as in training"
        raise MLInputError(msg, columns=missing)
    return frame.assign(**changed) if changed else frame
