"""scikit-learn estimators that train in the enclave: ``SecureXGBRegressor`` and ``SecureXGBClassifier``.

Split from ``remote/ml.py`` (the GBDT/TVM clients and model handles they build on). Pipelines, grid search,
cross-validation, ``clone`` and pickling work as with xgboost's own estimators; a fitted estimator pickles its model
handle, the kernel's URL and the pinned policy (never a key) and reconnects on first use.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pandas as pd

from mesatee_notebook.errors import EncodingError, PolicyViolation
from mesatee_notebook.remote._public import public_methods
from mesatee_notebook.remote.frame import SecureDataFrame, SecureSeries
from mesatee_notebook.remote.ml import _LABEL, GbdtClient, RemoteModel, RemoteResult, _data_ref, _live, _SessionRef

__all__ = ["SecureXGBClassifier", "SecureXGBRegressor"]


try:
    from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
except ImportError:  # pragma: no cover - scikit-learn is an optional client dependency
    BaseEstimator = object
    ClassifierMixin = RegressorMixin = object

_AUTO_CLASSIFIER = "auto:classifier"  # resolved in the enclave from the label column (services/gbdt.py)


def _eval_sets(eval_set: Any) -> list[tuple[Any, Any]]:
    """Eval sets in xgboost's list form ``[(X, y), ...]``; a single ``(X, y)`` pair is accepted too."""
    if eval_set is None:
        return []
    if isinstance(eval_set, tuple) and len(eval_set) == 2 and not isinstance(eval_set[0], tuple):
        return [eval_set]
    pairs = list(eval_set)
    if not all(isinstance(p, (tuple, list)) and len(p) == 2 for p in pairs):
        msg = "eval_set must be a list of (X, y) pairs, as in xgboost: eval_set=[(X_valid, y_valid)]"
        raise ValueError(msg)
    return [(p[0], p[1]) for p in pairs]


class _SecureXGBBase(BaseEstimator):  # type: ignore[misc]
    """Shared parameters and plumbing of the scikit-learn style estimators.

    A fitted estimator pickles its model handle, the kernel's URL, the policy pinned to the measurement it
    attested and the path of the party's identity directory (never a key: ``_SessionRef``); an
    unpickled copy reconnects on its first call. So ``n_jobs=2`` in scikit-learn (joblib's process backend)
    works: each worker process opens its own attested session as the same party.
    """

    _objective: str = "reg:squarederror"

    def __init__(
        self,
        session: Any = None,
        *,
        n_estimators: int = 100,
        max_depth: int = 6,
        learning_rate: float = 0.3,
        subsample: float = 1.0,
        colsample_bytree: float = 1.0,
        min_child_weight: float = 1.0,
        reg_lambda: float = 1.0,
        reg_alpha: float = 0.0,
        max_bin: int = 256,
        random_state: int = 0,
        early_stopping_rounds: int | None = None,
        objective: str | None = None,
        progress: bool = False,
        gamma: float | None = None,
        scale_pos_weight: float | None = None,
        base_score: float | None = None,
        n_jobs: int | None = None,
        max_leaves: int | None = None,
        grow_policy: str | None = None,
        eval_metric: str | list[str] | None = None,
        tree_method: str | None = None,
        importance_type: str | None = None,
        missing: float = np.nan,
        enable_categorical: bool = False,
        max_cat_to_onehot: int | None = None,
        max_cat_threshold: int | None = None,
        feature_types: list[str] | None = None,
    ) -> None:
        self.session = session
        self.n_estimators = n_estimators
        self.max_depth = max_depth
        self.learning_rate = learning_rate
        self.subsample = subsample
        self.colsample_bytree = colsample_bytree
        self.min_child_weight = min_child_weight
        self.reg_lambda = reg_lambda
        self.reg_alpha = reg_alpha
        self.max_bin = max_bin
        self.random_state = random_state
        self.early_stopping_rounds = early_stopping_rounds
        self.objective = objective
        self.progress = progress
        self.gamma = gamma
        self.scale_pos_weight = scale_pos_weight
        self.base_score = base_score
        self.n_jobs = n_jobs
        self.max_leaves = max_leaves
        self.grow_policy = grow_policy
        self.eval_metric = eval_metric
        self.tree_method = tree_method
        self.importance_type = importance_type
        self.missing = missing
        self.enable_categorical = enable_categorical
        self.max_cat_to_onehot = max_cat_to_onehot
        self.max_cat_threshold = max_cat_threshold
        self.feature_types = feature_types

    def __sklearn_clone__(self) -> Any:
        """Clone the parameters but share the session (a live connection cannot be deep-copied)."""
        from sklearn.base import clone

        params = self.get_params(deep=False)
        session = params.pop("session")
        return type(self)(session, **{k: clone(v, safe=False) for k, v in params.items()})

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = True
        tags.input_tags.sparse = False
        tags.non_deterministic = False
        tags.input_tags.categorical = bool(self.enable_categorical)
        return tags

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())
        if state.get("session") is not None:
            state["session"] = ref = _SessionRef.of(state["session"])
            model = state.get("model_")
            if isinstance(model, RemoteModel):  # one reference for both: an unpickled copy connects once
                shared = copy.copy(model)
                shared._session = ref
                state["model_"] = shared
        return state

    def _session_or_fail(self) -> Any:
        if self.session is None:
            msg = "pass session=mn.connect(...) to the estimator: it trains in an enclave kernel"
            raise EncodingError(msg)
        return _live(self.session)

    def _params(self) -> dict[str, Any]:
        params: dict[str, Any] = {
            "max_depth": self.max_depth,
            "eta": self.learning_rate,
            "subsample": self.subsample,
            "colsample_bytree": self.colsample_bytree,
            "min_child_weight": self.min_child_weight,
            "lambda": self.reg_lambda,
            "alpha": self.reg_alpha,
            "max_bin": self.max_bin,
            "seed": self.random_state,
            "tree_method": self.tree_method or "hist",
        }
        optional = {
            "gamma": self.gamma,
            "scale_pos_weight": self.scale_pos_weight,
            "base_score": self.base_score,
            "nthread": self.n_jobs,
            "max_leaves": self.max_leaves,
            "grow_policy": self.grow_policy,
            "eval_metric": self.eval_metric,
            "max_cat_to_onehot": self.max_cat_to_onehot,
            "max_cat_threshold": self.max_cat_threshold,
            "feature_types": None if self.feature_types is None else list(self.feature_types),
            # taken by the engine for the QuantileDMatrix, as xgboost's estimators give it to their DMatrix
            "enable_categorical": True if self.enable_categorical else None,
        }
        return params | {k: v for k, v in optional.items() if v is not None}

    def _missing_to_nan(self, Xa: np.ndarray) -> np.ndarray:
        if self.missing is None or np.isnan(self.missing):
            return Xa
        return np.where(Xa == self.missing, np.nan, Xa)

    def _fit_remote(self, X: Any, y: Any, extra: dict[str, Any], sample_weight: Any, eval_set: Any) -> None:
        if isinstance(y, SecureSeries):
            y = y.name
        if not isinstance(y, str):
            msg = "with remote X, give y as the label column's name (or a column of the same dataset)"
            raise EncodingError(msg)
        if not (self.missing is None or np.isnan(self.missing)):
            msg = "missing= other than NaN is not available yet for remote data; store the column with NaN instead"
            raise EncodingError(msg)
        if sample_weight is not None and not isinstance(sample_weight, str):
            msg = "with remote X, give sample_weight as the name of a weight column of the same dataset"
            raise EncodingError(msg)
        ref = _data_ref(X, "data", {})
        for col in (y, sample_weight):
            if col is not None and "columns" in ref and col not in ref["columns"]:
                ref["columns"] = [*ref["columns"], col]
        evals = {f"validation_{i}": self._remote_eval(eX, ey, y) for i, (eX, ey) in enumerate(_eval_sets(eval_set))}
        client = GbdtClient(self._session_or_fail())
        self.model_ = client.train(
            ref,
            y,
            params={**self._params(), **extra},
            num_boost_round=self.n_estimators,
            evals=evals or None,
            sample_weight=sample_weight,
            early_stopping_rounds=self.early_stopping_rounds if evals else None,
            progress=self.progress,
        )
        features = [f for f in self.model_.features if f != y]
        self.n_features_in_ = len(features)
        self.feature_names_in_ = np.asarray(features, dtype=object)

    @staticmethod
    def _remote_eval(eX: Any, ey: Any, label: str) -> dict[str, Any]:
        if not isinstance(eX, (str, SecureDataFrame)) or (ey is not None and str(ey) != label):
            msg = f"with remote X, each eval_set entry is (dataset or SecureDataFrame, {label!r})"
            raise EncodingError(msg)
        ref = _data_ref(eX, "eval", {})
        if "columns" in ref and label not in ref["columns"]:
            ref["columns"] = [*ref["columns"], label]
        return ref

    def _objective_params(self) -> dict[str, Any]:
        return {"objective": self.objective or "reg:squarederror"}

    def _categorical_input(self, X: Any) -> bool:
        """A DataFrame with pandas ``category`` columns under ``enable_categorical=True``: sent as it is."""
        return (
            bool(self.enable_categorical)
            and isinstance(X, pd.DataFrame)
            and any(isinstance(t, pd.CategoricalDtype) for t in X.dtypes)
        )

    def _missing_frame(self, X: pd.DataFrame) -> pd.DataFrame:
        """``X`` with string column names, ``missing`` values of its numeric columns as NaN (categories kept)."""
        frame = X.set_axis([str(c) for c in X.columns], axis=1)
        if self.missing is None or np.isnan(self.missing):
            return frame
        numeric = [
            c for c, t in zip(frame.columns, frame.dtypes, strict=True) if not isinstance(t, pd.CategoricalDtype)
        ]
        return frame.assign(**{c: frame[c].mask(frame[c] == self.missing) for c in numeric})

    def _fit_categorical(self, X: pd.DataFrame, y: Any, sample_weight: Any, eval_set: Any) -> None:
        from sklearn.utils.validation import _check_sample_weight, check_consistent_length, validate_data

        validate_data(self, X, skip_check_array=True)  # n_features_in_, feature_names_in_ from the frame
        ya = np.asarray(y)
        check_consistent_length(X, ya)
        frame = self._missing_frame(X).assign(**{_LABEL: self._encode_y(ya)})
        weight = None if sample_weight is None else _check_sample_weight(sample_weight, frame, dtype=np.float64)
        evals: dict[str, Any] = {}
        for i, (eX, ey) in enumerate(_eval_sets(eval_set)):
            if not isinstance(eX, pd.DataFrame):
                msg = "with enable_categorical=True and a DataFrame in fit, each eval_set X must be a DataFrame too"
                raise ValueError(msg)
            evals[f"validation_{i}"] = self._missing_frame(eX).assign(
                **{_LABEL: self._encode_y(np.asarray(ey), fitting=False)}
            )
        self._train_local(frame, weight, evals)

    def _train_local(self, frame: pd.DataFrame, weight: Any, evals: dict[str, Any]) -> None:
        client = GbdtClient(self._session_or_fail())
        self.model_ = client.train(
            frame,
            _LABEL,
            params={**self._params(), **self._objective_params()},
            num_boost_round=self.n_estimators,
            evals=evals or None,
            sample_weight=weight,
            early_stopping_rounds=self.early_stopping_rounds if evals else None,
            progress=self.progress,
        )

    def _fit_local(self, X: Any, y: Any, sample_weight: Any, eval_set: Any) -> None:
        from sklearn.utils.validation import _check_sample_weight, validate_data

        self.categorical_input_ = self._categorical_input(X)
        if self.categorical_input_:
            self._fit_categorical(X, y, sample_weight, eval_set)
            return
        Xa, ya = validate_data(self, X, y, ensure_all_finite="allow-nan", dtype=np.float64, y_numeric=False)
        frame = pd.DataFrame(self._missing_to_nan(Xa), columns=[f"f{i}" for i in range(Xa.shape[1])])
        frame[_LABEL] = self._encode_y(ya)
        weight = None if sample_weight is None else _check_sample_weight(sample_weight, Xa, dtype=np.float64)
        evals: dict[str, Any] = {}
        for i, (eX, ey) in enumerate(_eval_sets(eval_set)):
            ef = pd.DataFrame(self._missing_to_nan(np.asarray(eX, dtype=np.float64)), columns=frame.columns[:-1])
            ef[_LABEL] = self._encode_y(np.asarray(ey), fitting=False)
            evals[f"validation_{i}"] = ef
        self._train_local(frame, weight, evals)

    def _encode_y(self, y: Any, *, fitting: bool = True) -> np.ndarray:
        return np.asarray(y, dtype=np.float64)

    def _local_X(self, X: Any) -> np.ndarray | pd.DataFrame:
        from sklearn.utils.validation import check_is_fitted, validate_data

        check_is_fitted(self, "model_")
        if getattr(self, "categorical_input_", False):
            if not isinstance(X, pd.DataFrame):
                msg = "this estimator was fitted on a DataFrame with category columns: predict on a DataFrame too"
                raise ValueError(msg)
            validate_data(self, X, reset=False, skip_check_array=True)
            return self._missing_frame(X)
        Xa: np.ndarray = validate_data(self, X, reset=False, ensure_all_finite="allow-nan", dtype=np.float64)
        return self._missing_to_nan(Xa)

    def _raw_predict(self, X: Any, margin: bool = False) -> np.ndarray | RemoteResult:
        from sklearn.utils.validation import check_is_fitted

        if isinstance(X, (SecureDataFrame, str)):
            check_is_fitted(self, "model_")
            return self.model_.predict(X, margin=margin)
        Xa = self._local_X(X)
        return self.model_.predict(Xa, margin=margin)

    @property
    def booster_handle(self) -> RemoteModel:
        """The fitted model's handle in the enclave."""
        from sklearn.utils.validation import check_is_fitted

        check_is_fitted(self, "model_")
        return self.model_

    @property
    def feature_importances_(self) -> np.ndarray:
        """Importance of each feature by ``importance_type`` (default ``gain``), normalised to sum 1 as in xgboost."""
        model = self.booster_handle
        scores = model.feature_importance(self.importance_type or "gain")
        names = [n for n in model.features if n != model.info.get("label")]
        values = np.asarray([float(scores.get(n, 0.0)) for n in names], dtype=np.float32)
        total = values.sum()
        return values / total if total > 0 else values

    @property
    def best_iteration(self) -> int:
        """The best round found by early stopping (0-based); like xgboost, only defined when it ran."""
        value = self.booster_handle.info.get("best_iteration")
        if value is None:
            msg = "`best_iteration` is only defined when early stopping is used."
            raise AttributeError(msg)
        return int(value)

    def evals_result(self) -> dict[str, dict[str, list[float]]]:
        """Per-round metrics of each eval set, ``{"validation_0": {"logloss": [...]}}`` as in xgboost."""
        history = self.booster_handle.history
        if not history:
            msg = "no evaluation results: fit with eval_set=[(X_valid, y_valid)]"
            raise ValueError(msg)
        return {str(k): {str(m): [float(v) for v in vals] for m, vals in d.items()} for k, d in history.items()}

    def get_booster(self) -> Any:
        """The trained model as a local ``xgboost.Booster``, only when its policy releases it.

        A model trained on another party's data stays in the enclave until every data owner released it
        (``gbdt.release``): until then this raises ``PolicyViolation``.
        """
        import xgboost as xgb

        model = self.booster_handle
        try:
            raw = model.export()
        except PolicyViolation as exc:
            msg = (
                f"get_booster: the model stays in the enclave, its data owner(s) have not released it ({exc}); "
                "use predict/predict_proba, which run there"
            )
            raise PolicyViolation(msg, model=model.id) from exc
        booster = xgb.Booster()
        booster.load_model(bytearray(raw))
        if not hasattr(self, "feature_names_in_"):  # fitted on an array: no names, as in xgboost
            booster.feature_names = None
        return booster


@public_methods
class SecureXGBRegressor(RegressorMixin, _SecureXGBBase):  # type: ignore[misc]
    """An xgboost regressor that trains in the enclave; scikit-learn conventions (pipelines, CV).

    ``X`` is local (DataFrame or array, sent with the call) or remote (a SecureDataFrame or dataset name,
    with ``y`` the label column's name). Predictions on remote data stay remote.
    """

    def fit(self, X: Any, y: Any, *, sample_weight: Any = None, eval_set: Any = None) -> SecureXGBRegressor:
        """Train ``n_estimators`` rounds in the enclave (``eval_set=[(X, y), ...]`` as in xgboost)."""
        if isinstance(X, (SecureDataFrame, str)):
            self._fit_remote(X, y, self._objective_params(), sample_weight, eval_set)
        else:
            self._fit_local(X, y, sample_weight, eval_set)
        return self

    def predict(self, X: Any) -> np.ndarray | RemoteResult:
        """Predicted values (numpy for local X; remote for a dataset)."""
        out = self._raw_predict(X)
        return out.astype(np.float64) if isinstance(out, np.ndarray) else out


@public_methods
class SecureXGBClassifier(ClassifierMixin, _SecureXGBBase):  # type: ignore[misc]
    """An xgboost classifier that trains in the enclave; scikit-learn conventions (pipelines, CV).

    Local labels may be any sortable values (encoded to 0..k-1 here); remote labels must already be
    0..k-1, and the enclave picks the objective from the label column it sees. Binary problems train
    ``binary:logistic``, more classes ``multi:softprob``.
    """

    def _encode_y(self, y: Any, *, fitting: bool = True) -> np.ndarray:
        if fitting:
            from sklearn.utils.multiclass import check_classification_targets

            check_classification_targets(y)
            self.classes_, codes = np.unique(y, return_inverse=True)
            if len(self.classes_) < 2:
                msg = f"the classifier needs at least 2 classes; got {len(self.classes_)} class"
                raise ValueError(msg)
            return np.asarray(codes, dtype=np.float64)
        y = np.asarray(y)
        unseen = np.setdiff1d(np.unique(y), self.classes_)
        if unseen.size:
            shown = ", ".join(map(repr, unseen[:5].tolist()))
            msg = (
                f"eval_set has label(s) {shown} not seen in fit (classes: {self.classes_.tolist()}); "
                "an eval set can only hold the training classes"
            )
            raise ValueError(msg)
        return np.asarray(np.searchsorted(self.classes_, y), dtype=np.float64)

    def _objective_params(self) -> dict[str, Any]:
        k = len(getattr(self, "classes_", ()))
        if self.objective is not None:
            return {"objective": self.objective} | ({"num_class": k} if self.objective.startswith("multi:") else {})
        if k <= 2:
            return {"objective": "binary:logistic"}
        return {"objective": "multi:softprob", "num_class": k}

    @property
    def n_classes_(self) -> int:
        """Number of classes seen in fit."""
        from sklearn.utils.validation import check_is_fitted

        check_is_fitted(self, "classes_")
        return len(self.classes_)

    def fit(self, X: Any, y: Any, *, sample_weight: Any = None, eval_set: Any = None) -> SecureXGBClassifier:
        """Train ``n_estimators`` rounds in the enclave (``eval_set=[(X, y), ...]`` as in xgboost)."""
        if isinstance(X, (SecureDataFrame, str)):
            self._fit_remote(X, y, {"objective": self.objective or _AUTO_CLASSIFIER}, sample_weight, eval_set)
            multi = str(self.model_.info.get("objective")).startswith("multi:")
            self.classes_ = np.arange(int(self.model_.info.get("num_class") or 0) if multi else 2)
            return self
        self._fit_local(X, y, sample_weight, eval_set)
        return self

    def predict_proba(self, X: Any) -> np.ndarray | RemoteResult:
        """Class probabilities ``(n, n_classes)`` (local X), or remote probabilities for a dataset."""
        out = self._raw_predict(X)
        if not isinstance(out, np.ndarray):
            return out
        out = out.astype(np.float64)
        if out.ndim == 1:
            return np.column_stack([1.0 - out, out])
        return out

    def predict(self, X: Any) -> np.ndarray:
        """Class labels (local X only: on remote data use ``predict_proba``, which stays remote)."""
        if isinstance(X, (SecureDataFrame, str)):
            msg = "class labels are predicted locally only; on remote data use predict_proba (it stays remote)"
            raise EncodingError(msg)
        proba = self.predict_proba(X)
        return np.asarray(self.classes_[np.argmax(proba, axis=1)])
