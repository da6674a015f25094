"""SecureDataFrame plans over partitioned datasets, evaluated by the head (issue 18, "Engines on the cluster").

A plan that *decomposes* runs as one Dask task per partition, in the worker that holds it: a group-by whose
aggregations are ``sum``/``count``/``size``/``min``/``max``/``mean``, a series reduction (the same functions but
``size``) or ``len``, over row-wise ops only (source, select,
column, filter, assign, rename, astype, set_name, to_frame, binary, unary, isin, where) on one partitioned
dataset. Each task returns the partial aggregates (``mean`` as sum and count), the contributor counts and the
(group, source row) membership the policy needs. The head combines them into one value, exactly the value the
single-node evaluator builds, and runs the release rules on it: min group size, suppression, cell counts and the
differencing guard run on the COMBINED result, never per partition.

Every other plan (value_counts, describe, frame-wide reductions, joins, sorts, DP-mode datasets, boolean sums ...)
is *gathered*: the partitions' sealed bytes come to the head over ``atls://`` as opaque, digest-checked bytes and a
sandboxed split worker runs the stock evaluator on the whole frame, as on one node (``cluster/split.py``,
``partition.frames``): the head's supervisor never decodes them. The combine step above runs in the supervisor, on
the workers' partial results.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import pandas as pd

from mesatee_notebook.enclave.cluster.partitions import (
    _result,
    gather_frame,
    is_partitioned,
    load_partition,
    ready_partitions,
    schema_frame,
)
from mesatee_notebook.enclave.datasets import data_name, load_meta
from mesatee_notebook.enclave.frame_eval import _Run
from mesatee_notebook.enclave.frame_values import _FrameV, _Origin, _ScalarV, _SeriesV
from mesatee_notebook.enclave.frames import FrameEvaluator, FrameResult
from mesatee_notebook.enclave.services.frames import SealedGuardStore, SealedLedgerStore, new_call
from mesatee_notebook.errors import MesateeError, NotFound, PolicyViolation, RemoteExecutionError
from mesatee_notebook.wire.datapolicy import DataPolicy
from mesatee_notebook.wire.ops.aggregates import CountRows, GroupByAgg, Reduce
from mesatee_notebook.wire.plan import Plan, Schema, SourceInfo, infer_plan, plan_from_json, source_columns
from mesatee_notebook.wire.stream import Message

if TYPE_CHECKING:
    from mesatee_notebook.enclave.cluster.head import ClusterHead
    from mesatee_notebook.enclave.supervisor import Kernel

__all__ = ["ClusterFrameEvaluator", "decomposes", "frame_call", "partial_groupby", "plan_datasets"]

ROW_WISE: Final = frozenset(
    {"source", "select", "column", "filter", "assign", "rename", "astype", "set_name", "to_frame", "binary"}
    | {"unary", "isin", "where"}
)
PARTIAL_FUNCS: Final = frozenset({"sum", "count", "size", "min", "max", "mean"})
_SUM, _CNT = "\x00mn_sum:", "\x00mn_cnt:"


def plan_datasets(plan_json: Any) -> list[str]:
    """The datasets a plan reads ([] if it does not parse: the frame service then says why)."""
    try:
        plan = plan_from_json(str(plan_json or ""))
    except (MesateeError, ValueError, TypeError):
        return []
    return sorted({str(n.args["name"]) for n in plan.nodes.values() if n.op == "source"})


def decomposes(plan: Plan, schemas: Mapping[str, Schema]) -> bool:
    """Whether the plan is a partial aggregation (group-by, reduction, len) over row-wise ops on one source."""
    root = plan.nodes[plan.root]
    if sum(1 for n in plan.nodes.values() if n.op == "source") != 1:
        return False
    if any(n.op not in ROW_WISE for k, n in plan.nodes.items() if k != plan.root):
        return False
    # a boolean sum/mean counts contributors as min(true, false): not additive over partitions
    if isinstance(root, GroupByAgg):
        dtypes = {str(c): str(t) for c, t in schemas[root.input].columns}
        if any(f not in PARTIAL_FUNCS for _, _, f in root.aggs):
            return False
        return not any(f in ("sum", "mean") and dtypes.get(c, "bool") == "bool" for _, c, f in root.aggs)
    if isinstance(root, Reduce):
        dtype = str(schemas[root.input].columns[0][1])
        return root.func in PARTIAL_FUNCS - {"size"} and not (root.func in ("sum", "mean") and dtype == "bool")
    return isinstance(root, CountRows)


def _partial_plan(plan: Plan) -> Plan:
    """The group-by as each partition computes it: keys as columns, ``mean`` also as a sum and a count."""
    root = plan.nodes[plan.root]
    assert isinstance(root, GroupByAgg)
    aggs = list(root.aggs)
    for out, col, func in root.aggs:
        if func == "mean":
            aggs += [(_SUM + out, col, "sum"), (_CNT + out, col, "count")]
    node = dataclasses.replace(root, aggs=tuple(aggs), as_index=False)
    return Plan(plan.root, {**plan.nodes, plan.root: node}, plan.version)


def partial_groupby(sealed_as: str, sha256: str, plan: Plan, name: str, protected: bool) -> dict[str, Any]:
    """A Dask task, in the worker holding the partition: the partial aggregate and its provenance."""
    df = load_partition(sealed_as, sha256)
    sources = {name: SourceInfo(name, source_columns(df.dtypes.items()), frozenset())}
    run = _Run(plan, infer_plan(plan, sources), {name: df}, {name} if protected else set())
    value = run.evaluate()
    if isinstance(value, _ScalarV):
        root = plan.nodes[plan.root]
        out: dict[str, Any] = {"value": value.value, "counts": value.counts, "members": value.members}
        if isinstance(root, Reduce) and root.func == "mean":
            series = run.values[root.input]
            assert isinstance(series, _SeriesV)
            out.update(sum=series.s.sum(), count=int(series.s.count()))
        return out
    assert isinstance(value, _FrameV)
    return {"df": value.df, "members": value.origin.members, "cells": value.cells, "rows": len(df)}


def combine_scalar(node: Reduce | CountRows, parts: list[dict[str, Any]], offsets: list[int], name: str) -> _ScalarV:
    """Partial reductions as one scalar value, with the contributor counts and membership added up."""
    values = [p["value"] for p in parts]
    func = node.func if isinstance(node, Reduce) else "count"
    if func == "mean":
        total = sum(int(p["count"]) for p in parts)
        value: Any = sum(p["sum"] for p in parts) / total if total else np.nan
    elif func in ("min", "max"):
        present = [v for v in values if not pd.isna(v)]
        value = (min if func == "min" else max)(present) if present else np.nan
    else:
        value = sum(values[1:], values[0]) if values else 0
    counts: dict[str, int] = {}
    members: dict[str, tuple[Any, Any]] = {}
    if any(name in p["members"] for p in parts):
        counts[name] = sum(int(p["counts"].get(name, 0)) for p in parts)
        gs = [p["members"][name][0] for p in parts if name in p["members"]]
        ss = [p["members"][name][1] + off for p, off in zip(parts, offsets, strict=True) if name in p["members"]]
        members[name] = (np.concatenate(gs), np.concatenate(ss))
    return _ScalarV(value, counts, members, {name: False} if members else {})


def _combine_aggs(node: GroupByAgg, cat: pd.DataFrame) -> tuple[pd.DataFrame, Any]:
    gb = cat.groupby(list(node.by), sort=node.sort, dropna=node.dropna)
    cols: dict[str, pd.Series] = {}
    for out, _, func in node.aggs:
        if func == "mean":
            cols[out] = gb[_SUM + out].sum() / gb[_CNT + out].sum()
        elif func in ("min", "max"):
            cols[out] = getattr(gb[out], func)()
        else:
            cols[out] = gb[out].sum()
    return pd.DataFrame(cols), gb.ngroup().to_numpy()


def combine_groupby(node: GroupByAgg, parts: list[dict[str, Any]], offsets: list[int], name: str) -> _FrameV:
    """The partial results as one value, as the single-node evaluator would have built it."""
    cat = pd.concat([p["df"] for p in parts], ignore_index=True)
    res, codes = _combine_aggs(node, cat)
    n_groups = len(res)
    origin = _Origin("groups", n_groups, keys=res.index if node.as_index else None)
    cells: dict[str, dict[str, Any]] = {}
    if any(name in p["members"] for p in parts):
        gs, ss, start = [], [], 0
        maps = []
        for p, off in zip(parts, offsets, strict=True):
            m = np.asarray(codes[start : start + len(p["df"])], dtype=np.int64)
            start += len(p["df"])
            maps.append(m)
            g, s = p["members"].get(name, (np.empty(0, np.int64), np.empty(0, np.int64)))
            gs.append(m[g])
            ss.append(s + off)
        origin.members = {name: (np.concatenate(gs), np.concatenate(ss))}
        origin.sizes = {name: np.bincount(origin.members[name][0], minlength=n_groups).astype(np.int64)}
        origin.dup = {name: False}
        for out, _, func in node.aggs:
            if func == "size":
                continue
            total = np.zeros(n_groups, dtype=np.int64)
            for p, m in zip(parts, maps, strict=True):
                np.add.at(total, m, p["cells"][out][name])
            cells[out] = {name: total}
    res = res.reset_index() if not node.as_index else res.set_axis(pd.RangeIndex(n_groups), axis=0)
    return _FrameV(res, origin, cells)


class _SvcCtx:
    """The head's sealed store under the services' ``svc/`` prefix, for the guard and DP ledger stores."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def seal_get(self, name: str) -> bytes:
        return bytes(self.store.get(f"svc/{name}"))

    def seal_put(self, name: str, data: bytes) -> None:
        self.store.put(f"svc/{name}", data)

    def seal_list(self, prefix: str) -> list[str]:
        return [n[4:] for n in self.store.list(f"svc/{prefix}".rstrip("/"))]

    def seal_delete(self, name: str) -> None:
        self.store.delete(f"svc/{name}")


class _HeadDatasets(Mapping[str, tuple[pd.DataFrame, DataPolicy, str]]):
    """The head's registry: a partitioned dataset is gathered from its workers, any other read from the store."""

    def __init__(self, head: ClusterHead) -> None:
        assert head.partitions is not None
        self.head = head
        self.store = head.partitions.store

    def __getitem__(self, name: str) -> tuple[pd.DataFrame, DataPolicy, str]:
        import hashlib

        from mesatee_notebook.wire.codecs import decode_value

        try:
            meta = load_meta(self.store, name)
        except (NotFound, ValueError) as exc:
            raise KeyError(name) from exc
        if "partitions" in meta:
            df = gather_frame(self.head, name)
        else:
            raw = self.store.get(data_name(name))
            if hashlib.sha256(raw).hexdigest() != meta["sha256"]:
                msg = f"dataset {name!r}: its data does not match the digest in its metadata"
                raise PolicyViolation(msg)
            df = decode_value("arrow.frame", raw)
        return df, DataPolicy.from_dict(meta["policy"]), str(meta["owner"])

    def __iter__(self) -> Iterator[str]:
        return iter(sorted({n.split("/")[2] for n in self.store.list("svc/datasets") if n.endswith("/meta")}))

    def __len__(self) -> int:
        return sum(1 for _ in self)


class ClusterFrameEvaluator(FrameEvaluator):
    """The stock evaluator, with partial aggregation over partitions for plans that decompose."""

    def __init__(self, kernel: Kernel, head: ClusterHead) -> None:
        assert head.partitions is not None
        self.head = head
        self.store = head.partitions.store
        sink: dict[str, Any] = {"ctx": _SvcCtx(self.store)}
        self.sink = sink  # frame_call marks each call on it (services/frames.new_call): roots are read per call

        def audit(event: dict[str, Any]) -> None:
            owners = set()
            for n in event.get("datasets", []):
                try:
                    owners.add(str(load_meta(self.store, str(n))["owner"]))
                except (NotFound, ValueError):
                    continue
            kind = "refusal" if event.get("outcome") == "refused" else "query"
            kernel.audit_log.append(kind, event.get("party"), event, concerns=sorted(owners))

        super().__init__(
            _HeadDatasets(head), audit, guard_store=SealedGuardStore(sink), ledger_store=SealedLedgerStore(sink)
        )
        self.mode = threading.local()

    def _meta_lookup(self, name: str) -> tuple[pd.DataFrame, DataPolicy, str]:
        try:
            meta = load_meta(self.store, name)
        except (NotFound, ValueError):
            msg = f"no dataset named {name!r}"
            raise NotFound(msg) from None
        if "partitions" not in meta:
            return self._lookup(name)
        return schema_frame(self.store, name), DataPolicy.from_dict(meta["policy"]), str(meta["owner"])

    def _evaluate(
        self,
        plan_json: str | bytes,
        party: str,
        event: dict[str, Any],
        digest: str,
        epsilon: float | None,
        delta: float | None,
    ) -> FrameResult:
        plan = plan_from_json(plan_json)
        route = self.partial_route(plan, party)
        if route is None:  # frame_call sends these to a sandboxed split worker: never evaluated here
            msg = "a plan that does not decompose reached the head's evaluator; it is evaluated in a split worker"
            raise RemoteExecutionError(msg)
        schemas, policy, owner = route
        event["datasets"] = sorted({n.args["name"] for n in plan.nodes.values() if n.op == "source"})
        self.mode.value = "partial"
        return self._evaluate_partial(plan, schemas, party, event, digest, (policy, owner))

    def partial_route(self, plan: Plan, party: str) -> tuple[Mapping[str, Schema], DataPolicy, str] | None:
        """(schemas, policy, owner) when ``plan`` runs per partition for ``party``; None: it must be gathered.

        Only the plan (the client's JSON) and the dataset's zero-row schema are read here, never its rows.
        """
        names = sorted({n.args["name"] for n in plan.nodes.values() if n.op == "source"})
        if len(names) == 1 and is_partitioned(self.store, names[0]):
            df, policy, owner = self._meta_lookup(names[0])
            hidden = frozenset(() if owner == party else policy.hidden_columns)
            schemas = infer_plan(plan, {names[0]: SourceInfo(names[0], source_columns(df.dtypes.items()), hidden)})
            if decomposes(plan, schemas) and (owner == party or policy.privacy is None):
                return schemas, policy, owner
        return None

    def _evaluate_partial(
        self,
        plan: Plan,
        schemas: Mapping[str, Schema],
        party: str,
        event: dict[str, Any],
        digest: str,
        stored: tuple[DataPolicy, str],
    ) -> FrameResult:
        name = str(next(n.args["name"] for n in plan.nodes.values() if n.op == "source"))
        pol, owner = stored
        root = schemas[plan.root]
        event.update(root_op=plan.nodes[plan.root].op, level=root.level, cluster="partial")
        protected = {name: pol} if owner != party else {}
        event["owner_only"] = not protected
        if self._static_checks(plan, schemas, protected):  # the base evaluator's refusals, in its order
            msg = f"a DP-mode query of {name!r} is evaluated on the gathered frame, not by partitions"
            raise PolicyViolation(msg, dataset=name, rule="dp")  # _evaluate never sends one here
        meta = ready_partitions(self.head, name)  # every worker holding a partition is alive and holds its key
        node = plan.nodes[plan.root]
        partial = _partial_plan(plan) if isinstance(node, GroupByAgg) else plan
        tasks = [
            self.head.submit_to(
                str(p["worker"]), partial_groupby, str(p["sealed_as"]), str(p["sha256"]), partial, name, bool(protected)
            )
            for p in meta["partitions"]
        ]
        what = f"the partial {node.op} over {len(tasks)} partitions of {name!r}"
        parts = _result(tasks, what, head=self.head, workers=[str(p["worker"]) for p in meta["partitions"]])
        offsets = [int(p["offset"]) for p in meta["partitions"]]
        value: _FrameV | _ScalarV
        if isinstance(node, GroupByAgg):
            value = combine_groupby(node, parts, offsets, name)
        else:
            assert isinstance(node, (Reduce, CountRows))
            value = combine_scalar(node, parts, offsets, name)
        released, suppressed = self._release(value, protected, party, {name: int(meta["rows"])})
        event.update(outcome="released", suppressed=suppressed)
        if isinstance(released, (pd.DataFrame, pd.Series)):
            event["rows_out"] = len(released)
        return FrameResult(released, digest, (name,), root.level, suppressed)


def _evaluator(kernel: Kernel, head: ClusterHead) -> ClusterFrameEvaluator:
    ev: ClusterFrameEvaluator | None = getattr(head, "frame_evaluator", None)
    if ev is None:
        ev = ClusterFrameEvaluator(kernel, head)
        head.frame_evaluator = ev  # type: ignore[attr-defined]
    return ev


def _check_readers(ev: ClusterFrameEvaluator, names: list[str], party: str) -> None:
    for n in names:
        try:
            readers = load_meta(ev.store, n).get("readers")
        except (NotFound, ValueError):
            continue
        if readers is not None and party not in readers:
            msg = f"no dataset named {n!r} in this kernel"
            raise NotFound(msg)


def _gathered(ev: ClusterFrameEvaluator, plan_json: str, party: str) -> bool:
    """Whether the plan must be gathered (else it runs per partition; a plan that does not parse: the head says so)."""
    try:
        plan = plan_from_json(plan_json)
        return ev.partial_route(plan, party) is None
    except Exception:  # the head's evaluator raises (and audits) the same error, before any data is read
        return False


def frame_call(
    kernel: Kernel, head: ClusterHead, party: str, service: str, args: dict[str, Any], timeout: float = 600.0
) -> Message:
    """``frame.collect``/``frame.info``/``frame.budget`` on a plan that reads a partitioned dataset."""
    from mesatee_notebook.wire.codecs import encode_value

    ev = _evaluator(kernel, head)
    new_call(ev.sink)  # a name's budget root is read again for each call (it may have been deleted and reused)
    if service != "frame.collect":
        name = str(args.get("name", ""))
        _check_readers(ev, [name], party)
        if service == "frame.budget":
            return Message(
                {"t": "result", "values": [], "info": {"name": name, "privacy_budget": ev.privacy_budget(name, party)}}
            )
        described = ev.dataset_info(name, party)
        budget = ev.privacy_budget(name, party)
        if budget is not None:
            described["privacy_budget"] = budget
        return Message({"t": "result", "values": [], "info": described})
    plan = str(args.get("plan", ""))
    _check_readers(ev, plan_datasets(plan), party)
    if _gathered(ev, plan, party):  # decoded and evaluated in a sandboxed split worker (cluster/split.py)
        from mesatee_notebook.enclave.cluster.split import gathered_collect

        partitioned = [n for n in plan_datasets(plan) if is_partitioned(ev.store, n)]
        ev.forget_party(party)
        try:
            return gathered_collect(kernel, head, party, args, partitioned, timeout)
        finally:
            kernel.forget_party_frames(party)  # the worker may have added to the party's sealed guard history
    # One differencing history for the head and the service workers (red team, session 6): the head re-reads the
    # party's sealed history before each check, and the workers re-read it on the party's next call there.
    ev.forget_party(party)
    try:
        result = ev.evaluate(plan, party, epsilon=args.get("epsilon"), delta=args.get("delta"))
    finally:
        kernel.forget_party_frames(party)
    info: dict[str, Any] = {
        "plan_sha256": result.plan_sha256,
        "datasets": list(result.datasets),
        "level": result.level,
        "suppressed": result.suppressed,
        "cluster": {"evaluation": getattr(ev.mode, "value", "gathered")},
    }
    values: dict[str, Any] = {"result": result.value}
    if result.dp is not None:
        info["dp"] = result.dp
        info["privacy_budget"] = {result.dp["dataset"]: {**result.dp["budget"], "owner_exempt": False}}
        values["accuracy"] = result.accuracy
    specs: list[dict[str, Any]] = []
    payloads: list[bytes] = []
    for key, value in values.items():
        enc = encode_value(value)
        specs.append({"name": f"out/{key}", "kind": enc.kind, "meta": enc.meta, "inline": len(payloads)})
        payloads.append(b"".join(enc.parts))
    return Message({"t": "result", "values": specs, "info": info}, payloads)
