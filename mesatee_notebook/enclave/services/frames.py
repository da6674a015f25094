"""The SecureDataFrame service: evaluate a plan under the owners' policies, in the service worker."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pandas as pd

from mesatee_notebook.enclave.frames import FrameEvaluator
from mesatee_notebook.enclave.services import ServiceContext, ServiceResult, service
from mesatee_notebook.enclave.services.datasets import load_dataset, load_meta
from mesatee_notebook.errors import NotFound
from mesatee_notebook.wire.datapolicy import DataPolicy

__all__ = ["SealedDatasets", "budget_root", "new_call"]


def budget_root(ctx: ServiceContext, dataset: str) -> str:
    """The dataset whose DP budget and differencing-guard history ``dataset`` shares.

    A dataset derived from another's rows (``gbdt.predict``/``tvm.run`` on a stored dataset keep one prediction per
    source row, under the source's policy) is charged to its root: otherwise each new prediction dataset would come
    with a fresh privacy budget and a fresh guard history over the same people (red team, session 6).
    """
    try:
        derived = load_meta(ctx, dataset).get("derived")
    except (NotFound, ValueError):
        return dataset
    if not isinstance(derived, dict):
        return dataset
    root = derived.get("root") or derived.get("from")  # "from": datasets derived before "root" was recorded
    return str(root) if root else dataset


class _Roots:
    """``budget_root`` per dataset name, remembered for one call (a name may be deleted and reused later).

    A call is marked by :func:`new_call`, not by the context object: the cluster head's store context lives as long
    as the head, so keyed by it the head remembered a name's root for good; a name deleted and reused for a
    dataset derived from another's rows was then charged to its old ledger (red team, session 7:
    ``tests/cluster/test_redteam_cluster.py``). An ``id()`` of a freed context could also come back.
    """

    def __init__(self, sink: dict[str, Any]) -> None:
        self._sink = sink
        self._seen: tuple[int, dict[str, str]] = (-1, {})

    @classmethod
    def of(cls, sink: dict[str, Any]) -> _Roots:
        """The one cache of ``sink``'s evaluator, shared by its ledger and guard stores (one metadata read each)."""
        roots = sink.get("roots")
        if not isinstance(roots, cls):
            roots = sink["roots"] = cls(sink)
        return roots

    def __call__(self, dataset: str) -> str:
        ctx: ServiceContext = self._sink["ctx"]
        call = int(self._sink.get("call", 0))
        key, cache = self._seen
        if key != call:
            cache = {}
            self._seen = (call, cache)
        if dataset not in cache:
            cache[dataset] = budget_root(ctx, dataset)
        return cache[dataset]


def new_call(sink: dict[str, Any]) -> None:
    """A new call starts on ``sink``'s evaluator: the roots remembered for the last one are forgotten."""
    sink["call"] = int(sink.get("call", 0)) + 1


class SealedDatasets(Mapping[str, tuple[pd.DataFrame, DataPolicy, str]]):
    """The evaluator's dataset registry, read lazily from sealed storage for the current call."""

    def __init__(self) -> None:
        self.ctx: ServiceContext | None = None

    def __getitem__(self, name: str) -> tuple[pd.DataFrame, DataPolicy, str]:
        assert self.ctx is not None
        try:
            readers = load_meta(self.ctx, name).get("readers")
            if readers is not None and self.ctx.party not in readers:
                raise KeyError(name)  # a job's result: only its receivers may even see that it exists
            return load_dataset(self.ctx, name)
        except (NotFound, ValueError) as exc:
            raise KeyError(name) from exc

    def __iter__(self) -> Iterator[str]:
        assert self.ctx is not None
        return iter(sorted({n.split("/")[1] for n in self.ctx.seal_list("datasets") if n.endswith("/meta")}))

    def __len__(self) -> int:
        return sum(1 for _ in self)


class SealedLedgerStore:
    """The DP budget ledger's entries in the service worker's sealed storage (``svc/dp/...``).

    Each entry is its own sealed object, written once; the supervisor's sealed store replaces
    files atomically, so a worker that dies mid-write leaves the entry whole or absent.
    """

    def __init__(self, sink: dict[str, Any]) -> None:
        self._sink = sink
        self._root = _Roots.of(sink)

    def _ctx(self) -> ServiceContext:
        ctx: ServiceContext = self._sink["ctx"]
        return ctx

    def _canon(self, name: str) -> str:
        """``dp/DATASET/...`` as ``dp/ROOT/...``: a derived dataset's entries are its root's (:func:`budget_root`)."""
        parts = name.split("/", 2)
        if len(parts) == 3 and parts[0] == "dp" and parts[1]:
            root = self._root(parts[1])
            if root != parts[1]:
                return f"dp/{root}/{parts[2]}"
        return name

    def put(self, name: str, data: bytes) -> None:
        self._ctx().seal_put(self._canon(name), data)

    def get(self, name: str) -> bytes:
        return bytes(self._ctx().seal_get(self._canon(name)))

    def list(self, prefix: str) -> list[str]:
        prefix = self._canon(prefix)
        return [n for n in self._ctx().seal_list(prefix.rstrip("/")) if n.startswith(prefix)]

    def delete(self, name: str) -> None:
        self._ctx().seal_delete(self._canon(name))


class SealedGuardStore:
    """The differencing guard's history, sealed per (party, dataset), so restarts do not reset it."""

    def __init__(self, sink: dict[str, Any]) -> None:
        self._sink = sink
        self._root = _Roots.of(sink)

    def root(self, dataset: str) -> str:
        """:func:`budget_root` (the guard keeps its history in memory per root too)."""
        return self._root(dataset)

    def _prefix(self, party: str, dataset: str) -> str:
        return f"guard/{party}/{self._root(dataset)}"  # a derived dataset's releases count in its root's history

    def load(self, party: str, dataset: str) -> list[tuple[bytes, bytes]]:
        ctx: ServiceContext = self._sink["ctx"]
        prefix = self._prefix(party, dataset)
        out = []
        for name in sorted(ctx.seal_list(prefix)):
            if name.startswith(prefix + "/"):  # the listing is by name prefix: "guard/P/ab" lists "guard/P/abc/..." too
                out.append((bytes.fromhex(name.rsplit("/", 1)[1]), ctx.seal_get(name)))
        return out

    def save(self, party: str, dataset: str, fp: bytes, release: bytes) -> None:
        ctx: ServiceContext = self._sink["ctx"]
        ctx.seal_put(f"{self._prefix(party, dataset)}/{fp.hex()}", release)


def release_audit(sink: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    """The evaluator's audit hook: each query or refusal, for the owners of the datasets it read (``sink["ctx"]``)."""

    def audit(event: dict[str, Any]) -> None:
        c = sink["ctx"]
        kind = "refusal" if event.get("outcome") == "refused" else "query"
        owners = []
        for name in event.get("datasets", []):
            try:
                owners.append(str(load_meta(c, str(name))["owner"]))
            except (NotFound, ValueError):
                continue
        c.audit(kind, event, concerns=sorted(set(owners)))

    return audit


def collect_result(ev: FrameEvaluator, ctx: ServiceContext, args: dict[str, Any]) -> ServiceResult:
    """Evaluate ``args['plan']`` for ``ctx.party`` with ``ev``: the value, and the info the receipt binds."""
    result = ev.evaluate(str(args.get("plan", "")), ctx.party, epsilon=args.get("epsilon"), delta=args.get("delta"))
    info: dict[str, Any] = {
        "plan_sha256": result.plan_sha256,
        "datasets": list(result.datasets),
        "level": result.level,
        "suppressed": result.suppressed,
    }
    values: dict[str, Any] = {"result": result.value}
    if result.dp is not None:  # a DP release: mechanisms, epsilon/delta and the budget left, signed in the receipt
        info["dp"] = result.dp
        info["privacy_budget"] = {result.dp["dataset"]: {**result.dp["budget"], "owner_exempt": False}}
        values["accuracy"] = result.accuracy
    return ServiceResult(info=info, values=values)


def _evaluator(ctx: ServiceContext) -> FrameEvaluator:
    """One evaluator per worker: its differencing-guard history lives as long as the worker."""
    ev = ctx.state.get("frame_evaluator")
    if ev is None:
        registry = SealedDatasets()
        sink: dict[str, Any] = {}
        ev = FrameEvaluator(
            registry, release_audit(sink), guard_store=SealedGuardStore(sink), ledger_store=SealedLedgerStore(sink)
        )
        ctx.state["frame_evaluator"] = (ev, registry, sink)
        return ev
    return ev[0]  # type: ignore[no-any-return]


def _bind(ctx: ServiceContext) -> FrameEvaluator:
    ev = _evaluator(ctx)
    _, registry, sink = ctx.state["frame_evaluator"]
    registry.ctx = ctx
    sink["ctx"] = ctx
    new_call(sink)
    if ctx.fresh:
        ev.forget_party(ctx.party)  # another worker served this party since: re-read its guard history
    return ev


@service("frame.collect")
def collect(ctx: ServiceContext, args: dict[str, Any], inputs: dict[str, Any]) -> ServiceResult:
    """Evaluate ``args['plan']`` for the caller; release the result only if every owner's policy allows it."""
    return collect_result(_bind(ctx), ctx, args)


@service("frame.budget")
def frame_budget(ctx: ServiceContext, args: dict[str, Any], inputs: dict[str, Any]) -> ServiceResult:
    """The caller's DP budget on one dataset: spent and remaining (and all analysts', when the owner capped it)."""
    ev = _bind(ctx)
    name = str(args.get("name", ""))
    return ServiceResult(info={"name": name, "privacy_budget": ev.privacy_budget(name, ctx.party)})


@service("frame.info")
def frame_info(ctx: ServiceContext, args: dict[str, Any], inputs: dict[str, Any]) -> ServiceResult:
    """The dataset as the caller sees it (schema, hidden columns) for building a SecureDataFrame."""
    ev = _bind(ctx)
    name = str(args.get("name", ""))
    try:
        info = ev.dataset_info(name, ctx.party)
        budget = ev.privacy_budget(name, ctx.party)
        if budget is not None:
            info["privacy_budget"] = budget
        return ServiceResult(info=info)
    except KeyError:
        msg = f"no dataset named {args.get('name')!r} in this kernel"
        raise NotFound(msg) from None
