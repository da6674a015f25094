"""GBDT services: xgboost training and prediction in the service worker, models kept as sealed handles.

Data a call names is either a stored dataset (``{"dataset": NAME, "columns": [...]}``) or an inline
table sent with the call (``{"input": NAME}``, owned by the caller). Who may do what:

* **train** (and continue training, and eval sets): the caller owns the data or is in its policy's
  ``code_access`` (the same right that reaches the raw frame in a cell). Without that right, another
  party's data is trained on through a ``gbdt.train`` job its owner approves (``services/gbdt_jobs.py``).
* **evaluate** on data the caller may not train on: allowed when the metrics are an aggregate of at
  least the owner's ``min_group_size`` rows and the model reads no hidden column.
* **predict** on another party's dataset: the predictions stay in the enclave as a new dataset owned
  by the data owner under the owner's policy (the caller gets a SecureDataFrame over it); a caller
  with code access may ask for them locally. The model may not read a hidden column.
* **importance**: always (no rows leave).
* **export**: only when the model is *released*: every party whose data trained it (other than the
  trainer) released it with ``gbdt.release``. A model trained only on the caller's data is released.

A model handle is ``svc/models/<id>/{meta,model}`` in sealed storage (xgboost UBJSON), so it survives a
worker restart. Compiled trees for fast small-batch prediction are cached sealed under
``svc/cache/trees/<model digest>`` and materialised into a private 0700 directory of the worker to be
loaded. On ``softtee`` that directory is on the host's tmpfs in plaintext while loaded: the host is
trusted not to read it, as it is trusted not to read the worker's memory.

Why this module is over ~500 lines: the ``gbdt.*`` service handlers (train, continue, evaluate, predict, importance,
export, release) over one engine; each handler is short.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import io
import json
import os
import secrets
import shutil
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from mesatee_notebook.enclave.datasets import data_name, meta_name, validate_dataset_name
from mesatee_notebook.enclave.services import ServiceContext, ServiceResult, service
from mesatee_notebook.enclave.services.datasets import load_dataset, load_meta, public_info
from mesatee_notebook.errors import EncodingError, NotFound, PolicyViolation
from mesatee_notebook.wire.codecs import encode_value

if TYPE_CHECKING:
    from mesatee_notebook.ml.gbdt import GBDTModel
    from mesatee_notebook.ml.treecompile import TreePredictor
    from mesatee_notebook.wire.datapolicy import DataPolicy

__all__ = [
    "DataRef",
    "model_meta",
    "private_dir",
    "resolve_data",
    "restore_blob",
    "seal_dir",
    "store_derived",
]

_MODEL_ID_LEN = 32


# ---------------------------------------------------------------------------------------------
# Shared with the TVM service


# Data references, derived datasets, the sealed engine cache.


@dataclass
class DataRef:
    """A table a call works on, with whose it is and what policy guards it."""

    frame: Any  # a pandas DataFrame (datasets, inline tables) or a numpy array (inline)
    owner: str
    policy: DataPolicy | None
    dataset: str | None
    sha256: str | None

    def describe(self) -> dict[str, Any]:
        """Provenance record for a model's metadata."""
        return {"dataset": self.dataset, "owner": self.owner, "sha256": self.sha256}

    def code_access(self, party: str) -> bool:
        """Whether ``party`` may reach the raw rows (owner, or in ``code_access``)."""
        return party == self.owner or (self.policy is not None and self.policy.allows_code_access(party, self.owner))

    def hidden(self) -> set[str]:
        """Hidden columns of the dataset (none for inline data)."""
        return set(self.policy.hidden_columns) if self.policy is not None else set()


def resolve_data(ctx: ServiceContext, ref: Any, inputs: dict[str, Any], what: str) -> DataRef:
    """Turn ``{"dataset": NAME, "columns": [...]}`` or ``{"input": NAME}`` into a :class:`DataRef`."""
    if not isinstance(ref, dict):
        msg = f"{what}: give a dataset name or a table"
        raise EncodingError(msg)
    columns = ref.get("columns")
    if "input" in ref:
        value = inputs.get(str(ref["input"]))
        if isinstance(value, pd.Series):
            value = value.to_frame()
        if not isinstance(value, (pd.DataFrame, np.ndarray)):
            msg = f"{what}: the inline data must be a pandas DataFrame or a numpy array"
            raise EncodingError(msg, got=type(value).__name__)
        if isinstance(value, np.ndarray) and columns is not None:
            msg = f"{what}: columns can only be selected from a table with named columns"
            raise EncodingError(msg)
        ref_out = DataRef(value, ctx.party, None, None, None)
    elif "dataset" in ref:
        name = str(ref["dataset"])
        meta = load_meta(ctx, name)  # read once per call, here: load_dataset checks the data against it
        frame, policy, owner = load_dataset(ctx, name, meta)
        sha = str(meta["sha256"])
        ref_out = DataRef(frame, owner, policy, name, sha)
    else:
        msg = f"{what}: a data reference names a 'dataset' or an 'input'"
        raise EncodingError(msg)
    if columns is not None:
        cols = [str(c) for c in columns]
        missing = [c for c in cols if c not in ref_out.frame.columns]
        if missing:
            where = f"dataset {ref_out.dataset!r}" if ref_out.dataset else "the data"
            msg = f"{what}: column(s) {', '.join(map(repr, missing))} not in {where}"
            raise NotFound(msg, columns=missing)
        ref_out.frame = ref_out.frame[cols]
    return ref_out


def refuse(ctx: ServiceContext, data: DataRef, message: str, **details: Any) -> PolicyViolation:
    """Audit a refusal (visible to the data owner) and return the error to raise."""
    ctx.audit("refusal", {"dataset": data.dataset, "reason": message, **details}, concerns=[data.owner])
    return PolicyViolation(message, dataset=data.dataset)


def store_derived(
    ctx: ServiceContext, source: DataRef, frame: pd.DataFrame, name: str | None, derived: dict[str, Any]
) -> dict[str, Any]:
    """Keep ``frame`` (computed from ``source``) in the enclave as a dataset owned by the data owner.

    It takes the owner's policy, so whatever leaves it later leaves under that policy. Returns the
    dataset's public description for the caller.
    """
    assert source.policy is not None and source.dataset is not None
    from mesatee_notebook.enclave.services.frames import budget_root

    name = validate_dataset_name(name or f"{derived.get('kind', 'result')}_{secrets.token_hex(6)}")
    try:
        load_meta(ctx, name)
    except NotFound:
        pass
    else:
        msg = f"dataset {name!r} already exists; choose another name"
        raise PolicyViolation(msg, dataset=name)
    frame = frame.reset_index(drop=True)
    enc = encode_value(frame)
    data = b"".join(bytes(memoryview(p).cast("B")) for p in enc.parts)
    digest = hashlib.sha256(data).hexdigest()
    ctx.seal_put(data_name(name, prefix=""), data)
    meta = {
        "name": name,
        "owner": source.owner,
        "policy": source.policy.to_dict(),
        "columns": [[str(c), str(t)] for c, t in frame.dtypes.items()],
        "rows": len(frame),
        "sha256": digest,
        "created": time.time(),
        # its DP budget and differencing history are its root's (services/frames.py budget_root)
        "derived": {**derived, "from": source.dataset, "root": budget_root(ctx, source.dataset), "by": ctx.party},
    }
    ctx.seal_put(meta_name(name, prefix=""), json.dumps(meta).encode())
    ctx.audit("result", {"derived_dataset": name, "from": source.dataset, **derived}, concerns=[source.owner])
    return public_info(meta, ctx.party)


def private_dir(ctx: ServiceContext) -> Path:
    """The worker's private (0700) directory for engine libraries; removed when the worker exits."""
    path = ctx.state.get("private_dir")
    if path is None:
        base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None  # noqa: S108 - tmpfs, never disk
        path = Path(tempfile.mkdtemp(prefix="mesatee-svc-", dir=base))
        path.chmod(0o700)
        atexit.register(shutil.rmtree, path, True)
        ctx.state["private_dir"] = path
    assert isinstance(path, Path)
    return path


def seal_dir(ctx: ServiceContext, name: str, directory: Path) -> None:
    """Seal one engine cache directory (e.g. ``trees-<key>/``) as a tar blob under ``svc/<name>``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(directory, arcname=directory.name)
    ctx.seal_put(name, buf.getvalue())


def restore_blob(ctx: ServiceContext, name: str, into: Path) -> bool:
    """Unpack the sealed tar blob ``svc/<name>`` into ``into``; False if there is none."""
    try:
        blob = ctx.seal_get(name)
    except NotFound:
        return False
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r") as tar:
        top = {m.name.split("/")[0] for m in tar.getmembers()}
        for entry in top:
            shutil.rmtree(into / entry, ignore_errors=True)
        tar.extractall(into, filter="data")
    return True


# ---------------------------------------------------------------------------------------------
# Model handles


def _model_id(value: Any) -> str:
    mid = str(value or "")
    if len(mid) != _MODEL_ID_LEN or any(c not in "0123456789abcdef" for c in mid):
        msg = f"{mid!r} is not a model handle"
        raise NotFound(msg)
    return mid


def _load_handle(ctx: ServiceContext, model_id: Any, *, reread: bool = True) -> tuple[dict[str, Any], GBDTModel]:
    """The handle's metadata and parsed model.

    ``reread=False`` (trainer-only calls that read no field another party may change: predict, evaluate,
    importance, compile) reuses this worker's copy when the caller's previous call ran in this worker too
    (``ctx.fresh`` false): only the trainer can delete a handle, so then nothing the call depends on can have
    changed elsewhere. That saves one sealed read, a supervisor round trip, per call.
    """
    from mesatee_notebook.ml.gbdt import load_model

    mid = _model_id(model_id)
    cache: dict[str, tuple[dict[str, Any], GBDTModel]] = ctx.state.setdefault("gbdt_models", {})
    cached = cache.get(mid)
    if not reread and not ctx.fresh and cached is not None and cached[0].get("trainer") == ctx.party:
        return cached
    try:
        # The metadata (who released it, whether it still exists) is read on every call: another service
        # worker may have changed it since this one cached the model. Only the parsed model is reused.
        meta = json.loads(ctx.seal_get(f"models/{mid}/meta"))
        hit = cache.get(mid)
        if hit is None or hit[0].get("digest") != meta.get("digest"):
            hit = (meta, load_model(ctx.seal_get(f"models/{mid}/model")))
    except NotFound:
        cache.pop(mid, None)
        msg = f"no model {mid[:12]}… in this kernel (deleted, or never trained here)"
        raise NotFound(msg, model=mid) from None
    hit = (meta, hit[1])
    cache[mid] = hit
    return hit


def _use(ctx: ServiceContext, model_id: Any, *, reread: bool = True) -> tuple[dict[str, Any], GBDTModel]:
    """A model the caller trained (only the trainer uses a handle); ``reread``: see :func:`_load_handle`."""
    meta, model = _load_handle(ctx, model_id, reread=reread)
    if meta["trainer"] != ctx.party:
        msg = "this model handle belongs to another party"
        raise PolicyViolation(msg, model=meta["id"])
    return meta, model


def _released(meta: dict[str, Any]) -> bool:
    return set(meta.get("data_owners", [])) <= set(meta.get("released_by", []))


def _public(meta: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "id",
        "trainer",
        "objective",
        "label",
        "features",
        "num_rounds",
        "best_iteration",
        "digest",
        "sources",
        "data_owners",
        "released_by",
        "created",
        "num_class",
        "feature_types",
    )
    return {k: meta.get(k) for k in keys} | {"released": _released(meta)}


def model_meta(
    model: Any,
    *,
    trainer: str,
    sources: list[dict[str, Any]],
    data_owners: list[str],
    continued_from: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The metadata of a new model handle (what ``gbdt.info`` shows and the release rules read), for every trainer."""
    return {
        "id": secrets.token_hex(_MODEL_ID_LEN // 2),
        "trainer": trainer,
        "objective": model.objective,
        "num_class": model.num_class,
        "label": model.label,
        "features": list(model.feature_names),
        "feature_types": list(getattr(model, "feature_types", None) or []) or None,
        "num_rounds": model.num_rounds,
        "best_iteration": model.best_iteration,
        "digest": model.digest,
        "sources": sources,
        "data_owners": data_owners,
        "released_by": [],
        "created": time.time(),
        "continued_from": continued_from,
        **extra,
    }


def _save_handle(ctx: ServiceContext, meta: dict[str, Any], model: GBDTModel) -> None:
    mid = str(meta["id"])
    ctx.seal_put(f"models/{mid}/model", bytes(model.booster.save_raw(raw_format="ubj")))
    ctx.seal_put(f"models/{mid}/meta", json.dumps(meta).encode())
    ctx.state.setdefault("gbdt_models", {})[mid] = (meta, model)


# ---------------------------------------------------------------------------------------------
# Services


def _train_data(ctx: ServiceContext, ref: Any, inputs: dict[str, Any], what: str) -> DataRef:
    data = resolve_data(ctx, ref, inputs, what)
    if not data.code_access(ctx.party):
        raise refuse(
            ctx,
            data,
            f"{what}: training on dataset {data.dataset!r} needs its owner's consent: the owner can add your party "
            "id to the dataset policy's code_access, or approve a 'gbdt.train' job (session.jobs.create(..., kind="
            "'gbdt.train'))",
        )
    return data


_AUTO_CLASSIFIER = "auto:classifier"


def _resolve_objective(frame: Any, label: str, params: dict[str, Any]) -> dict[str, Any]:
    """``objective="auto:classifier"``: binary or multiclass, decided here from the label column the enclave sees.

    Labels above 1 give ``multi:softprob`` (the engine then sets ``num_class`` and checks the labels are 0..k-1).
    """
    if params.get("objective") != _AUTO_CLASSIFIER:
        return params
    top = 0.0
    if isinstance(frame, pd.DataFrame) and label in frame.columns:
        top = float(pd.to_numeric(frame[label], errors="coerce").max(skipna=True) or 0.0)
    return {**params, "objective": "multi:softprob" if top > 1 else "binary:logistic"}


def _sample_weight(data: DataRef, ref: Any, inputs: dict[str, Any]) -> np.ndarray | None:
    """Sample weights: ``{"column": NAME}`` of the training data (taken out of the features) or ``{"input": NAME}``."""
    if ref is None:
        return None
    if isinstance(ref, dict) and "column" in ref and isinstance(data.frame, pd.DataFrame):
        col = str(ref["column"])
        if col not in data.frame.columns:
            msg = f"sample_weight column {col!r} is not in the training data"
            raise NotFound(msg, column=col)
        weights = data.frame[col].to_numpy(dtype=np.float64, na_value=np.nan, copy=True)  # not a view (P8)
        data.frame = data.frame.drop(columns=[col])
        return weights
    if isinstance(ref, dict) and "input" in ref and str(ref["input"]) in inputs:
        return np.asarray(inputs[str(ref["input"])], dtype=np.float64).reshape(-1)
    msg = "sample_weight: give a column name of the training data or one weight per row"
    raise EncodingError(msg)


def _feature_types(value: Any) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(t, str) for t in value):
        msg = "feature_types must be a list of xgboost feature types ('q', 'c', 'float', 'int', ...)"
        raise EncodingError(msg)
    return list(value)


@service("gbdt.train")
def train(ctx: ServiceContext, args: dict[str, Any], inputs: dict[str, Any]) -> ServiceResult:
    """Train (or continue) an xgboost model; per-round metrics stream as progress; returns a handle."""
    from mesatee_notebook.ml import gbdt

    data = _train_data(ctx, args.get("data"), inputs, "training data")
    label = args.get("label")
    if not isinstance(label, str) or not label:
        msg = "give the label column by name (label='y')"
        raise EncodingError(msg)
    weight = _sample_weight(data, args.get("weight"), inputs)
    params = _resolve_objective(data.frame, label, dict(args.get("params") or {}))
    sources = [data]
    evals: dict[str, pd.DataFrame] = {}
    for name, ref in dict(args.get("evals") or {}).items():
        ev = _train_data(ctx, ref, inputs, f"eval set {name!r}")
        sources.append(ev)
        evals[str(name)] = ev.frame
    init = None
    prior: list[dict[str, Any]] = []
    if args.get("init_model"):
        init_meta, init = _use(ctx, args["init_model"])
        prior = list(init_meta.get("sources", []))

    def progress(event: dict[str, Any]) -> None:
        ctx.progress(**event)

    def release() -> None:
        """The matrices exist: drop the inline tables so their received buffers are freed while boosting (P8).

        A stored dataset stays in the worker's cache (the next call by name would unseal and decode it again).
        """
        for ref in sources:
            ref.frame = None
        evals.clear()
        for ref in (args.get("data"), *dict(args.get("evals") or {}).values()):
            if isinstance(ref, dict) and "input" in ref:
                inputs.pop(str(ref["input"]), None)

    t0 = time.perf_counter()
    model = gbdt.train(
        data.frame,
        label,
        params=params,
        num_boost_round=int(args.get("num_boost_round", 100)),
        evals=evals or None,
        early_stopping_rounds=None if args.get("early_stopping_rounds") is None else int(args["early_stopping_rounds"]),
        progress=progress if args.get("progress", True) else None,
        init_model=init,
        weight=weight,
        enable_categorical=bool(args.get("enable_categorical", False)),
        feature_types=_feature_types(args.get("feature_types")),
        release=release,
    )
    seconds = time.perf_counter() - t0
    provenance = prior + [s.describe() for s in sources]
    owners = sorted({str(s["owner"]) for s in provenance} - {ctx.party})
    meta = model_meta(
        model,
        trainer=ctx.party,
        sources=provenance,
        data_owners=owners,
        continued_from=str(args["init_model"]) if args.get("init_model") else None,
    )
    _save_handle(ctx, meta, model)
    used = [s.dataset for s in sources if s.dataset]
    ctx.audit(
        "job",
        {"service": "gbdt.train", "model": meta["id"], "datasets": used, "rounds": model.num_rounds},
        concerns=owners,
    )
    return ServiceResult(info={"model": _public(meta), "history": model.history, "train_seconds": seconds})


def _visible_to(ctx: ServiceContext, data: DataRef, meta: dict[str, Any], what: str) -> None:
    """Refuse when the model would read a hidden column of data the caller may not reach."""
    if data.code_access(ctx.party):
        return
    used = (set(meta.get("features", [])) | ({meta["label"]} if meta.get("label") else set())) & data.hidden()
    if used:
        raise refuse(
            ctx,
            data,
            f"{what}: the model reads hidden column(s) {', '.join(sorted(used))} of dataset {data.dataset!r}",
            columns=sorted(used),
        )


@service("gbdt.evaluate")
def evaluate(ctx: ServiceContext, args: dict[str, Any], inputs: dict[str, Any]) -> ServiceResult:
    """Metrics of a model on labelled data (an aggregate: subject to the owner's min_group_size)."""
    meta, model = _use(ctx, args.get("model"), reread=False)
    data = resolve_data(ctx, args.get("data"), inputs, "evaluation data")
    _visible_to(ctx, data, meta, "evaluate")
    if not data.code_access(ctx.party) and data.policy is not None and len(data.frame) < data.policy.min_group_size:
        raise refuse(
            ctx,
            data,
            f"evaluate: {len(data.frame)} rows is below the owner's minimum group size {data.policy.min_group_size}",
        )
    label = inputs["label"] if "label" in inputs else args.get("label")
    frame = data.frame
    if data.dataset is not None:
        name = label if isinstance(label, str) else meta.get("label")
        wanted = list(meta.get("features", [])) + ([name] if isinstance(name, str) else [])
        if all(c in frame.columns for c in wanted):
            frame = frame[wanted]
    metrics = model.evaluate(frame, label)
    if data.dataset and data.owner != ctx.party:
        ctx.audit(
            "query", {"service": "gbdt.evaluate", "dataset": data.dataset, "model": meta["id"]}, concerns=[data.owner]
        )
    return ServiceResult(info={"metrics": metrics, "model": meta["id"]})


def _predictor(ctx: ServiceContext, meta: dict[str, Any], model: GBDTModel) -> TreePredictor:
    """Compiled trees for ``model``: from the worker, from sealed storage, or compiled now (then sealed)."""
    from mesatee_notebook.ml.treecompile import TreePredictor

    cache: dict[str, TreePredictor] = ctx.state.setdefault("gbdt_trees", {})
    digest = str(meta["digest"])  # model.digest serialises the model: milliseconds on a busy machine
    hit = cache.get(digest)
    if hit is not None:
        return hit
    where = private_dir(ctx) / "trees"
    where.mkdir(exist_ok=True)
    blob = f"cache/trees/{digest}"
    had_blob = restore_blob(ctx, blob, where)
    predictor = TreePredictor(model, where, nthread=1)
    if not (had_blob and predictor.compiled.from_cache):
        seal_dir(ctx, blob, predictor.compiled.path.parent)
    cache[digest] = predictor
    return predictor


@service("gbdt.compile")
def compile_trees(ctx: ServiceContext, args: dict[str, Any], inputs: dict[str, Any]) -> ServiceResult:
    """Compile the model's trees for low-latency prediction now (otherwise done on first small predict)."""
    meta, model = _use(ctx, args.get("model"), reread=False)
    t0 = time.perf_counter()
    predictor = _predictor(ctx, meta, model)
    return ServiceResult(
        info={
            "model": meta["id"],
            "seconds": time.perf_counter() - t0,
            "library_sha256": predictor.compiled.library_sha256,
            "crossover_rows": predictor.crossover_rows,
        }
    )


def _run_predict(
    ctx: ServiceContext,
    meta: dict[str, Any],
    model: GBDTModel,
    frame: pd.DataFrame | np.ndarray,
    margin: bool,
    engine: str,
) -> tuple[np.ndarray, str, str | None]:
    rows = frame.shape[0]
    if engine not in ("auto", "compiled", "xgboost"):
        msg = f"engine must be 'auto', 'compiled' or 'xgboost', not {engine!r}"
        raise EncodingError(msg)
    if engine == "xgboost" or (engine == "auto" and rows >= _crossover()):
        return model.predict(frame, margin=margin), "xgboost", None
    try:
        predictor = _predictor(ctx, meta, model)
    except Exception:  # no compiler here, or categorical splits: xgboost is always right
        if engine == "compiled":
            raise
        return model.predict(frame, margin=margin), "xgboost", None
    X = model.to_matrix(frame)
    return predictor.compiled.predict_matrix(X, margin=margin), "compiled", predictor.compiled.library_sha256


def _crossover() -> int:
    from mesatee_notebook.ml.treecompile import DEFAULT_CROSSOVER_ROWS

    return DEFAULT_CROSSOVER_ROWS


def _feature_frame(data: DataRef, meta: dict[str, Any]) -> Any:
    names = list(meta.get("features", []))
    if names and all(n in data.frame.columns for n in names):
        return data.frame[names]
    return data.frame


def _prediction_frame(pred: np.ndarray, margin: bool) -> pd.DataFrame:
    base = "margin" if margin else "prediction"
    if pred.ndim == 2:
        return pd.DataFrame({f"{base}_{j}": pred[:, j] for j in range(pred.shape[1])})
    return pd.DataFrame({base: pred})


@service("gbdt.predict")
def predict(ctx: ServiceContext, args: dict[str, Any], inputs: dict[str, Any]) -> ServiceResult:
    """Predict; the result stays in the enclave as a dataset when the data is another party's."""
    meta, model = _use(ctx, args.get("model"), reread=False)
    data = resolve_data(ctx, args.get("data"), inputs, "prediction data")
    margin = bool(args.get("margin", False))
    remote = args.get("remote")
    foreign = data.dataset is not None and data.owner != ctx.party
    keep = foreign if remote is None else bool(remote)
    if keep and data.dataset is None:
        msg = "only predictions on a stored dataset can stay in the enclave; this data came with the call"
        raise EncodingError(msg)
    if foreign and not keep and not data.code_access(ctx.party):
        raise refuse(
            ctx,
            data,
            f"predictions on dataset {data.dataset!r} stay in the enclave: its owner has not "
            "given you code access (call predict without remote=False)",
        )
    _visible_to(ctx, data, meta, "predict")
    frame = _feature_frame(data, meta) if data.dataset else data.frame
    t0 = time.perf_counter()
    pred, engine, lib = _run_predict(ctx, meta, model, frame, margin, str(args.get("engine", "auto")))
    info: dict[str, Any] = {
        "model": meta["id"],
        "engine": engine,
        "rows": int(pred.shape[0]),
        "predict_seconds": time.perf_counter() - t0,
        "model_digest": meta["digest"],
    }
    if lib is not None:
        info["library_sha256"] = lib
    if keep:
        derived = {"kind": "pred", "model": meta["id"], "model_digest": meta["digest"]}
        info["dataset"] = store_derived(ctx, data, _prediction_frame(pred, margin), args.get("name"), derived)
        return ServiceResult(info=info)
    return ServiceResult(info=info, values={"prediction": pred})


@service("gbdt.importance")
def importance(ctx: ServiceContext, args: dict[str, Any], inputs: dict[str, Any]) -> ServiceResult:
    """Feature importance (no rows leave): gain, weight, cover, total_gain or total_cover."""
    meta, model = _use(ctx, args.get("model"), reread=False)
    return ServiceResult(
        info={"importance": model.feature_importance(str(args.get("kind", "gain"))), "model": meta["id"]}
    )


@service("gbdt.info")
def info(ctx: ServiceContext, args: dict[str, Any], inputs: dict[str, Any]) -> ServiceResult:
    """A model's public description (trainer and data owners)."""
    meta, _ = _load_handle(ctx, args.get("model"))
    if ctx.party != meta["trainer"] and ctx.party not in meta.get("data_owners", []):
        msg = "this model handle belongs to another party"
        raise PolicyViolation(msg)
    return ServiceResult(info={"model": _public(meta)})


@service("gbdt.list")
def listing(ctx: ServiceContext, args: dict[str, Any], inputs: dict[str, Any]) -> ServiceResult:
    """Models the caller trained, or that were trained on the caller's data."""
    out = []
    for name in ctx.seal_list("models"):
        if not name.endswith("/meta"):
            continue
        meta = json.loads(ctx.seal_get(name))
        if ctx.party == meta["trainer"] or ctx.party in meta.get("data_owners", []):
            out.append(_public(meta))
    return ServiceResult(info={"models": sorted(out, key=lambda m: float(m.get("created") or 0))})


@service("gbdt.release")
def release(ctx: ServiceContext, args: dict[str, Any], inputs: dict[str, Any]) -> ServiceResult:
    """A data owner lets the trainer export a model trained on their data."""
    meta, model = _load_handle(ctx, args.get("model"))
    if ctx.party not in meta.get("data_owners", []):
        msg = "only a party whose data trained this model can release it"
        raise PolicyViolation(msg, model=meta["id"])
    meta["released_by"] = sorted(set(meta.get("released_by", [])) | {ctx.party})
    _save_handle(ctx, meta, model)
    ctx.audit("approval", {"service": "gbdt.release", "model": meta["id"]}, concerns=[meta["trainer"]])
    return ServiceResult(info={"model": _public(meta)})


@service("gbdt.export")
def export(ctx: ServiceContext, args: dict[str, Any], inputs: dict[str, Any]) -> ServiceResult:
    """The model as xgboost JSON, only if every data owner released it."""
    meta, model = _use(ctx, args.get("model"))
    if not _released(meta):
        waiting = sorted(set(meta["data_owners"]) - set(meta.get("released_by", [])))
        ctx.audit("refusal", {"model": meta["id"], "reason": "export of an unreleased model"}, concerns=waiting)
        who = ", ".join(w[:12] + "…" for w in waiting)
        msg = (
            f"model {meta['id'][:12]}… was trained on other parties' data and is not released; it stays in the "
            f"enclave until its data owner(s) release it (gbdt.release): waiting for {who}"
        )
        raise PolicyViolation(msg, model=meta["id"], waiting=waiting)
    ctx.audit(
        "release",
        {"service": "gbdt.export", "model": meta["id"], "digest": model.digest},
        concerns=list(meta["data_owners"]),
    )
    return ServiceResult(info={"model": meta["id"], "digest": model.digest}, values={"model": model.to_json()})


@service("gbdt.delete")
def delete(ctx: ServiceContext, args: dict[str, Any], inputs: dict[str, Any]) -> ServiceResult:
    """Delete a model handle (trainer only)."""
    meta, _ = _use(ctx, args.get("model"))
    for part in ("model", "meta"):
        with contextlib.suppress(NotFound):
            ctx.seal_delete(f"models/{meta['id']}/{part}")
    ctx.state.get("gbdt_models", {}).pop(meta["id"], None)
    return ServiceResult(info={"deleted": meta["id"]})
