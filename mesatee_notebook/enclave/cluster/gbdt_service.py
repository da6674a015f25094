"""``gbdt.train`` on a partitioned dataset, served by the head in the supervisor (the engine: ``cluster/gbdt.py``).

The rules are those of single-node training (``enclave/services/gbdt.py``): the caller must own the data or be in
its policy's ``code_access``; the model stays in the enclave as a sealed handle (``svc/models/<id>``, the same
format), so ``gbdt.export`` releases it only when every other data owner released it (``gbdt.release``). The
receipt's info names the workers that trained it, with the measurements the head verified itself. A handle is
written only after every worker finished and all ended with the same model: a failure leaves nothing behind.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from mesatee_notebook.errors import EncodingError, NotAvailableYet, NotFound, PolicyViolation
from mesatee_notebook.wire.stream import Message

if TYPE_CHECKING:
    from mesatee_notebook.enclave.cluster.head import ClusterHead
    from mesatee_notebook.enclave.kernel import Kernel

__all__ = ["partitioned_dataset", "train_call"]

_UNSUPPORTED = (
    ("evals", "eval sets"),
    ("init_model", "continued training"),
    ("early_stopping_rounds", "early stopping"),
)


def partitioned_dataset(head: ClusterHead, args: Any) -> str | None:
    """The partitioned dataset a ``gbdt.train`` call names, or None (then it runs in the service pool as always)."""
    from mesatee_notebook.enclave.cluster.partitions import is_partitioned

    ref = args.get("data") if isinstance(args, dict) else None
    if not isinstance(ref, dict) or "dataset" not in ref:
        return None
    name = str(ref["dataset"])
    return name if is_partitioned(head, name) else None


def _refuse_unsupported(args: dict[str, Any]) -> str | None:
    """Refuse what the cluster engine does not do yet; return the weight column, if any."""
    for key, what in _UNSUPPORTED:
        if args.get(key):
            msg = f"gbdt.train on a partitioned dataset: {what} ({key}=) are not available yet on the cluster"
            raise NotAvailableYet(msg)
    weight = args.get("weight")
    if weight is None:
        return None
    if isinstance(weight, dict) and set(weight) == {"column"}:
        return str(weight["column"])
    msg = "gbdt.train on a partitioned dataset: give sample weights as a column of the dataset ({'column': NAME})"
    raise NotAvailableYet(msg)


def _access(kernel: Kernel, party: str, meta: dict[str, Any]) -> None:
    """The same right as single-node training: the owner, or a party in the policy's code_access."""
    from mesatee_notebook.wire.datapolicy import DataPolicy

    owner = str(meta["owner"])
    if DataPolicy.from_dict(dict(meta.get("policy") or {})).allows_code_access(party, owner):
        return
    name = str(meta["name"])
    msg = (
        f"training data: training on dataset {name!r} needs its owner's consent: the owner can add your party id "
        "to the dataset policy's code_access (approved gbdt.train jobs run on unpartitioned datasets only)"
    )
    kernel.audit_log.append("refusal", party, {"dataset": name, "reason": msg}, concerns=[owner])
    raise PolicyViolation(msg, dataset=name)


def _columns(ref: dict[str, Any], meta: dict[str, Any], label: str, weight: str | None) -> list[str] | None:
    cols = ref.get("columns")
    if cols is None:
        return None
    wanted = [str(c) for c in cols]
    wanted += [c for c in (label, weight) if c is not None and c not in wanted]
    have = {str(c) for c, _ in meta["columns"]}
    missing = [c for c in wanted if c not in have]
    if missing:
        msg = f"training data: column(s) {', '.join(map(repr, missing))} not in dataset {meta['name']!r}"
        raise NotFound(msg, columns=missing)
    return wanted


def _handle_meta(party: str, meta: dict[str, Any], training: Any) -> dict[str, Any]:
    model = training.model
    source = {"dataset": meta["name"], "owner": meta["owner"], "sha256": meta.get("sha256")}
    owners = sorted({str(meta["owner"])} - {party})
    from mesatee_notebook.enclave.services.gbdt import model_meta

    cluster = {"partitions": training.partitions, "workers": [w["address"] for w in training.workers]}
    return model_meta(model, trainer=party, sources=[source], data_owners=owners, cluster=cluster)


def train_call(kernel: Kernel, head: ClusterHead, party: str, name: str, args: dict[str, Any]) -> Message:
    """Train on the partitions of ``name`` with xgboost's collective; a sealed model handle, as single-node."""
    from mesatee_notebook.enclave.cluster.gbdt import train_on_partitions
    from mesatee_notebook.enclave.cluster.partitions import partition_futures, partitioned_meta
    from mesatee_notebook.enclave.services.gbdt import _public

    label = args.get("label")
    if not isinstance(label, str) or not label:
        msg = "give the label column by name (label='y')"
        raise EncodingError(msg)
    weight = _refuse_unsupported(args)
    meta = partitioned_meta(head, name)
    _access(kernel, party, meta)
    columns = _columns(dict(args["data"]), meta, label, weight)
    futures = partition_futures(head, name)
    try:
        training = train_on_partitions(
            head,
            futures,
            label,
            params=dict(args.get("params") or {}),
            num_boost_round=int(args.get("num_boost_round", 100)),
            weight_column=weight,
            columns=columns,
        )
    finally:
        for f in futures:
            f.release()
    handle = _handle_meta(party, meta, training)
    store = kernel.sealed_store()
    store.put(f"svc/models/{handle['id']}/model", bytes(training.model.booster.save_raw(raw_format="ubj")))
    store.put(f"svc/models/{handle['id']}/meta", json.dumps(handle).encode())
    kernel.audit_log.append(
        "job",
        party,
        {
            "service": "gbdt.train",
            "model": handle["id"],
            "datasets": [name],
            "rounds": training.model.num_rounds,
            "workers": handle["cluster"]["workers"],
        },
        concerns=list(handle["data_owners"]),
    )
    info = {
        "model": _public(handle),
        "history": {},
        "train_seconds": training.seconds,
        "cluster": {
            "scheduler": head._scheduler_record(),
            "workers": training.workers,
            "partitions": training.partitions,
            "rows": training.rows,
            "collective": training.collective,
            "notes": training.notes,
        },
    }
    return Message({"t": "result", "values": [], "info": info})
