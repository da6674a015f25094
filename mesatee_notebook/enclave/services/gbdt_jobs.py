"""GBDT training on another party's data through the job approval path (issue 6).

An analyst creates a job of kind ``gbdt.train`` whose input ``data`` names a dataset and its owner; the owner looks
at the job (spec digest: dataset, label, columns, xgboost parameters, rounds, receiver) and approves it. Nobody gets
code access to the data: the enclave trains the model and keeps it as a sealed model handle
(:mod:`~mesatee_notebook.enclave.services.gbdt`) whose *trainer* is the job's receiver and whose *data owner* is the
input's owner, so the receiver can evaluate and predict with it like any model it trained, and exporting it needs
the data owner's ``gbdt.release``.

The job's params (everything the owner approves)::

    {"label": "y", "params": {...xgboost...}, "num_boost_round": 50, "columns": [...]?,   # columns: features + label
     "datasets": {"data": {"dataset": "churn"}}, "name": ...}

``datasets`` maps an input to the dataset that fills it (``JobsClient.create`` writes it from
``inputs={"data": {"dataset": ..., "owner": ...}}``). The owner fills it with ``job.submit_dataset``
(:mod:`~mesatee_notebook.enclave.services.jobs`, which runs :func:`train_spec` first): the enclave
checks that the caller owns the input *and* the dataset, and seals a reference bound to the dataset's current
digest (a dataset replaced after the approval fails the job); then it approves the same spec digest in the same
call. The runner (:func:`register_runner` ``("gbdt.train")``) refuses a model that would read a hidden column of the
dataset or train on fewer rows than its ``min_group_size``; without ``columns`` it uses every visible column.
An input can also be a table the owner uploads with ``job.submit`` (value ``data``, a DataFrame).
"""

from __future__ import annotations

import time
from typing import Any, Final

import pandas as pd

from mesatee_notebook.enclave.jobs import Job, JobStore
from mesatee_notebook.enclave.services import ServiceContext
from mesatee_notebook.enclave.services.datasets import load_dataset, load_meta
from mesatee_notebook.enclave.services.gbdt import _public, _save_handle, model_meta
from mesatee_notebook.enclave.services.jobs import dataset_inputs, register_check, register_runner
from mesatee_notebook.enclave.services.jobstore import pack_values, unpack_values
from mesatee_notebook.errors import EncodingError, NotFound, PolicyViolation
from mesatee_notebook.wire.datapolicy import DataPolicy

__all__ = ["KIND", "TrainSpec", "dataset_inputs", "train_spec"]

KIND: Final = "gbdt.train"
_INPUT: Final = "data"
_MAX_ROUNDS: Final = 10_000


class TrainSpec:
    """The validated params of a ``gbdt.train`` job."""

    def __init__(self, job: Job) -> None:
        params = job.spec.params
        names = [i.name for i in job.spec.inputs]
        if names != [_INPUT]:
            msg = f"a {KIND} job has exactly one input, {_INPUT!r} (the training table), not {names}"
            raise EncodingError(msg)
        if len(job.spec.receivers) != 1:
            msg = f"a {KIND} job has exactly one receiver: the party whose model handle it makes"
            raise EncodingError(msg)
        label = params.get("label")
        if not isinstance(label, str) or not label:
            msg = f"a {KIND} job names its label column: params={{'label': 'y', ...}}"
            raise EncodingError(msg)
        xgb_params = params.get("params") or {}
        if not isinstance(xgb_params, dict):
            msg = "params['params'] must be a dict of xgboost parameters"
            raise EncodingError(msg)
        rounds = params.get("num_boost_round", 100)
        if not isinstance(rounds, int) or isinstance(rounds, bool) or not 1 <= rounds <= _MAX_ROUNDS:
            msg = f"num_boost_round must be an int from 1 to {_MAX_ROUNDS}"
            raise EncodingError(msg)
        columns = params.get("columns")
        if columns is not None and (
            not isinstance(columns, list) or not all(isinstance(c, str) for c in columns) or label not in columns
        ):
            msg = "columns must be a list of column names that includes the label"
            raise EncodingError(msg)
        self.label: str = label
        self.params: dict[str, Any] = dict(xgb_params)
        self.num_boost_round: int = rounds
        self.columns: list[str] | None = None if columns is None else list(columns)
        self.trainer: str = job.spec.receivers[0]
        self.owner: str = job.spec.inputs[0].owner
        self.dataset: str | None = (dataset_inputs(job).get(_INPUT) or {}).get("dataset")


def train_spec(job: Job) -> TrainSpec:
    """Validate a ``gbdt.train`` job's spec (``EncodingError`` says what to fix)."""
    return TrainSpec(job)


register_check(KIND, train_spec)


# -- the runner ------------------------------------------------------------------------------------------------


def _training_frame(
    ctx: ServiceContext, store: JobStore, job: Job, spec: TrainSpec
) -> tuple[pd.DataFrame, DataPolicy | None, dict[str, Any]]:
    """(frame, policy, provenance) of the training input, checked against what was approved."""
    values, extra = unpack_values(store.input_data(job.job_id, _INPUT))
    if "dataset" in extra:
        name = str(extra["dataset"])
        if spec.dataset is not None and name != spec.dataset:
            msg = f"input {_INPUT!r} is dataset {name!r}, but the job names dataset {spec.dataset!r}"
            raise PolicyViolation(msg, dataset=name)
        meta = load_meta(ctx, name)
        if meta.get("sha256") != extra.get("sha256") or meta.get("owner") != spec.owner:
            msg = f"dataset {name!r} changed after its owner put it into the job; the owner must approve a new job"
            raise PolicyViolation(msg, dataset=name)
        frame, policy, _ = load_dataset(ctx, name)
        return frame, policy, {"dataset": name, "owner": spec.owner, "sha256": meta["sha256"], "job_id": job.job_id}
    if spec.dataset is not None:
        msg = f"the job names dataset {spec.dataset!r}; its owner must submit it with job.submit_dataset"
        raise PolicyViolation(msg)
    table = values.get("data")
    if isinstance(table, pd.Series):
        table = table.to_frame()
    if not isinstance(table, pd.DataFrame):
        msg = f"input {_INPUT!r} must be a pandas DataFrame with the label column"
        raise PolicyViolation(msg)
    return table, None, {"dataset": None, "owner": spec.owner, "sha256": job.submitted[_INPUT], "job_id": job.job_id}


@register_runner(KIND)
def run_train(ctx: ServiceContext, store: JobStore, job: Job) -> bytes:
    """Train the approved model; the handle belongs to the receiver, the data owner holds the release."""
    from mesatee_notebook.ml import gbdt

    try:
        spec = train_spec(job)
    except EncodingError as exc:
        raise PolicyViolation(exc.message) from None
    frame, policy, source = _training_frame(ctx, store, job, spec)
    hidden = set(policy.hidden_columns) if policy is not None else set()
    columns = spec.columns or [str(c) for c in frame.columns if c not in hidden or c == spec.label]
    missing = [c for c in columns if c not in frame.columns]
    if spec.label not in frame.columns:
        missing.append(spec.label)
    if missing:
        msg = f"the training data has no column(s) {', '.join(map(repr, sorted(set(missing))))}"
        raise NotFound(msg, columns=sorted(set(missing)))
    if hidden & set(columns):
        msg = f"the model would read hidden column(s) {', '.join(sorted(hidden & set(columns)))} of the data"
        raise PolicyViolation(msg, columns=sorted(hidden & set(columns)))
    if policy is not None and len(frame) < policy.min_group_size:
        msg = f"{len(frame)} training rows is below the data owner's minimum group size {policy.min_group_size}"
        raise PolicyViolation(msg)
    t0 = time.perf_counter()
    model = gbdt.train(frame[columns], spec.label, params=spec.params, num_boost_round=spec.num_boost_round)
    seconds = round(time.perf_counter() - t0, 4)
    meta = model_meta(
        model,
        trainer=spec.trainer,
        sources=[source],
        data_owners=sorted({spec.owner} - {spec.trainer}),
        job_id=job.job_id,
    )
    _save_handle(ctx, meta, model)
    ctx.audit(
        "job",
        {
            "service": KIND,
            "job_id": job.job_id,
            "model": meta["id"],
            "datasets": [source["dataset"]],
            "rounds": model.num_rounds,
            "trainer": spec.trainer,
        },
        concerns=sorted(job.spec.parties),
    )
    return pack_values({}, model=_public(meta), train_seconds=seconds)
