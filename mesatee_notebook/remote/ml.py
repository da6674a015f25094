"""Client side of the GBDT and TVM services: model handles, progress bars, scikit-learn estimators.

Nothing here runs an engine: every method is one ``Session.call`` to a trusted service in the kernel,
whose receipt is verified before anything comes back (the last one is ``session.last_receipt``; each
handle keeps the receipt of its own last call as ``last_receipt``).

Data can be given as

* a local ``pandas.DataFrame`` or ``numpy`` array: sent with the call, owned by the caller;
* a dataset name, or a ``SecureDataFrame`` over a stored dataset (optionally a column selection of it,
  ``sdf[["a", "b"]]``): the data stays in the enclave. Derived frames (filters, assigns) must be stored
  first; the services work on whole datasets.

Errors are the kernel's typed errors (``PolicyViolation`` for refusals, ``NotFound`` for unknown handles,
and the engines' ``ml.*`` errors: missing label, non-numeric features, NaN labels, malformed ONNX,
unsupported operator, shape mismatch), each with a message that says what to change.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
import pandas as pd

from mesatee_notebook.errors import EncodingError, PolicyViolation
from mesatee_notebook.remote._bars import close_bar, open_bar
from mesatee_notebook.remote._public import public_methods
from mesatee_notebook.remote.frame import Column, SecureDataFrame, SecureSeries, Select, Source

if TYPE_CHECKING:
    from mesatee_notebook.remote.session import CallResult, Session

__all__ = [
    "GbdtClient",
    "RemoteModel",
    "RemoteTVMModule",
    "SecureXGBClassifier",
    "SecureXGBRegressor",
    "TvmClient",
]

_LABEL = "__mesatee_label__"

#: A result kept in the enclave (another party's data): one column, or several.
RemoteResult: TypeAlias = "SecureSeries | SecureDataFrame"


class _SessionRef:
    """What a pickled model handle or estimator keeps of its session; it reconnects on first use.

    The kernel's URL, the client policy pinned to the measurement the session attested, the session name
    and the *path* of the party's identity directory: never a key (a session whose key is only in memory
    cannot be pickled). The new session attests the kernel again under the pinned policy.
    """

    __slots__ = ("_session", "identity", "name", "policy", "url")

    def __init__(self, url: str, policy: Any, identity: str | None, name: str) -> None:
        self.url, self.policy, self.identity, self.name = url, policy, identity, name
        self._session: Any = None

    @classmethod
    def of(cls, session: Any) -> _SessionRef:
        """The reference for a live session (or the reference itself)."""
        if isinstance(session, _SessionRef):
            return session
        from dataclasses import replace

        ident = getattr(session, "_identity", None)
        path = getattr(ident, "path", None)
        if ident is not None and path is None:
            msg = (
                "this session's party key is held only in memory, and keys are never pickled: connect with an "
                "identity directory (mn.connect(url, identity=PATH)) to pickle a fitted estimator or model"
            )
            raise EncodingError(msg)
        pinned = replace(session.policy, measurements=(session.attestation.measurement,))
        directory = None if path is None else str(Path(path).parent)  # the key file's directory
        return cls(str(session.url), pinned, directory, str(session.name))

    def connect(self) -> Any:
        """The live session, connected (and attested) on first use."""
        if self._session is None:
            from mesatee_notebook.remote.session import connect

            self._session = connect(
                self.url,
                policy=self.policy,
                session=self.name,
                identity=False if self.identity is None else self.identity,
            )
        return self._session

    def __getstate__(self) -> tuple[str, Any, str | None, str]:
        return (self.url, self.policy, self.identity, self.name)

    def __setstate__(self, state: tuple[str, Any, str | None, str]) -> None:
        self.url, self.policy, self.identity, self.name = state
        self._session = None

    def __repr__(self) -> str:
        state = "connected" if self._session is not None else "not connected yet"
        return f"<mesatee session reference {self.url} ({state})>"


def _live(session: Session | _SessionRef) -> Session:
    """A live session (an unpickled :class:`_SessionRef` connects here)."""
    return session.connect() if isinstance(session, _SessionRef) else session


def _call(
    session: Session | _SessionRef,
    service: str,
    args: Mapping[str, Any] | None = None,
    inputs: Mapping[str, Any] | None = None,
    **kw: Any,
) -> CallResult:
    """``session.call``; engine errors arrive typed (``ml.*`` codes are in the one error tree)."""
    return _live(session).call(service, args, inputs, **kw)


def _remote_ref(data: SecureDataFrame | SecureSeries) -> dict[str, Any]:
    """The wire reference for a stored dataset, or a column selection of it."""
    node = data._node
    if isinstance(node, Source):
        return {"dataset": node.name}
    if isinstance(node, Select) and isinstance(node.input, Source):
        return {"dataset": node.input.name, "columns": list(node.columns)}
    if isinstance(node, Column) and isinstance(node.input, Source):
        return {"dataset": node.input.name, "columns": [node.name]}
    msg = (
        "the ML services work on a stored dataset or a column selection of it; this remote frame is derived "
        "(filter, assign, merge, ...). Store it first, or pass the dataset name"
    )
    raise EncodingError(msg, op=node.op)


def _data_ref(data: Any, slot: str, inputs: dict[str, Any]) -> dict[str, Any]:
    """The wire reference for ``data``; local tables go into ``inputs[slot]``."""
    if isinstance(data, str):
        return {"dataset": data}
    if isinstance(data, dict) and "dataset" in data:  # an already-built reference
        return dict(data)
    if isinstance(data, (SecureDataFrame, SecureSeries)):
        return _remote_ref(data)
    if isinstance(data, (pd.DataFrame, np.ndarray, pd.Series)):
        inputs[slot] = data.to_frame() if isinstance(data, pd.Series) else data
        return {"input": slot}
    kind = type(data).__name__
    msg = f"data must be a pandas DataFrame, a numpy array, a dataset name or a SecureDataFrame, not {kind}"
    raise EncodingError(msg, type=type(data).__name__)


class _RoundBar:
    """Per-round training progress in a ``tqdm.auto`` bar (a widget in notebooks, text in terminals)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total = total
        self.enabled = enabled
        self.bar: Any = None
        self.last: dict[str, Any] = {}

    def __call__(self, event: dict[str, Any]) -> None:
        self.last = event
        if not self.enabled or event.get("event") != "round":
            return
        if self.bar is None:
            self.bar = open_bar(total=self.total, desc="mesatee gbdt", unit="round", leave=True, disable=False)
        metrics = event.get("metrics") or {}
        shown = {f"{d}-{m}": f"{v:.4g}" for d, per in metrics.items() for m, v in per.items()}
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(int(event.get("round", 0)) + 1 - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            close_bar(self.bar)


class _PhaseBar:
    """TVM compile phases and tuning trials in a ``tqdm.auto`` bar."""

    def __init__(self, budget: int, enabled: bool) -> None:
        self.enabled = enabled
        self.budget = budget
        self.bar: Any = None

    def __call__(self, event: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            self.bar = open_bar(total=self.budget or None, desc="mesatee tvm", unit="trial", leave=True, disable=False)
        if event.get("event") == "trial":
            self.bar.update(int(event.get("trials", 0)) - self.bar.n)
            best = event.get("best_us")
            if best is not None:
                self.bar.set_postfix({"task": event.get("task"), "best_us": f"{best:.1f}"}, refresh=False)
        elif event.get("event") == "phase":
            self.bar.set_description(f"mesatee tvm: {event.get('phase')}", refresh=True)

    def close(self) -> None:
        if self.bar is not None:
            close_bar(self.bar)


def _remote_result(session: Session | _SessionRef, info: Mapping[str, Any]) -> RemoteResult:
    """A SecureSeries (one column) or SecureDataFrame over a result kept in the enclave."""
    desc = info["dataset"]
    sdf = _live(session).dataframe(str(desc["name"]))
    cols = [str(c) for c, _ in desc["columns"]]
    return sdf[cols[0]] if len(cols) == 1 else sdf


@public_methods
class RemoteModel:
    """A handle on a GBDT model that stays in the enclave.

    ``info`` is the model's public description (objective, features, rounds, provenance, release).
    """

    def __init__(
        self, session: Session | _SessionRef, info: Mapping[str, Any], history: Mapping[str, Any] | None = None
    ) -> None:
        self._session = session
        self.info = dict(info)
        self.history: dict[str, Any] = dict(history or {})
        self.last_receipt: Any = None

    @property
    def id(self) -> str:
        """The model handle (random, 128 bits)."""
        return str(self.info["id"])

    @property
    def features(self) -> list[str]:
        """Feature names the model expects."""
        return list(self.info.get("features") or [])

    @property
    def released(self) -> bool:
        """Whether the model may leave the enclave (``export``)."""
        return bool(self.info.get("released"))

    def __repr__(self) -> str:
        i = self.info
        return (
            f"<RemoteModel {self.id[:12]}… {i.get('objective')} features={len(self.features)} "
            f"rounds={i.get('num_rounds')} released={self.released}>"
        )

    def _call(
        self, service: str, args: dict[str, Any], inputs: dict[str, Any] | None = None, timeout: float | None = None
    ) -> CallResult:
        res = _call(self._session, service, {"model": self.id, **args}, inputs or {}, timeout=timeout)
        self.last_receipt = res.receipt
        return res

    def evaluate(self, data: Any, label: str | Sequence[float] | np.ndarray | None = None) -> dict[str, float]:
        """Metrics for the objective (logloss/auc/accuracy, mlogloss/accuracy, or rmse/mae/r2)."""
        inputs: dict[str, Any] = {}
        args: dict[str, Any] = {"data": _data_ref(data, "data", inputs)}
        if isinstance(label, str):
            args["label"] = label
        elif label is not None:
            inputs["label"] = np.asarray(label, dtype=np.float64)
        res = self._call("gbdt.evaluate", args, inputs)
        return {str(k): float(v) for k, v in res.info["metrics"].items()}

    def predict(
        self,
        data: Any,
        *,
        margin: bool = False,
        engine: str = "auto",
        remote: bool | None = None,
        name: str | None = None,
    ) -> np.ndarray | RemoteResult:
        """Predict: a numpy array for your own data, a remote result for another party's dataset.

        On another party's dataset the predictions stay in the enclave, as a SecureSeries (one column) or
        SecureDataFrame under the owner's policy (``remote=True`` keeps yours there too; ``name`` names it).

        ``engine``: ``"auto"`` (compiled trees below the crossover batch size, xgboost above),
        ``"compiled"`` or ``"xgboost"``.
        """
        inputs: dict[str, Any] = {}
        args: dict[str, Any] = {"data": _data_ref(data, "data", inputs), "margin": margin, "engine": engine}
        if remote is not None:
            args["remote"] = remote
        if name is not None:
            args["name"] = name
        res = self._call("gbdt.predict", args, inputs)
        self.last_engine = str(res.info.get("engine"))
        if "dataset" in res.info:
            return _remote_result(self._session, res.info)
        return np.asarray(res.values["prediction"])

    def compile(self) -> dict[str, Any]:
        """Compile the trees for low-latency prediction now (else it happens on the first small batch)."""
        return dict(self._call("gbdt.compile", {}).info)

    def feature_importance(self, kind: str = "gain") -> pd.Series:
        """Importance of every feature (``gain``, ``weight``, ``cover``, ``total_gain``, ``total_cover``)."""
        res = self._call("gbdt.importance", {"kind": kind})
        scores = pd.Series({str(k): float(v) for k, v in res.info["importance"].items()}, name=kind, dtype=float)
        return scores.sort_values(ascending=False)

    def refresh(self) -> RemoteModel:
        """Re-read the model's description (e.g. after a data owner released it)."""
        self.info = dict(self._call("gbdt.info", {}).info["model"])
        return self

    def export(self, path: str | PathLike[str] | None = None) -> bytes:
        """The model as xgboost JSON (written to ``path`` if given), only if its policy releases it."""
        res = self._call("gbdt.export", {})
        raw = bytes(res.values["model"])
        if path is not None:
            Path(path).write_bytes(raw)
        return raw

    def delete(self) -> None:
        """Delete the model from the enclave."""
        self._call("gbdt.delete", {})

    def __getstate__(self) -> dict[str, Any]:
        """Pickle the handle and a reference to the session (reconnects lazily; no keys, no receipt)."""
        return {"session": _SessionRef.of(self._session), "info": self.info, "history": self.history}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._session = state["session"]
        self.info = dict(state["info"])
        self.history = dict(state["history"])
        self.last_receipt = None


@public_methods
class GbdtClient:
    """``session.gbdt``: xgboost (hist) training and prediction in the enclave."""

    def __init__(self, session: Session) -> None:
        self._session = session

    def train(
        self,
        data: Any,
        label: str,
        *,
        params: Mapping[str, Any] | None = None,
        num_boost_round: int = 100,
        evals: Mapping[str, Any] | None = None,
        early_stopping_rounds: int | None = None,
        init_model: RemoteModel | str | None = None,
        progress: bool | Callable[[dict[str, Any]], None] = True,
        timeout: float | None = None,
        sample_weight: str | Sequence[float] | np.ndarray | None = None,
    ) -> RemoteModel:
        """Train a model; per-round metrics stream into a progress bar. Returns a handle; the model stays remote.

        ``data`` holds the features and the ``label`` column. ``evals`` maps names to eval sets (same
        columns). ``init_model`` continues training a model you trained. ``progress`` may be a callable
        receiving each round's event instead of the bar. ``sample_weight`` is a weight column of ``data``
        (by name; not used as a feature) or one weight per row.
        """
        inputs: dict[str, Any] = {}
        args: dict[str, Any] = {
            "data": _data_ref(data, "data", inputs),
            "label": label,
            "params": dict(params or {}),
            "num_boost_round": int(num_boost_round),
            "progress": bool(progress),
        }
        if evals:
            args["evals"] = {str(k): _data_ref(v, f"eval{i}", inputs) for i, (k, v) in enumerate(evals.items())}
        if early_stopping_rounds is not None:
            args["early_stopping_rounds"] = int(early_stopping_rounds)
        if init_model is not None:
            args["init_model"] = init_model.id if isinstance(init_model, RemoteModel) else str(init_model)
        if isinstance(sample_weight, str):
            args["weight"] = {"column": sample_weight}
        elif sample_weight is not None:
            inputs["weight"] = np.asarray(sample_weight, dtype=np.float64)
            args["weight"] = {"input": "weight"}
        bar = _RoundBar(num_boost_round, progress is True)
        callback: Callable[[dict[str, Any]], None] = progress if callable(progress) else bar
        try:
            res = _call(self._session, "gbdt.train", args, inputs, progress=callback, timeout=timeout)
        finally:
            bar.close()
        model = RemoteModel(self._session, res.info["model"], res.info.get("history"))
        model.last_receipt = res.receipt
        return model

    def model(self, model_id: str) -> RemoteModel:
        """Re-attach to a model handle by id (e.g. in a new session)."""
        res = _call(self._session, "gbdt.info", {"model": model_id})
        return RemoteModel(self._session, res.info["model"])

    def models(self) -> list[dict[str, Any]]:
        """Models you trained, and models trained on your data."""
        return list(_call(self._session, "gbdt.list").info["models"])

    def release(self, model: RemoteModel | str) -> dict[str, Any]:
        """As a data owner, let the trainer export a model trained on your data."""
        mid = model.id if isinstance(model, RemoteModel) else str(model)
        return dict(_call(self._session, "gbdt.release", {"model": mid}).info["model"])


@public_methods
class RemoteTVMModule:
    """A TVM-compiled model in the enclave; ``info`` has its inputs, outputs, tuning and library digest."""

    def __init__(self, session: Session, info: Mapping[str, Any]) -> None:
        self._session = session
        self.info = dict(info)
        self.last_receipt: Any = None

    @property
    def id(self) -> str:
        """Digest of (model, shapes, target, TVM version, tuning budget)."""
        return str(self.info["id"])

    @property
    def engine(self) -> str:
        """The engine that runs the module: ``tvm`` or ``onnxruntime``."""
        return str(self.info.get("engine", "tvm"))

    @property
    def inputs(self) -> dict[str, tuple[int, ...]]:
        """Input name → compiled (static) shape."""
        return {str(s["name"]): tuple(int(d) for d in s["shape"]) for s in self.info["inputs"]}

    @property
    def outputs(self) -> dict[str, tuple[int, ...]]:
        """Output name → shape."""
        return {str(s["name"]): tuple(int(d) for d in s["shape"]) for s in self.info["outputs"]}

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}{list(v)}" for k, v in self.inputs.items())
        return f"<RemoteTVMModule {self.id[:12]}… {shapes} tune_trials={self.info.get('tune_trials')}>"

    def run(
        self,
        data: Mapping[str, Any] | np.ndarray | Any,
        *,
        input: str | None = None,
        remote: bool | None = None,
        name: str | None = None,
        timeout: float | None = None,
    ) -> dict[str, np.ndarray] | RemoteResult:
        """Run the model.

        ``data``: arrays (a mapping of input name to array, or one array for a one-input model) give
        numpy outputs ``{name: array}``; a dataset name or SecureDataFrame feeds its columns in batches
        of the compiled batch size, and the result stays in the enclave when the data is another party's.
        """
        args: dict[str, Any] = {"module": self.id}
        inputs: dict[str, Any] = {}
        if isinstance(data, (str, SecureDataFrame, pd.DataFrame)):
            args["data"] = _data_ref(data, "data", inputs)
            if input is not None:
                args["input"] = input
            if remote is not None:
                args["remote"] = remote
            if name is not None:
                args["name"] = name
        else:
            feeds = data if isinstance(data, Mapping) else {next(iter(self.inputs)): data}
            names: dict[str, str] = {}
            for i, (k, v) in enumerate(feeds.items()):
                names[f"in{i}"] = str(k)
                inputs[f"in{i}"] = np.ascontiguousarray(v)
            args["inputs"] = names
        res = _call(self._session, "tvm.run", args, inputs, timeout=timeout)
        self.last_receipt = res.receipt
        if "dataset" in res.info:
            return _remote_result(self._session, res.info)
        return {k: np.asarray(v) for k, v in res.values.items()}


@public_methods
class TvmClient:
    """``session.tvm``: compile ONNX models with apache-tvm in the enclave and run them there."""

    def __init__(self, session: Session) -> None:
        self._session = session

    def compile(
        self,
        model: str | PathLike[str] | bytes | Any,
        *,
        input_shapes: Mapping[str, Sequence[int]],
        tune_trials: int = 0,
        max_trials_per_task: int | None = None,
        target: str = "llvm",
        timeout: float | None = None,
        progress: bool = True,
        engine: str = "auto",
    ) -> RemoteTVMModule:
        """Compile an ONNX model (path, bytes or ``onnx.ModelProto``) for static ``input_shapes``.

        Cached by digest in the enclave's sealed storage: compiling the same request again loads it.
        ``tune_trials`` > 0 runs MetaSchedule with that trial budget (slow: minutes), with a progress bar.
        ``engine``: ``"auto"`` (TVM, or onnxruntime for graphs TVM's frontend cannot import: ``ai.onnx.ml``
        operators, LSTM, GRU), or pin ``"tvm"`` or ``"onnxruntime"``; ``module.engine`` says which ran.
        """
        if isinstance(model, (bytes, bytearray, memoryview)):
            raw = bytes(model)
        elif isinstance(model, (str, PathLike)):
            raw = Path(model).read_bytes()
        elif hasattr(model, "SerializeToString"):
            raw = bytes(model.SerializeToString())
        else:
            msg = f"model must be ONNX bytes, a path or an onnx.ModelProto, not {type(model).__name__}"
            raise EncodingError(msg)
        args: dict[str, Any] = {
            "input_shapes": {str(k): [int(d) for d in v] for k, v in input_shapes.items()},
            "tune_trials": int(tune_trials),
            "target": target,
            "engine": str(engine),
        }
        if max_trials_per_task is not None:
            args["max_trials_per_task"] = int(max_trials_per_task)
        if timeout is not None:
            args["timeout_s"] = float(timeout)
        bar = _PhaseBar(tune_trials, progress and tune_trials > 0)
        try:
            res = _call(
                self._session,
                "tvm.compile",
                args,
                {"model": raw},
                progress=bar,
                timeout=None if timeout is None else timeout + 30,
            )
        finally:
            bar.close()
        module = RemoteTVMModule(self._session, res.info)
        module.last_receipt = res.receipt
        return module


# ---------------------------------------------------------------------------------------------
# scikit-learn estimators

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
        if self.enable_categorical:
            msg = (
                "enable_categorical=True is not available yet: the enclave engine trains on numeric features; "
                "encode categories as codes (e.g. df[c].cat.codes) first"
            )
            raise EncodingError(msg)
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

    def _fit_local(self, X: Any, y: Any, sample_weight: Any, eval_set: Any) -> None:
        from sklearn.utils.validation import _check_sample_weight, validate_data

        Xa, ya = validate_data(self, X, y, ensure_all_finite="allow-nan", dtype=np.float64, y_numeric=False)
        frame = pd.DataFrame(self._missing_to_nan(Xa), columns=[f"f{i}" for i in range(Xa.shape[1])])
        frame[_LABEL] = self._encode_y(ya)
        weight = None if sample_weight is None else _check_sample_weight(sample_weight, Xa, dtype=np.float64)
        extra = self._objective_params()
        evals: dict[str, Any] = {}
        for i, (eX, ey) in enumerate(_eval_sets(eval_set)):
            ef = pd.DataFrame(self._missing_to_nan(np.asarray(eX, dtype=np.float64)), columns=frame.columns[:-1])
            ef[_LABEL] = self._encode_y(np.asarray(ey), fitting=False)
            evals[f"validation_{i}"] = ef
        client = GbdtClient(self._session_or_fail())
        self.model_ = client.train(
            frame,
            _LABEL,
            params={**self._params(), **extra},
            num_boost_round=self.n_estimators,
            evals=evals or None,
            sample_weight=weight,
            early_stopping_rounds=self.early_stopping_rounds if evals else None,
            progress=self.progress,
        )

    def _encode_y(self, y: Any, *, fitting: bool = True) -> np.ndarray:
        return np.asarray(y, dtype=np.float64)

    def _local_X(self, X: Any) -> np.ndarray:
        from sklearn.utils.validation import check_is_fitted, validate_data

        check_is_fitted(self, "model_")
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
