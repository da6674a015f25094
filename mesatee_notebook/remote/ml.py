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

Why this module is over ~500 lines: the GBDT and TVM clients and their model handles, with their progress bars; the
estimators are in ``remote/estimators.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
import pandas as pd

from mesatee_notebook.errors import EncodingError
from mesatee_notebook.remote._bars import close_bar, open_bar
from mesatee_notebook.remote._public import public_methods
from mesatee_notebook.remote.frame import Column, SecureDataFrame, SecureSeries, Select, Source

if TYPE_CHECKING:
    from mesatee_notebook.remote.session import CallResult, Session

__all__ = [
    "GbdtClient",
    "RemoteModel",
    "RemoteTVMModule",
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
        enable_categorical: bool = False,
        feature_types: Sequence[str] | None = None,
    ) -> RemoteModel:
        """Train a model; per-round metrics stream into a progress bar. Returns a handle; the model stays remote.

        ``data`` holds the features and the ``label`` column. ``evals`` maps names to eval sets (same
        columns). ``init_model`` continues training a model you trained. ``progress`` may be a callable
        receiving each round's event instead of the bar. ``sample_weight`` is a weight column of ``data``
        (by name; not used as a feature) or one weight per row. ``enable_categorical=True`` (or the same key
        in ``params``) trains on pandas ``category`` columns with xgboost's categorical splits; ``feature_types``
        as in ``xgboost.DMatrix``.
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
        if enable_categorical:
            args["enable_categorical"] = True
        if feature_types is not None:
            args["feature_types"] = [str(t) for t in feature_types]
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
        """The engine that runs the module: ``tvm``, ``onnxruntime`` or ``treelite``."""
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
        ``engine``: ``"auto"`` (TVM; tree ensembles on ``"treelite"``, compiled trees; onnxruntime for other
        graphs TVM's frontend cannot import: ``ai.onnx.ml`` operators, LSTM, GRU), or pin ``"tvm"``,
        ``"onnxruntime"`` or ``"treelite"``; ``module.engine`` says which ran.
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


def __getattr__(name: str) -> Any:
    """The estimators live in ``remote/estimators.py``; they are still importable from here."""
    if name in ("SecureXGBClassifier", "SecureXGBRegressor"):
        from mesatee_notebook.remote import estimators

        return getattr(estimators, name)
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)
