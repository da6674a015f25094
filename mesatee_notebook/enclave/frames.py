"""The enclave side of the DataFrame proxy: validate a plan, evaluate it, apply the owners' policies.

A query is handled in four steps, and every query, released or not, reaches the
audit hook exactly once:

1. **Parse and type.** :func:`~mesatee_notebook.wire.plan.plan_from_json` checks the
   structure; :func:`~mesatee_notebook.wire.plan.infer_plan` checks it against the
   schemas the requesting party may see. A reference to a hidden column (also through
   ``rename`` or ``assign``, which can only read a column by naming it) is refused here.
2. **Static policy.** A row-level result (``head``, a filtered frame, a join) of a
   dataset whose owner does not allow rows is refused before anything is evaluated,
   as is a row-level result that still carries hidden columns or whose rows were
   matched on a hidden merge key.
3. **Evaluate** with pandas, node by node in topological order. Alongside each value
   the evaluator tracks *provenance*: for each protected dataset, which of its rows
   each output row (or group) was computed from.
4. **Policy on the result.** Every released group, cell and scalar must come from at
   least ``min_group_size`` distinct rows of each protected dataset (small groups are
   suppressed or refused per policy; small scalars are always refused). Then the
   differencing guard compares the released row sets with those already released to
   the same party, and the result leaves.

The owner of a dataset is exempt from its policy. See ``docs/dataframe.md`` for what
this does not guard against.
"""

from __future__ import annotations

import hashlib
import operator
import threading
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt
import pandas as pd

from mesatee_notebook.enclave.dp import (
    DP_FUNCS,
    Aggregated,
    BudgetLedger,
    LedgerStore,
    MemoryLedgerStore,
    bound_contributions,
    dp_aggregate,
)
from mesatee_notebook.errors import MalformedFrame, MesateeError, NotFound, PolicyViolation, RemoteExecutionError
from mesatee_notebook.wire.datapolicy import DP, DataPolicy
from mesatee_notebook.wire.plan import (
    QUANTILE_FUNCS,
    ROW_REVEALING_FUNCS,
    ROW_REVEALING_OPS,
    Lit,
    Plan,
    PlanNode,
    Ref,
    Schema,
    SourceInfo,
    dtype_kind,
    infer_plan,
    plan_from_json,
    source_columns,
)

__all__ = ["AuditHook", "DatasetRegistry", "FrameEvaluator", "FrameResult"]

DatasetRegistry = Mapping[str, tuple[pd.DataFrame, DataPolicy, str]]
AuditHook = Callable[[dict[str, Any]], None]
IntArray = npt.NDArray[np.int64]

_LPOS = "\x00mn_lpos"
_RPOS = "\x00mn_rpos"
_BINARY: dict[str, Callable[[Any, Any], Any]] = {
    "add": operator.add,
    "sub": operator.sub,
    "mul": operator.mul,
    "truediv": operator.truediv,
    "floordiv": operator.floordiv,
    "mod": operator.mod,
    "pow": operator.pow,
    "eq": operator.eq,
    "ne": operator.ne,
    "lt": operator.lt,
    "le": operator.le,
    "gt": operator.gt,
    "ge": operator.ge,
    "and": operator.and_,
    "or": operator.or_,
    "xor": operator.xor,
}


@dataclass(frozen=True, slots=True)
class FrameResult:
    """A released value and what the receipt should say about it."""

    value: Any
    plan_sha256: str
    datasets: tuple[str, ...]
    level: str
    suppressed: int
    dp: dict[str, Any] | None = None  # DP mode: mechanisms, epsilon/delta, budget (goes into the receipt's info)
    accuracy: Any = None  # DP mode: 95% accuracy of each released value, shaped like ``value``


# ---------------------------------------------------------------------------
# Provenance


@dataclass(slots=True)
class _Origin:
    """The node that indexed a value anew, and where its positions come from.

    For ``rows``: per protected dataset, the source row of each position (one array per
    occurrence of the dataset; ``None`` = the identity; -1 = no row, from an outer join).
    For ``groups``/``summary``: per protected dataset, the (position, source row)
    membership pairs, deduplicated.
    """

    kind: Literal["rows", "groups", "summary"]
    n: int
    rows: dict[str, list[IntArray | None]] = field(default_factory=dict)
    members: dict[str, tuple[IntArray, IntArray]] = field(default_factory=dict)
    sizes: dict[str, IntArray] = field(default_factory=dict)
    dup: dict[str, bool] = field(default_factory=dict)
    keys: pd.Index | None = None


Cells = dict[str, IntArray]  # dataset -> contributor count per origin position


@dataclass(slots=True)
class _FrameV:
    df: pd.DataFrame
    origin: _Origin
    cells: dict[str, Cells] = field(default_factory=dict)


@dataclass(slots=True)
class _SeriesV:
    s: pd.Series
    origin: _Origin
    cells: Cells | None = None
    entry_cells: dict[str, Cells] | None = None  # frame-level reductions: contributors per entry (column)


@dataclass(slots=True)
class _ScalarV:
    value: Any
    counts: dict[str, int]
    members: dict[str, tuple[IntArray, IntArray]]
    dup: dict[str, bool]


_Value = _FrameV | _SeriesV | _ScalarV


def _positions(index: pd.Index) -> IntArray:
    return np.asarray(index.to_numpy(), dtype=np.int64)


def _compose(arr: IntArray | None, pos: IntArray) -> IntArray:
    if arr is None:
        return pos
    out = arr[np.clip(pos, 0, None)] if len(arr) else np.full(len(pos), -1, dtype=np.int64)
    return np.where(pos >= 0, out, -1)


def _dedupe(g: IntArray, s: IntArray, n_src: int) -> tuple[IntArray, IntArray]:
    width = np.int64(max(n_src, 1))
    keys = np.asarray(pd.unique(g * width + s), dtype=np.int64)  # hash-based: O(n), unlike np.unique
    return keys // width, keys % width


def _membership(
    origin: _Origin, pos: IntArray, codes: IntArray, mask: npt.NDArray[np.bool_] | None, n_src: Mapping[str, int]
) -> dict[str, tuple[IntArray, IntArray]]:
    """Map each protected dataset's rows to the groups ``codes`` puts the value's rows in.

    ``pos`` are the value's positions in ``origin``; ``codes[i]`` is the group of row i
    (-1: none); ``mask`` keeps only some rows. Returns deduplicated (group, source row) pairs.
    """
    keep = codes >= 0 if mask is None else (codes >= 0) & mask
    out: dict[str, tuple[IntArray, IntArray]] = {}
    if origin.kind == "rows":
        for ds, arrays in origin.rows.items():
            gs, ss = [], []
            all_kept = bool(keep.all())
            for arr in arrays:
                src = _compose(arr, pos)
                if arr is None and all_kept:  # the common case: no copies
                    gs.append(codes)
                    ss.append(src)
                    continue
                ok = keep if arr is None else keep & (src >= 0)
                gs.append(codes[ok])
                ss.append(src[ok])
            g, s = (gs[0], ss[0]) if len(gs) == 1 else (np.concatenate(gs), np.concatenate(ss))
            out[ds] = _dedupe(g, s, n_src[ds]) if origin.dup.get(ds) or len(arrays) > 1 else (g, s)
        return out
    remap = np.full(origin.n, -1, dtype=np.int64)
    remap[pos[keep]] = codes[keep]
    for ds, (mpos, msrc) in origin.members.items():
        g = remap[mpos]
        ok = g >= 0
        g, s = g[ok], msrc[ok]
        out[ds] = _dedupe(g, s, n_src[ds])
    return out


def _counts(members: Mapping[str, tuple[IntArray, IntArray]], n_groups: int) -> Cells:
    return {ds: np.bincount(g, minlength=n_groups).astype(np.int64) for ds, (g, _) in members.items()}


def _min_cells(a: Cells | None, b: Cells | None) -> Cells | None:
    if a is None or b is None:
        return a if b is None else b
    out: Cells = dict(a)
    for ds, counts in b.items():
        out[ds] = np.minimum(out[ds], counts) if ds in out else counts
    return out


# ---------------------------------------------------------------------------
# The differencing guard


@dataclass(slots=True)
class _Release:
    sizes: IntArray
    labels: npt.NDArray[np.unsignedinteger[Any]] | None  # group per source row; len(sizes) = not released
    src: IntArray | None = None  # sorted (source row, group) pairs when a row is in several groups
    grp: IntArray | None = None


def release_to_bytes(release: _Release) -> bytes:
    """Serialise a release record (``.npz``, no pickle) so the guard's history can be sealed."""
    import io

    arrays = {
        k: v
        for k, v in (("sizes", release.sizes), ("labels", release.labels), ("src", release.src), ("grp", release.grp))
        if v is not None
    }
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def release_from_bytes(data: bytes) -> _Release:
    """Inverse of :func:`release_to_bytes`."""
    import io

    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        get = {k: z[k] for k in z.files}
    return _Release(get["sizes"], get.get("labels"), get.get("src"), get.get("grp"))


class GuardStore(Protocol):
    """Where the differencing guard keeps its history (sealed storage in the kernel)."""

    def load(self, party: str, dataset: str) -> list[tuple[bytes, bytes]]:
        """(fingerprint, serialised release) pairs recorded earlier for (party, dataset)."""
        ...

    def save(self, party: str, dataset: str, fp: bytes, release: bytes) -> None:
        """Persist one new release record."""
        ...


def _label_dtype(n_groups: int) -> type[np.unsignedinteger[Any]]:
    for dt in (np.uint8, np.uint16, np.uint32):
        if n_groups < np.iinfo(dt).max:
            return dt
    return np.uint64


def _pair_counts(a: IntArray, b: IntArray, nb: int) -> tuple[IntArray, IntArray, IntArray]:
    keys, cnt = np.unique(a * np.int64(max(nb, 1)) + b, return_counts=True)
    return keys // max(nb, 1), keys % max(nb, 1), cnt.astype(np.int64)


class _DifferencingGuard:
    """Released row sets per (party, dataset); refuses near-duplicates of earlier releases."""

    def __init__(self, limit: int, store: GuardStore | None = None) -> None:
        self.limit = limit
        self._store = store
        self._history: dict[tuple[str, str], list[_Release]] = {}
        self._seen: dict[tuple[str, str], set[bytes]] = {}

    def _ensure(self, key: tuple[str, str]) -> None:
        """Load the persisted history of ``key`` once per process, so a restart does not reset it."""
        if self._store is None or key in self._seen:
            return
        seen: set[bytes] = set()
        history: list[_Release] = []
        for fp, data in self._store.load(*key):
            if fp not in seen:
                seen.add(fp)
                history.append(release_from_bytes(data))
        self._seen[key] = seen
        self._history[key] = history

    def prepare(self, g: IntArray, s: IntArray, n_groups: int, n_src: int, dup: bool) -> tuple[bytes, _Release]:
        sizes = np.bincount(g, minlength=n_groups).astype(np.int64)
        h = hashlib.sha256(f"{n_groups}:{n_src}:{int(dup)}".encode())
        if not dup:
            labels = np.full(n_src, n_groups, dtype=_label_dtype(n_groups))
            labels[s] = g
            h.update(labels.tobytes())
            return h.digest(), _Release(sizes, labels)
        order = np.lexsort((g, s))
        src, grp = s[order], g[order]
        h.update(src.tobytes())
        h.update(grp.tobytes())
        return h.digest(), _Release(sizes, None, src, grp)

    def check(self, key: tuple[str, str], fp: bytes, new: _Release, k: int) -> None:
        self._ensure(key)
        if fp in self._seen.get(key, set()) or k <= 1:
            return
        history = self._history.get(key, [])
        for old in history:
            gi, hi, inter = self._intersections(new, old)
            delta = new.sizes[gi] + old.sizes[hi] - 2 * inter
            if np.any((delta > 0) & (delta < k)):
                msg = (
                    f"differencing guard: a group of this result differs from one already released to you by "
                    f"fewer than {k} rows of dataset {key[1]!r}; together they would single out individuals"
                )
                raise PolicyViolation(msg, dataset=key[1], guard="differencing")
        if len(history) >= self.limit:
            msg = (
                f"differencing guard: the release history for dataset {key[1]!r} is full ({self.limit} distinct "
                "aggregate releases); ask the owner to raise the limit"
            )
            raise PolicyViolation(msg, dataset=key[1], guard="differencing")

    def record(self, key: tuple[str, str], fp: bytes, new: _Release) -> None:
        self._ensure(key)
        seen = self._seen.setdefault(key, set())
        if fp not in seen:
            if self._store is not None:
                self._store.save(*key, fp, release_to_bytes(new))
            seen.add(fp)
            self._history.setdefault(key, []).append(new)

    def forget(self, party: str) -> None:
        """Drop ``party``'s cached history; it is re-read from the store on its next check."""
        if self._store is None:
            return  # nothing persisted to re-read: the in-memory history is the only record
        for key in [k for k in self._seen if k[0] == party]:
            self._seen.pop(key, None)
            self._history.pop(key, None)

    def released(self, party: str, dataset: str) -> int:
        """Return how many distinct aggregate releases are on record."""
        return len(self._history.get((party, dataset), []))

    @staticmethod
    def _intersections(new: _Release, old: _Release) -> tuple[IntArray, IntArray, IntArray]:
        n_old = len(old.sizes)
        if new.labels is not None and old.labels is not None:
            n_new = len(new.sizes)
            both = (new.labels < n_new) & (old.labels < n_old)
            return _pair_counts(new.labels[both].astype(np.int64), old.labels[both].astype(np.int64), n_old)
        if old.labels is not None:
            assert new.src is not None and new.grp is not None
            h = old.labels[new.src].astype(np.int64)
            ok = h < n_old
            return _pair_counts(new.grp[ok], h[ok], n_old)
        assert old.src is not None and old.grp is not None
        if new.labels is not None:
            n_new = len(new.sizes)
            h = new.labels[old.src].astype(np.int64)
            ok = h < n_new
            gi, hi, cnt = _pair_counts(old.grp[ok], h[ok], n_new)
            return hi, gi, cnt
        assert new.src is not None and new.grp is not None
        lo = np.searchsorted(old.src, new.src, "left")
        hi_ = np.searchsorted(old.src, new.src, "right")
        cnt = hi_ - lo
        starts = np.repeat(lo - (np.cumsum(cnt) - cnt), cnt) + np.arange(int(cnt.sum()))
        return _pair_counts(np.repeat(new.grp, cnt), old.grp[starts], n_old)


# ---------------------------------------------------------------------------
# The evaluator


class FrameEvaluator:
    """Evaluates DataFrame plans over an in-memory dataset registry under the owners' policies.

    ``datasets`` maps a name to ``(frame, policy, owner_party_id)``; it is read on every
    query, so the caller may add datasets. ``audit`` receives one event per query.
    ``history_limit`` bounds the distinct aggregate releases kept per (party, dataset)
    for the differencing guard; beyond it further new aggregates are refused.
    """

    def __init__(
        self,
        datasets: DatasetRegistry,
        audit: AuditHook,
        *,
        history_limit: int = 256,
        guard_store: GuardStore | None = None,
        ledger_store: LedgerStore | None = None,
    ) -> None:
        self._datasets = datasets
        self._audit = audit
        self._guard = _DifferencingGuard(history_limit, guard_store)
        self._guard_lock = threading.Lock()  # check-then-record must be atomic per release
        self._ledger = BudgetLedger(ledger_store if ledger_store is not None else MemoryLedgerStore())
        self._unique_units: dict[tuple[str, str], tuple[pd.DataFrame, bool]] = {}

    # -- public -----------------------------------------------------------

    def forget_party(self, party: str) -> None:
        """Re-read ``party``'s differencing history from the guard store on its next query.

        A kernel with several service workers calls this when a party's previous query ran in another worker.
        """
        with self._guard_lock:
            self._guard.forget(party)

    def dataset_info(self, name: str, party: str) -> dict[str, Any]:
        """Return the public schema of a dataset as ``party`` sees it (hidden columns listed, not shown)."""
        df, policy, owner = self._lookup(name)
        return {
            "name": name,
            "columns": [list(c) for c in source_columns(df.dtypes.items())],
            "hidden": [] if party == owner else list(policy.hidden_columns),
            "policy": policy.to_dict(),
            "owner": owner,
        }

    def privacy_budget(self, name: str, party: str) -> dict[str, Any] | None:
        """The DP budget ``party`` has spent and has left on dataset ``name`` (None: not a DP dataset)."""
        _, policy, owner = self._lookup(name)
        if policy.privacy is None:
            return None
        out = self._ledger.status(name, party, policy.privacy).to_dict()
        out["owner_exempt"] = party == owner
        return out

    def released_count(self, party: str, dataset: str) -> int:
        """Return how many distinct aggregates of ``dataset`` the guard has on record for ``party``."""
        return self._guard.released(party, dataset)

    def evaluate(
        self, plan_json: str | bytes, party: str, *, epsilon: float | None = None, delta: float | None = None
    ) -> FrameResult:
        """Validate, evaluate and release one plan for ``party``; raises ``PolicyViolation`` when refused.

        ``epsilon``/``delta``: what a query over a DP-mode dataset spends (default: the policy's).
        """
        started = time.perf_counter()
        digest = hashlib.sha256(plan_json if isinstance(plan_json, bytes) else plan_json.encode()).hexdigest()
        event: dict[str, Any] = {"event": "frames.query", "party": party, "plan_sha256": digest, "datasets": []}
        try:
            result = self._evaluate(
                plan_json, party, event, digest, _budget_arg(epsilon, "epsilon"), _budget_arg(delta, "delta")
            )
        except PolicyViolation as exc:
            event.update(outcome="refused", reason=exc.message)
            raise
        except MesateeError as exc:
            event.update(outcome="invalid", reason=exc.message)
            raise
        except Exception as exc:  # pandas/numpy failure on the data: reported without the data
            event.update(outcome="error", reason=type(exc).__name__)
            owner_only = event.get("owner_only", False)
            detail = f": {exc}" if owner_only else " (details withheld: the message could contain data)"
            msg = f"evaluating the plan failed with {type(exc).__name__}{detail}"
            raise RemoteExecutionError(msg, ename=type(exc).__name__) from None
        finally:
            event.pop("owner_only", None)
            event["duration_s"] = round(time.perf_counter() - started, 6)
            self._audit(event)
        return result

    # -- steps ------------------------------------------------------------

    def _lookup(self, name: str) -> tuple[pd.DataFrame, DataPolicy, str]:
        try:
            return self._datasets[name]
        except KeyError:
            msg = f"no dataset named {name!r}"
            raise NotFound(msg) from None

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
        names = sorted({n.args["name"] for n in plan.nodes.values() if n.op == "source"})
        event["datasets"] = names
        stored = {n: self._lookup(n) for n in names}
        sources = {
            n: SourceInfo(n, source_columns(df.dtypes.items()), frozenset(() if owner == party else pol.hidden_columns))
            for n, (df, pol, owner) in stored.items()
        }
        schemas = infer_plan(plan, sources)
        root = schemas[plan.root]
        event["root_op"] = plan.nodes[plan.root].op
        event["level"] = root.level
        protected = {n: pol for n, (_, pol, owner) in stored.items() if owner != party}
        event["owner_only"] = not protected
        _refuse_hidden_merge_keys(plan, schemas, protected)
        _refuse_row_revealing(plan, schemas, protected)
        if any(pol.privacy is not None for pol in protected.values()):
            return self._evaluate_dp(plan, schemas, stored, protected, party, event, digest, epsilon, delta)
        _refuse_record_values(plan, schemas, protected)
        self._static_policy(root, protected)
        run = _Run(plan, schemas, {n: df for n, (df, _, _) in stored.items()}, set(protected))
        value = run.evaluate()
        released, suppressed = self._release(value, protected, party, run.n_src)
        event.update(outcome="released", suppressed=suppressed)
        if isinstance(released, (pd.DataFrame, pd.Series)):
            event["rows_out"] = len(released)
        return FrameResult(released, digest, tuple(names), root.level, suppressed)

    # -- the DP mode -------------------------------------------------------

    def _units_unique(self, name: str, df: pd.DataFrame, unit: str) -> bool:
        hit = self._unique_units.get((name, unit))
        if hit is None or hit[0] is not df:
            hit = (df, bool(df[unit].is_unique))
            self._unique_units[(name, unit)] = hit
        return hit[1]

    def _evaluate_dp(
        self,
        plan: Plan,
        schemas: Mapping[str, Schema],
        stored: Mapping[str, tuple[pd.DataFrame, DataPolicy, str]],
        protected: Mapping[str, DataPolicy],
        party: str,
        event: dict[str, Any],
        digest: str,
        epsilon: float | None,
        delta: float | None,
    ) -> FrameResult:
        name = next(n for n, pol in protected.items() if pol.privacy is not None)
        if len(protected) > 1:
            others = sorted(set(protected) - {name})
            msg = (
                f"dataset {name!r} is in DP mode; a DP query may combine it only with your own datasets, "
                f"not with {others}"
            )
            raise PolicyViolation(msg, dataset=name, rule="dp")
        priv = protected[name].privacy
        assert priv is not None
        _refuse_dp_unsupported(plan, name)
        spec = _dp_spec(plan, schemas, name, priv)
        eps_q = epsilon if epsilon is not None else priv.default_epsilon
        delta_q = (delta if delta is not None else priv.default_delta) if spec.select else 0.0
        if spec.select and delta_q <= 0:
            cols = [b for b in spec.by if b not in priv.public_groups]
            msg = (
                f"the group keys of column(s) {cols} of DP dataset {name!r} are not declared public, and DP "
                "partition selection needs a delta > 0 (the owner's policy or collect(delta=...) gives none)"
            )
            raise PolicyViolation(msg, dataset=name, rule="dp_groups")
        frames = {n: df for n, (df, _, _) in stored.items()}
        run = _Run(Plan(spec.input_id, plan.nodes), schemas, frames, set(protected))
        value = run.evaluate()
        assert isinstance(value, (_FrameV, _SeriesV))
        arrays = value.origin.rows.get(name)
        if value.origin.kind != "rows" or arrays is None or len(arrays) != 1:
            msg = f"a DP query may use dataset {name!r} once (no self-joins) and aggregate its rows directly"
            raise PolicyViolation(msg, dataset=name, rule="dp")
        status = self._ledger.charge(name, party, priv, eps_q, delta_q, {"plan_sha256": digest})
        event["dp"] = {
            "dataset": name,
            "epsilon": eps_q,
            "delta": delta_q,
            "epsilon_remaining": status.epsilon_remaining,
        }
        data = value.df if isinstance(value, _FrameV) else value.s.to_frame(spec.series_name)
        src = _compose(arrays[0], _positions(data.index))
        keep = src >= 0  # rows not from the DP dataset (outer joins) would let its absence show
        source = frames[name]
        if value.origin.dup.get(name, False) or not (priv.unit is None or self._units_unique(name, source, priv.unit)):
            units = src[keep] if priv.unit is None else source[priv.unit].to_numpy()[src[keep]]
            bounded = np.zeros(len(src), dtype=bool)
            bounded[np.flatnonzero(keep)] = bound_contributions(units, priv.max_rows_per_unit)
            keep = bounded
        if not keep.all():
            data = data[keep]
        codes, n_groups, keys = _dp_groups(data, spec, priv)
        agg = dp_aggregate(
            data, codes, n_groups, spec.aggs, priv, eps_q, delta_q, select=spec.select,
            n_max=priv.max_rows_per_unit * max(len(source), 1),
        )  # fmt: skip
        released, accuracy = _dp_shape(agg, keys, spec, plan, schemas)
        meta: dict[str, Any] = {
            "dataset": name,
            "epsilon": eps_q,
            "delta": delta_q,
            "unit": priv.unit,
            "max_rows_per_unit": priv.max_rows_per_unit,
            "columns": {out: rel.meta() for out, rel in agg.columns.items()},
            "groups": "public" if spec.by and not spec.select else "partition selection" if spec.select else None,
            "selection": agg.selection,
            "budget": status.to_dict(),
        }
        event.update(outcome="released", suppressed=0)
        if isinstance(released, (pd.DataFrame, pd.Series)):
            event["rows_out"] = len(released)
        root = schemas[plan.root]
        return FrameResult(released, digest, tuple(sorted(stored)), root.level, 0, meta, accuracy)

    @staticmethod
    def _static_policy(root: Schema, protected: Mapping[str, DataPolicy]) -> None:
        if root.level != "rows":
            return
        for name in sorted(root.datasets & protected.keys()):
            if not protected[name].allow_rows:
                msg = (
                    f"the owner of dataset {name!r} does not allow row-level results (allow_rows=False); "
                    "aggregate instead: groupby().agg(), value_counts(), describe(), len(), sum(), mean() ..."
                )
                raise PolicyViolation(msg, dataset=name, rule="allow_rows")
        if root.hidden:
            msg = (
                f"the result would carry hidden column(s) {sorted(root.hidden)}; select the visible columns "
                "before collecting"
            )
            raise PolicyViolation(msg, rule="hidden_columns")
        if root.hidden_join and protected:
            msg = (
                "row-level results of a merge on a hidden column are refused: they would link the hidden value "
                "to a record; aggregate the merged frame instead"
            )
            raise PolicyViolation(msg, rule="hidden_columns")

    def _release(
        self, value: _Value, protected: Mapping[str, DataPolicy], party: str, n_src: Mapping[str, int]
    ) -> tuple[Any, int]:
        if isinstance(value, _ScalarV):
            for ds, count in value.counts.items():
                k = protected[ds].min_group_size
                if count < k:
                    msg = (
                        f"the result is computed from fewer than {k} rows of dataset {ds!r} "
                        f"(min_group_size={k}); widen the selection"
                    )
                    raise PolicyViolation(msg, dataset=ds, rule="min_group_size")
            self._guard_release(party, protected, value.members, 1, value.dup, n_src)
            return _plain(value.value), 0
        data: pd.DataFrame | pd.Series = value.df if isinstance(value, _FrameV) else value.s
        origin = value.origin
        if origin.kind == "rows":
            return data, 0
        cells = value.cells if isinstance(value, _FrameV) else ({str(data.name): value.cells} if value.cells else {})
        if isinstance(value, _SeriesV) and value.entry_cells is not None:
            return self._release_entries(value, value.entry_cells, protected, party, n_src), 0
        if origin.kind == "summary":
            return self._release_summary(data, value, cells, protected, party, n_src), 0
        pos = _positions(data.index)
        small = np.zeros(len(pos), dtype=bool)
        for ds, sizes in origin.sizes.items():
            small |= sizes[pos] < protected[ds].min_group_size
        self._refuse_small(small, protected, origin.sizes.keys(), "group")
        keep = ~small
        if small.any():
            data = data[keep]
            pos = pos[keep]
        data = data.copy() if any(cells.values()) else data
        for col, per_ds in cells.items():
            if isinstance(data, pd.DataFrame) and col not in data.columns:
                continue
            bad = np.zeros(len(pos), dtype=bool)
            for ds, counts in per_ds.items():
                bad |= counts[pos] < protected[ds].min_group_size
            if bad.any():
                self._refuse_small(bad, protected, per_ds.keys(), "cell")
                if isinstance(data, pd.DataFrame):
                    data[col] = data[col].astype("float64" if data[col].dtype.kind in "iub" else data[col].dtype)
                    data.loc[data.index[bad], col] = np.nan
                else:
                    data = data.astype("float64" if data.dtype.kind in "iub" else data.dtype)
                    data.iloc[np.flatnonzero(bad)] = np.nan
        remap = np.full(origin.n, -1, dtype=np.int64)
        remap[pos] = np.arange(len(pos))
        members = {}
        for ds, (g, s) in origin.members.items():
            ng = remap[g]
            ok = ng >= 0
            members[ds] = (ng[ok], s[ok])
        self._guard_release(party, protected, members, len(pos), origin.dup, n_src)
        if origin.keys is not None:
            data = data.set_axis(origin.keys.take(pos), axis=0)
        return data, int(small.sum())

    def _release_summary(
        self,
        data: pd.DataFrame | pd.Series,
        value: _FrameV | _SeriesV,
        cells: Mapping[str, Cells | None],
        protected: Mapping[str, DataPolicy],
        party: str,
        n_src: Mapping[str, int],
    ) -> pd.DataFrame | pd.Series:
        data = data.copy()
        for col, per_ds in cells.items():
            for ds, counts in (per_ds or {}).items():
                k = protected[ds].min_group_size
                if counts[0] < k:
                    self._refuse_small(np.ones(1, dtype=bool), protected, [ds], "column")
                    if isinstance(data, pd.DataFrame):
                        data[col] = np.nan
                    else:
                        data[:] = np.nan
        self._guard_release(party, protected, value.origin.members, 1, value.origin.dup, n_src)
        return data

    def _release_entries(
        self,
        value: _SeriesV,
        cells: Mapping[str, Cells],
        protected: Mapping[str, DataPolicy],
        party: str,
        n_src: Mapping[str, int],
    ) -> pd.Series:
        """A frame-level reduction: an entry from too few rows is suppressed (NaN) or refused."""
        data = value.s.copy()
        for col, per_ds in cells.items():
            for ds, counts in per_ds.items():
                if counts[0] < protected[ds].min_group_size:
                    self._refuse_small(np.ones(1, dtype=bool), protected, [ds], "column")
                    if data.dtype.kind in "iub":
                        data = data.astype("float64")
                    data.loc[col] = np.nan
        self._guard_release(party, protected, value.origin.members, 1, value.origin.dup, n_src)
        return data

    @staticmethod
    def _refuse_small(
        small: npt.NDArray[np.bool_], protected: Mapping[str, DataPolicy], datasets: Any, what: str
    ) -> None:
        if not small.any():
            return
        for ds in datasets:
            pol = protected[ds]
            if pol.small_group == "refuse":
                msg = (
                    f"a {what} of the result is computed from fewer than {pol.min_group_size} rows of dataset "
                    f"{ds!r} and its policy refuses small groups (small_group='refuse')"
                )
                raise PolicyViolation(msg, dataset=ds, rule="min_group_size")

    def _guard_release(
        self,
        party: str,
        protected: Mapping[str, DataPolicy],
        members: Mapping[str, tuple[IntArray, IntArray]],
        n_groups: int,
        dup: Mapping[str, bool],
        n_src: Mapping[str, int],
    ) -> None:
        staged = []
        for ds, (g, s) in members.items():
            pol = protected[ds]
            if pol.differencing_guard:
                fp, rel = self._guard.prepare(g, s, n_groups, n_src[ds], dup.get(ds, False))
                staged.append(((party, ds), fp, rel, pol.min_group_size))
        with self._guard_lock:
            for key, fp, rel, k in staged:
                self._guard.check(key, fp, rel, k)
            for key, fp, rel, _ in staged:
                self._guard.record(key, fp, rel)


def _plain(value: Any) -> Any:
    item = getattr(value, "item", None)
    if callable(item) and type(value).__module__ == "numpy":
        return item()
    return value


class _Run:
    """One evaluation: visits the plan's nodes in order and keeps their values."""

    def __init__(
        self, plan: Plan, schemas: Mapping[str, Schema], frames: Mapping[str, pd.DataFrame], protected: set[str]
    ) -> None:
        self.plan = plan
        self.schemas = schemas
        self.frames = frames
        self.protected = protected
        self.n_src = {n: len(df) for n, df in frames.items()}
        self.values: dict[str, _Value] = {}
        self.origins: dict[Hashable, _Origin] = {}

    def evaluate(self) -> _Value:
        for nid in self.plan.order():
            node = self.plan.nodes[nid]
            visit: Callable[[str, PlanNode], _Value] = getattr(self, f"visit_{node.op}")
            self.values[nid] = visit(nid, node)
        return self.values[self.plan.root]

    def _get(self, ref: Ref) -> _Value:
        return self.values[ref.target]

    def _frame(self, ref: Ref) -> _FrameV:
        v = self._get(ref)
        assert isinstance(v, _FrameV)
        return v

    def _series(self, ref: Ref) -> _SeriesV:
        v = self._get(ref)
        assert isinstance(v, _SeriesV)
        return v

    def _rows(self, v: _Value) -> _FrameV | _SeriesV:
        assert not isinstance(v, _ScalarV)
        return v

    def _like(self, v: _FrameV | _SeriesV, data: pd.DataFrame | pd.Series) -> _FrameV | _SeriesV:
        if isinstance(v, _FrameV):
            assert isinstance(data, pd.DataFrame)
            return _FrameV(data, v.origin, v.cells)
        assert isinstance(data, pd.Series)
        return _SeriesV(data, v.origin, v.cells)

    @staticmethod
    def _data(v: _FrameV | _SeriesV) -> pd.DataFrame | pd.Series:
        return v.df if isinstance(v, _FrameV) else v.s

    # -- sources and row ops --------------------------------------------

    def visit_source(self, nid: str, node: PlanNode) -> _Value:
        name = node.args["name"]
        df = self.frames[name]
        idx = df.index
        if not (isinstance(idx, pd.RangeIndex) and idx.start == 0 and idx.step == 1):
            df = df.reset_index(drop=True)
        token = self.schemas[nid].origin
        origin = self.origins.get(token)
        if origin is None:
            origin = _Origin("rows", len(df))
            if name in self.protected:
                origin.rows[name] = [None]
                origin.dup[name] = False
            self.origins[token] = origin
        return _FrameV(df, origin)

    def visit_select(self, nid: str, node: PlanNode) -> _Value:
        v = self._rows(self._get(node.args["input"]))
        assert isinstance(v, _FrameV)
        cols = list(node.args["columns"])
        return _FrameV(v.df[cols], v.origin, {c: v.cells[c] for c in cols if c in v.cells})

    def visit_column(self, nid: str, node: PlanNode) -> _Value:
        v = self._frame(node.args["input"])
        name = node.args["name"]
        return _SeriesV(v.df[name], v.origin, v.cells.get(name))

    def visit_filter(self, nid: str, node: PlanNode) -> _Value:
        v = self._rows(self._get(node.args["input"]))
        pred = self._series(node.args["predicate"])
        data = self._data(v)
        mask = pred.s
        if not mask.index.equals(data.index):
            mask = mask.reindex(data.index)
        if mask.dtype != bool:
            mask = mask.fillna(False).astype(bool)
        return self._like(v, data[mask])

    def visit_assign(self, nid: str, node: PlanNode) -> _Value:
        v = self._frame(node.args["input"])
        cols: dict[str, Any] = {}
        cells = dict(v.cells)
        for name, operand in node.args["columns"]:
            if isinstance(operand, Ref):
                sv = self._series(operand)
                # align explicitly: pandas would adopt the series' index when the frame is empty
                cols[name] = sv.s if sv.s.index.equals(v.df.index) else sv.s.reindex(v.df.index)
                if sv.cells is not None:
                    cells[name] = sv.cells
                else:
                    cells.pop(name, None)
            else:
                cols[name] = operand.value
                cells.pop(name, None)
        return _FrameV(v.df.assign(**cols), v.origin, cells)

    def visit_rename(self, nid: str, node: PlanNode) -> _Value:
        v = self._frame(node.args["input"])
        mapping: Mapping[str, str] = node.args["columns"]
        cells = {mapping.get(c, c): x for c, x in v.cells.items()}
        return _FrameV(v.df.rename(columns=dict(mapping)), v.origin, cells)

    def visit_fillna(self, nid: str, node: PlanNode) -> _Value:
        v = self._rows(self._get(node.args["input"]))
        return self._like(v, self._data(v).fillna(node.args["value"]))

    def visit_astype(self, nid: str, node: PlanNode) -> _Value:
        v = self._rows(self._get(node.args["input"]))
        spec: Any = node.args["dtype"]
        data: Any = self._data(v)
        return self._like(v, data.astype(spec if isinstance(spec, str) else dict(spec)))

    def visit_sort_values(self, nid: str, node: PlanNode) -> _Value:
        v = self._rows(self._get(node.args["input"]))
        asc = list(node.args["ascending"])
        if isinstance(v, _FrameV):
            return self._like(v, v.df.sort_values(list(node.args["by"]), ascending=asc))
        return self._like(v, v.s.sort_values(ascending=asc[0]))

    def visit_head(self, nid: str, node: PlanNode) -> _Value:
        v = self._rows(self._get(node.args["input"]))
        return self._like(v, self._data(v).head(node.args["n"]))

    def visit_tail(self, nid: str, node: PlanNode) -> _Value:
        v = self._rows(self._get(node.args["input"]))
        return self._like(v, self._data(v).tail(node.args["n"]))

    def visit_drop_duplicates(self, nid: str, node: PlanNode) -> _Value:
        v = self._rows(self._get(node.args["input"]))
        keep: Literal["first", "last", False] = False if node.args["keep"] == "none" else node.args["keep"]
        if isinstance(v, _FrameV):
            return self._like(v, v.df.drop_duplicates(subset=list(node.args["subset"]), keep=keep))
        return self._like(v, v.s.drop_duplicates(keep=keep))

    # -- merge ----------------------------------------------------------

    def visit_merge(self, nid: str, node: PlanNode) -> _Value:
        a = node.args
        left, right = self._frame(a["left"]), self._frame(a["right"])
        kwargs: dict[str, Any] = {
            "how": a["how"],
            "left_on": list(a["left_on"]),
            "right_on": list(a["right_on"]),
            "suffixes": a["suffixes"],
        }
        track = bool(left.origin.rows or right.origin.rows)
        if not track:
            out = left.df.merge(right.df, **kwargs)
            return _FrameV(out.reset_index(drop=True), _Origin("rows", len(out)))
        ldf = left.df.assign(**{_LPOS: _positions(left.df.index)})
        rdf = right.df.assign(**{_RPOS: _positions(right.df.index)})
        out = ldf.merge(rdf, **kwargs)
        lpos = np.asarray(out.pop(_LPOS).fillna(-1).to_numpy(), dtype=np.int64)
        rpos = np.asarray(out.pop(_RPOS).fillna(-1).to_numpy(), dtype=np.int64)
        out = out.reset_index(drop=True)
        return _FrameV(out, _rows_origin(len(out), ((left.origin, lpos), (right.origin, rpos))))

    # -- aggregates -----------------------------------------------------

    def _group_cells(self, v: _FrameV, codes: IntArray, sizes: Cells, col: str, func: str) -> Cells:
        """Distinct protected rows behind each group's value of ``col`` (non-missing; both outcomes for booleans)."""
        series = v.df[col]
        pos = _positions(v.df.index)
        notna = series.notna().to_numpy()
        boolean = func in ("sum", "mean") and series.dtype.kind == "b"
        if notna.all() and not boolean:
            return sizes
        n_groups = len(next(iter(sizes.values())))
        if boolean:
            truth = series.to_numpy(dtype=bool, na_value=False)
            t = _counts(_membership(v.origin, pos, codes, notna & truth, self.n_src), n_groups)
            f = _counts(_membership(v.origin, pos, codes, notna & ~truth, self.n_src), n_groups)
            return {ds: np.minimum(t[ds], f[ds]) for ds in t}
        return _counts(_membership(v.origin, pos, codes, notna, self.n_src), n_groups)

    def visit_groupby_agg(self, nid: str, node: PlanNode) -> _Value:
        a = node.args
        v = self._frame(a["input"])
        by = list(a["by"])
        gb = v.df.groupby(by, sort=a["sort"], dropna=a["dropna"])
        res = gb.agg(**{out: (col, _pandas_func(func)) for out, col, func in a["aggs"]})
        n_groups = len(res)
        origin = _Origin("groups", n_groups, keys=None if not a["as_index"] else res.index)
        cells: dict[str, Cells] = {}
        if v.origin.rows or v.origin.members:
            codes = _codes(gb.ngroup())
            pos = _positions(v.df.index)
            origin.members = _membership(v.origin, pos, codes, None, self.n_src)
            origin.sizes = _counts(origin.members, n_groups)
            origin.dup = dict(v.origin.dup)
            for out, col, func in a["aggs"]:
                if func != "size":
                    cells[out] = self._group_cells(v, codes, origin.sizes, col, func)
        res = res.reset_index() if not a["as_index"] else res.set_axis(pd.RangeIndex(n_groups), axis=0)
        return _FrameV(res, origin, cells)

    def visit_value_counts(self, nid: str, node: PlanNode) -> _Value:
        a = node.args
        v = self._rows(self._get(a["input"]))
        flags: dict[str, Any] = {
            "normalize": a["normalize"],
            "sort": a["sort"],
            "ascending": a["ascending"],
            "dropna": a["dropna"],
        }
        if isinstance(v, _FrameV):
            subset = list(a["subset"])
            key: Any = subset[0] if len(subset) == 1 else subset  # one column: a flat index, as value_counts("a")
            vc = v.df.value_counts(key, **flags)
            grouper: Any = v.df.groupby(key, sort=False, dropna=a["dropna"])
        else:
            vc = v.s.value_counts(**flags)
            grouper = v.s.groupby(v.s, sort=False, dropna=a["dropna"])
        origin = _Origin("groups", len(vc), keys=vc.index)
        if v.origin.rows or v.origin.members:
            first = _codes(grouper.ngroup())
            perm = np.asarray(vc.index.get_indexer(grouper.size().index), dtype=np.int64)
            codes = np.where(first >= 0, perm[np.clip(first, 0, None)] if len(perm) else -1, -1)
            origin.members = _membership(v.origin, _positions(self._data(v).index), codes, None, self.n_src)
            origin.sizes = _counts(origin.members, len(vc))
            origin.dup = dict(v.origin.dup)
        return _SeriesV(vc.set_axis(pd.RangeIndex(len(vc)), axis=0), origin)

    def visit_describe(self, nid: str, node: PlanNode) -> _Value:
        v = self._rows(self._get(node.args["input"]))
        data = self._data(v)
        pos = _positions(data.index)
        origin = _Origin("summary", 1)
        zeros = np.zeros(len(pos), dtype=np.int64)
        if v.origin.rows or v.origin.members:
            origin.members = _membership(v.origin, pos, zeros, None, self.n_src)
            origin.dup = dict(v.origin.dup)

        def column_cells(s: pd.Series) -> Cells:
            return _counts(_membership(v.origin, pos, zeros, s.notna().to_numpy(), self.n_src), 1)

        if isinstance(v, _FrameV):
            cols = list(node.args["columns"])
            res = v.df[cols].describe()
            cells = {c: column_cells(v.df[c]) for c in cols} if origin.members else {}
            return _FrameV(res, origin, cells)
        return _SeriesV(v.s.describe(), origin, column_cells(v.s) if origin.members else None)

    def _scalar(
        self, value: Any, v: _SeriesV | _FrameV, mask: npt.NDArray[np.bool_] | None, index: pd.Index | None = None
    ) -> _ScalarV:
        pos = _positions(self._data(v).index if index is None else index)
        zeros = np.zeros(len(pos), dtype=np.int64)
        members = _membership(v.origin, pos, zeros, None, self.n_src)
        counted = members if mask is None else _membership(v.origin, pos, zeros, mask, self.n_src)
        counts = {ds: len(np.unique(s)) if v.origin.dup.get(ds) else len(s) for ds, (_, s) in counted.items()}
        return _ScalarV(value, counts, members, dict(v.origin.dup))

    def visit_reduce(self, nid: str, node: PlanNode) -> _Value:
        v = self._series(node.args["input"])
        func = node.args["func"]
        value = v.s.quantile(int(func[1:]) / 100) if func in QUANTILE_FUNCS else getattr(v.s, func)()
        if not (v.origin.rows or v.origin.members):
            return _ScalarV(value, {}, {}, {})
        notna = v.s.notna().to_numpy()
        if func in ("sum", "mean") and v.s.dtype.kind == "b":
            truth = v.s.to_numpy(dtype=bool, na_value=False)
            t = self._scalar(value, v, notna & truth)
            f = self._scalar(value, v, notna & ~truth)
            return _ScalarV(value, {ds: min(t.counts[ds], f.counts[ds]) for ds in t.counts}, t.members, t.dup)
        return self._scalar(value, v, notna)

    def visit_corr(self, nid: str, node: PlanNode) -> _Value:
        left, right = self._series(node.args["left"]), self._series(node.args["right"])
        method = node.args["method"]
        value = left.s.cov(right.s) if method == "cov" else left.s.corr(right.s, method=method)
        if not (left.origin.rows or left.origin.members):
            return _ScalarV(value, {}, {}, {})
        a, b = left.s.align(right.s, join="inner")
        return self._scalar(value, left, (a.notna() & b.notna()).to_numpy(), a.index)

    def visit_count_rows(self, nid: str, node: PlanNode) -> _Value:
        v = self._rows(self._get(node.args["input"]))
        value = len(self._data(v))
        if not (v.origin.rows or v.origin.members):
            return _ScalarV(value, {}, {}, {})
        return self._scalar(value, v, None)

    # -- expressions ----------------------------------------------------

    def visit_binary(self, nid: str, node: PlanNode) -> _Value:
        a = node.args
        fn = _BINARY[a["op"]]
        operands: list[Any] = []
        cells: Cells | None = None
        origin: _Origin | None = None
        for operand in (a["left"], a["right"]):
            if isinstance(operand, Lit):
                operands.append(operand.value)
            else:
                sv = self._series(operand)
                operands.append(sv.s)
                cells = _min_cells(cells, sv.cells)
                origin = sv.origin
        assert origin is not None
        return _SeriesV(fn(operands[0], operands[1]), origin, cells)

    def visit_unary(self, nid: str, node: PlanNode) -> _Value:
        v = self._series(node.args["input"])
        op = node.args["op"]
        out = -v.s if op == "neg" else ~v.s if op == "invert" else v.s.abs()
        return _SeriesV(out, v.origin, v.cells)

    def visit_isin(self, nid: str, node: PlanNode) -> _Value:
        v = self._series(node.args["input"])
        return _SeriesV(v.s.isin(list(node.args["values"])), v.origin, v.cells)

    # -- issue 16: pandas as users know it ------------------------------

    def visit_map(self, nid: str, node: PlanNode) -> _Value:
        v = self._series(node.args["input"])
        return _SeriesV(_map_series(v.s, node.args["func"], tuple(node.args["args"])), v.origin, v.cells)

    def visit_window(self, nid: str, node: PlanNode) -> _Value:
        v = self._series(node.args["input"])
        return _SeriesV(_window_series(v.s, node.args["func"], tuple(node.args["args"])), v.origin, v.cells)

    def visit_where(self, nid: str, node: PlanNode) -> _Value:
        a = node.args
        v, cond = self._series(a["input"]), self._series(a["cond"])
        cells = _min_cells(v.cells, cond.cells)
        other: Any
        if isinstance(a["other"], Lit):
            other = np.nan if a["other"].value is None else a["other"].value
        else:
            ov = self._series(a["other"])
            other, cells = ov.s, _min_cells(cells, ov.cells)
        mask = cond.s if cond.s.index.equals(v.s.index) else cond.s.reindex(v.s.index)
        out = v.s.where(mask, other) if a["keep"] else v.s.mask(mask, other)
        return _SeriesV(out, v.origin, cells)

    def visit_distinct(self, nid: str, node: PlanNode) -> _Value:
        v = self._series(node.args["input"])
        first = v.s.drop_duplicates()
        if node.args["func"] == "unique":
            return _SeriesV(first, v.origin)
        mode = v.s.mode()
        at = pd.Index(first.to_numpy()).get_indexer(mode.to_numpy())
        pos = _positions(first.index)[at]
        return _SeriesV(mode, _rows_origin(len(mode), ((v.origin, pos),)))

    def visit_set_name(self, nid: str, node: PlanNode) -> _Value:
        v = self._series(node.args["input"])
        return _SeriesV(v.s.rename(node.args["name"]), v.origin, v.cells)

    def visit_to_frame(self, nid: str, node: PlanNode) -> _Value:
        v = self._series(node.args["input"])
        name = node.args["name"]
        return _FrameV(v.s.to_frame(name), v.origin, {name: v.cells} if v.cells is not None else {})

    def visit_slice(self, nid: str, node: PlanNode) -> _Value:
        v = self._rows(self._get(node.args["input"]))
        start, stop, step = node.args["bounds"]
        data = self._data(v)
        out = data.iloc[start:stop:step] if node.args["kind"] == "iloc" else data.loc[start:stop:step]
        return self._like(v, out)

    def visit_sample(self, nid: str, node: PlanNode) -> _Value:
        v = self._rows(self._get(node.args["input"]))
        a = node.args
        return self._like(v, self._data(v).sample(n=a["n"], frac=a["frac"], random_state=a["seed"]))

    def visit_reset_index(self, nid: str, node: PlanNode) -> _Value:
        v = self._rows(self._get(node.args["input"]))
        data = self._data(v)
        origin = _rows_origin(len(data), ((v.origin, _positions(data.index)),))
        out = data.reset_index(drop=True)
        return _FrameV(out, origin) if isinstance(out, pd.DataFrame) else _SeriesV(out, origin)

    def visit_concat(self, nid: str, node: PlanNode) -> _Value:
        left, right = self._frame(node.args["left"]), self._frame(node.args["right"])
        nl, nr = len(left.df), len(right.df)
        lpos = np.concatenate([_positions(left.df.index), np.full(nr, -1, dtype=np.int64)])
        rpos = np.concatenate([np.full(nl, -1, dtype=np.int64), _positions(right.df.index)])
        out = pd.concat([left.df, right.df], ignore_index=True)
        return _FrameV(out, _rows_origin(len(out), ((left.origin, lpos), (right.origin, rpos))))

    def visit_top(self, nid: str, node: PlanNode) -> _Value:
        v = self._rows(self._get(node.args["input"]))
        a = node.args
        fn = "nlargest" if a["largest"] else "nsmallest"
        if isinstance(v, _FrameV):
            return self._like(v, getattr(v.df, fn)(a["n"], list(a["columns"]), keep=a["keep"]))
        return self._like(v, getattr(v.s, fn)(a["n"], keep=a["keep"]))

    def visit_melt(self, nid: str, node: PlanNode) -> _Value:
        v = self._frame(node.args["input"])
        a = node.args
        out = v.df.melt(
            id_vars=list(a["id_vars"]), value_vars=list(a["value_vars"]), var_name=a["var_name"],
            value_name=a["value_name"],
        )  # fmt: skip
        pos = np.tile(_positions(v.df.index), len(a["value_vars"]))  # row i of the result comes from this row
        return _FrameV(out, _rows_origin(len(out), ((v.origin, pos),)))

    def visit_frame_reduce(self, nid: str, node: PlanNode) -> _Value:
        v = self._frame(node.args["input"])
        func = node.args["func"]
        value = getattr(v.df, func)()
        pos = _positions(v.df.index)
        origin = _Origin("summary", 1)
        if not (v.origin.rows or v.origin.members):
            return _SeriesV(value, origin, entry_cells={})
        zeros = np.zeros(len(pos), dtype=np.int64)
        origin.members = _membership(v.origin, pos, zeros, None, self.n_src)
        origin.dup = dict(v.origin.dup)
        entries: dict[str, Cells] = {}
        for c in v.df.columns:
            col = v.df[c]
            notna = col.notna().to_numpy()
            if func in ("sum", "mean") and col.dtype.kind == "b":
                truth = col.to_numpy(dtype=bool, na_value=False)
                t = _counts(_membership(v.origin, pos, zeros, notna & truth, self.n_src), 1)
                f = _counts(_membership(v.origin, pos, zeros, notna & ~truth, self.n_src), 1)
                entries[str(c)] = {ds: np.minimum(t[ds], f[ds]) for ds in t}
            else:
                entries[str(c)] = _counts(_membership(v.origin, pos, zeros, notna, self.n_src), 1)
        return _SeriesV(value, origin, entry_cells=entries)


def _rows_origin(n: int, sides: Any) -> _Origin:
    """A new row origin whose row i comes from position ``pos[i]`` (-1: none) of each side's origin."""
    origin = _Origin("rows", n)
    for side, pos in sides:
        for ds, arrays in side.rows.items():
            origin.rows.setdefault(ds, []).extend(_compose(arr, pos) for arr in arrays)
    for ds, arrays in origin.rows.items():
        if len(arrays) > 1:
            origin.dup[ds] = True
            continue
        src = arrays[0]
        assert src is not None
        valid = src[src >= 0]
        origin.dup[ds] = bool(len(valid)) and int(np.bincount(valid, minlength=1).max()) > 1
    return origin


_DT_FIELDS = {
    "dt_year": "year", "dt_month": "month", "dt_day": "day", "dt_hour": "hour", "dt_minute": "minute",
    "dt_second": "second", "dt_dayofweek": "day_of_week", "dt_quarter": "quarter", "dt_dayofyear": "day_of_year",
    "dt_date": "date",
}  # fmt: skip


def _map_series(s: pd.Series, func: str, args: tuple[Any, ...]) -> pd.Series:
    """Apply one elementwise function (a ``map`` node); literal patterns only, never a regex."""
    if func == "isna":
        return s.isna()
    if func == "notna":
        return s.notna()
    if func.startswith("str_"):
        name = func[4:]
        if name == "contains":
            return s.str.contains(args[0], case=args[1], regex=False)
        if name == "replace":
            return s.str.replace(args[0], args[1], regex=False)
        if name == "slice":
            return s.str.slice(*args)
        out: pd.Series = getattr(s.str, name)(*args)
        return out
    if func in _DT_FIELDS:
        out = getattr(s.dt, _DT_FIELDS[func])
        return out
    if func in ("dt_floor", "dt_ceil", "dt_round"):
        out = getattr(s.dt, func[3:])(args[0])
        return out
    if func == "clip":
        return s.clip(args[0], args[1])
    if func == "round":
        return s.round(args[0])
    if func == "map_dict":
        return s.map(dict(zip(args[0::2], args[1::2], strict=True)))
    if func == "replace":
        return s.replace(dict(zip(args[0::2], args[1::2], strict=True)))
    if func == "cut":
        n = args[0]
        labels: Any = list(args[1 + n :]) or False
        return pd.Series(pd.cut(s, list(args[1 : 1 + n]), labels=labels), index=s.index, name=s.name)
    raise AssertionError(func)  # pragma: no cover - the plan's enum keeps these in step


def _window_series(s: pd.Series, func: str, args: tuple[Any, ...]) -> pd.Series:
    """Apply one function that mixes values across rows (a ``window`` node)."""
    if func in ("shift", "diff"):
        out: pd.Series = getattr(s, func)(args[0])
        return out
    if func == "rank":
        return s.rank(method=args[0], ascending=args[1])
    if func == "duplicated":
        return s.duplicated(keep=False if args[0] == "none" else args[0])
    out = getattr(s, func)()
    return out


def _pandas_func(func: str) -> Any:
    if func in QUANTILE_FUNCS:
        q = int(func[1:]) / 100
        return lambda s: s.quantile(q)
    return func


def _codes(ngroup: pd.Series) -> IntArray:
    arr = ngroup.to_numpy()
    if arr.dtype.kind == "f":
        return np.asarray(np.nan_to_num(arr, nan=-1.0), dtype=np.int64)
    return np.asarray(arr, dtype=np.int64)


# ---------------------------------------------------------------------------
# Rules for analysts in both modes, and the DP mode's plan shape


def _budget_arg(value: float | None, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
        msg = f"{what} must be a finite number >= 0, not {value!r}"
        raise MalformedFrame(msg)
    if what == "epsilon" and value == 0:
        msg = "epsilon must be > 0"
        raise MalformedFrame(msg)
    return float(value)


def _refuse_hidden_merge_keys(plan: Plan, schemas: Mapping[str, Schema], protected: Mapping[str, DataPolicy]) -> None:
    """No analyst merges on a hidden column: a guess table (or a dictionary) would recover its values."""
    if not protected:
        return
    for nid in plan.order():
        node = plan.nodes[nid]
        if node.op != "merge":
            continue
        for side, keys in (("left", node.args["left_on"]), ("right", node.args["right_on"])):
            hidden = [k for k in keys if k in schemas[node.args[side].target].hidden]
            if hidden:
                msg = (
                    f"merge() on hidden column(s) {hidden} is refused: joining a table of guesses against a hidden "
                    "column recovers its values. For a private join use PSI's join mode (session.psi), which "
                    "releases only what every party agreed to"
                )
                raise PolicyViolation(msg, rule="hidden_columns", column=hidden[0])


_RECORD_FUNCS = frozenset({"min", "max", "median", "any", "all", "first", "last"}) | QUANTILE_FUNCS


def _row_revealing(node: PlanNode) -> str | None:
    """The name of what ``node`` does if it reveals single records (or where they are), else None."""
    if node.op in ROW_REVEALING_OPS:
        return str(node.args["func"])
    if node.op == "reduce" and node.args["func"] in ROW_REVEALING_FUNCS:
        return str(node.args["func"])
    return None


def _refuse_row_revealing(plan: Plan, schemas: Mapping[str, Schema], protected: Mapping[str, DataPolicy]) -> None:
    """Window functions (cumsum, shift, diff, rank, ffill ...), unique/mode and idxmax/idxmin need allow_rows.

    A window mixes values across rows, so an aggregate of it is not bounded by its group's row
    count (a group's sum of ``diff()`` telescopes to two records' values); unique and mode list
    record values; idxmax/idxmin say which record holds the extreme. None of them is released
    for an analyst of a dataset whose owner does not release rows anyway.
    """
    closed = {n for n, pol in protected.items() if not pol.allow_rows and pol.privacy is None}  # DP: its own rules
    if not closed:
        return
    for nid in plan.order():
        what = _row_revealing(plan.nodes[nid])
        touched = sorted(schemas[nid].datasets & closed)
        if what is not None and touched:
            msg = (
                f"{what}() of dataset {touched[0]!r} is refused: it reveals single records (or where they are), "
                "and the owner does not allow row-level results (allow_rows=False). Use aggregates such as "
                "groupby().agg(), value_counts(), mean() or sum()"
            )
            raise PolicyViolation(msg, dataset=touched[0], rule="allow_rows")


_DP_UNSUPPORTED = {
    "frame_reduce": "a frame-level reduction (reduce one column at a time)",
    "concat": "concat()",
    # which rows these keep depends on other records (the top n, a position, a fixed-size sample), so one
    # record's presence can swap another in or out: more than the one contribution the noise is scaled to
    "top": "nlargest()/nsmallest()",
    "slice": "loc[a:b]/iloc[a:b]",
    "sample": "sample()",
    "melt": "melt()",  # one record becomes several rows: more than one contribution
}


def _refuse_dp_unsupported(plan: Plan, name: str) -> None:
    """The DP evaluator has no mechanism for these: refuse them rather than release them un-noised."""
    for nid in plan.order():
        node = plan.nodes[nid]
        what = _row_revealing(node)
        if what is not None:
            msg = (
                f"{what}() is not available in DP mode (dataset {name!r}): it mixes or reveals single records, "
                "so no noise calibrated to one record's contribution covers it"
            )
            raise PolicyViolation(msg, dataset=name, rule="dp")
        if node.op in _DP_UNSUPPORTED:
            msg = (
                f"{_DP_UNSUPPORTED[node.op]} is not available in DP mode (dataset {name!r}); use groupby().agg(), "
                "value_counts(), len(), or a series' sum/mean/count/var/std/median/quantile"
            )
            raise PolicyViolation(msg, dataset=name, rule="dp")


def _refuse_record_values(plan: Plan, schemas: Mapping[str, Schema], protected: Mapping[str, DataPolicy]) -> None:
    """Threshold mode: no min, max, quantile or describe for analysts (each is one record's exact value).

    Only for datasets whose owner does not release rows anyway (``allow_rows=False``).
    """
    closed = {n for n, pol in protected.items() if not pol.allow_rows}
    if not closed:
        return
    for nid in plan.order():
        node = plan.nodes[nid]
        touched = sorted(schemas[nid].datasets & closed)
        if not touched:
            continue
        funcs: list[str] = []
        if node.op == "reduce":
            funcs = [node.args["func"]]
        elif node.op == "groupby_agg":
            funcs = [f for _, _, f in node.args["aggs"]]
        elif node.op == "describe":
            funcs = ["describe"]
        elif node.op == "frame_reduce":
            funcs = [node.args["func"]]
        bad = sorted({f for f in funcs if f in _RECORD_FUNCS or f == "describe"})
        if bad:
            msg = (
                f"{', '.join(bad)} of dataset {touched[0]!r} is refused: in the threshold mode it returns one "
                "record's exact value. Use mean, std, count or sum, or ask the owner for the DP mode "
                "(DataPolicy(privacy=mn.DP(...))), which releases noisy quantiles"
            )
            raise PolicyViolation(msg, dataset=touched[0], rule="record_values")


@dataclass(frozen=True, slots=True)
class _DPSpec:
    """The one aggregate a DP query releases."""

    op: str
    input_id: str
    by: tuple[str, ...]
    aggs: tuple[tuple[str, str | None, str], ...]
    select: bool
    series_name: str
    post: tuple[str, ...]  # select/column nodes applied to the aggregate, root last
    args: Mapping[str, Any]


_DP_OPS = ("groupby_agg", "reduce", "count_rows", "value_counts")


def _dp_spec(plan: Plan, schemas: Mapping[str, Schema], name: str, priv: DP) -> _DPSpec:
    post: list[str] = []
    nid = plan.root
    while plan.nodes[nid].op in ("select", "column") and schemas[nid].level == "groups":
        post.append(nid)
        nid = plan.nodes[nid].args["input"].target
    node = plan.nodes[nid]
    if schemas[nid].level == "rows":
        msg = f"dataset {name!r} is in DP mode: row-level results are never released; aggregate instead"
        raise PolicyViolation(msg, dataset=name, rule="dp")
    if node.op not in _DP_OPS and schemas[nid].level == "groups":
        msg = (
            f"{node.op}() of an aggregate is not evaluated in DP mode (dataset {name!r}): collect the aggregate and "
            "post-process the noisy result locally (post-processing costs no budget)"
        )
        raise PolicyViolation(msg, dataset=name, rule="dp")
    if node.op not in _DP_OPS:
        msg = (
            f"{node.op}() is not available in DP mode (dataset {name!r}); use groupby().agg(), value_counts(), "
            "len(), or a series' sum/mean/count/var/std/median/quantile"
        )
        raise PolicyViolation(msg, dataset=name, rule="dp")
    for other in plan.order():
        if other != nid and other not in post and schemas[other].level != "rows":
            msg = (
                "a DP query releases one aggregate computed directly from rows; collect it and post-process "
                "the noisy result locally (post-processing costs no budget)"
            )
            raise PolicyViolation(msg, dataset=name, rule="dp")
    a = node.args
    input_id = a["input"].target
    inp = schemas[input_id]
    series_name = str(inp.columns[0][0]) if inp.kind == "series" and inp.columns[0][0] is not None else "value"
    if node.op == "groupby_agg":
        by: tuple[str, ...] = tuple(a["by"])
        aggs: tuple[tuple[str, str | None, str], ...] = tuple((o, c, f) for o, c, f in a["aggs"])
    elif node.op == "value_counts":
        if a["normalize"]:
            msg = "value_counts(normalize=True) is not available in DP mode; divide the noisy counts locally"
            raise PolicyViolation(msg, dataset=name, rule="dp")
        by = tuple(a["subset"]) if inp.kind == "frame" else (series_name,)
        aggs = (("count", None, "size"),)
    elif node.op == "reduce":
        by, aggs = (), (("value", series_name, a["func"]),)
    else:
        by, aggs = (), (("value", None, "size"),)
    dtypes = dict(inp.columns) if inp.kind == "frame" else {series_name: inp.columns[0][1]}
    for _, col, func in aggs:
        if func not in DP_FUNCS:
            msg = (
                f"{func} is not released in DP mode (dataset {name!r}): min, max and nunique are one record's value "
                "or have no bounded sensitivity; use a quantile (p1, p99, median) or count"
            )
            raise PolicyViolation(msg, dataset=name, rule="dp")
        if func in ("size", "count"):
            continue
        dtype = dtypes.get(col or "", "")
        if dtype_kind(dtype) == "bool":
            continue
        if col not in priv.bounds:
            what = f"column {col!r}" if node.op != "reduce" or inp.columns[0][0] is not None else "this expression"
            msg = (
                f"{func} of {what} needs bounds, and the owner of DP dataset {name!r} declared bounds only for "
                f"{sorted(priv.bounds) or 'no column'}; values are clamped to a column's bounds before they count"
            )
            raise PolicyViolation(msg, dataset=name, rule="dp_bounds")
    select = bool(by) and not all(b in priv.public_groups for b in by)
    return _DPSpec(node.op, input_id, by, aggs, select, series_name, tuple(reversed(post)), a)


def _dp_groups(data: pd.DataFrame, spec: _DPSpec, priv: DP) -> tuple[IntArray, int, pd.Index | None]:
    n = len(data)
    if not spec.by:
        return np.zeros(n, dtype=np.int64), 1, None
    if not spec.select:  # public keys: exactly the declared ones, in declared order
        codes = np.zeros(n, dtype=np.int64)
        levels = []
        for b in spec.by:
            values = pd.Index(list(priv.public_groups[b]), name=b)
            seen, uniques = pd.factorize(data[b])  # hash the column once; map its few distinct values
            lut = np.append(np.asarray(values.get_indexer(pd.Index(uniques)), dtype=np.int64), -1)
            idx = lut[seen]  # factorize's -1 (missing) picks the appended -1
            codes = idx if len(spec.by) == 1 else np.where((codes < 0) | (idx < 0), -1, codes * len(values) + idx)
            levels.append(values)
        keys = levels[0] if len(levels) == 1 else pd.MultiIndex.from_product(levels)
        return codes, len(keys), keys
    dropna = bool(spec.args.get("dropna", True))
    sort = bool(spec.args.get("sort", True))
    if len(spec.by) == 1:  # one key: a single hash pass; sort the few distinct keys, not the rows
        seen, uniques = pd.factorize(data[spec.by[0]], use_na_sentinel=dropna)
        keys = pd.Index(uniques, name=spec.by[0])
        codes = np.asarray(seen, dtype=np.int64)
        if sort and len(keys) > 1:
            order = np.asarray(keys.argsort(), dtype=np.int64)  # missing keys (dropna=False) sort last
            rank = np.empty(len(order) + 1, dtype=np.int64)
            rank[order] = np.arange(len(order))
            rank[-1] = -1  # factorize's -1 stays -1
            codes, keys = rank[codes], keys.take(order)
        return codes, len(keys), keys
    by: Any = list(spec.by)
    gb = data.groupby(by, sort=sort, dropna=dropna)
    keys = gb.size().index
    return _codes(gb.ngroup()), len(keys), keys


def _dp_shape(
    agg: Aggregated, keys: pd.Index | None, spec: _DPSpec, plan: Plan, schemas: Mapping[str, Schema]
) -> tuple[Any, Any]:
    cols = agg.columns
    if keys is None:
        rel = cols[next(iter(cols))]
        v = rel.values[0].item()
        return v, float(rel.accuracy[0])
    idx = keys.take(agg.keep) if len(agg.keep) != len(keys) else keys
    if spec.op == "value_counts":
        rel = cols["count"]
        counts = pd.Series(rel.values, index=idx, name="count")
        counts_acc = pd.Series(rel.accuracy, index=idx, name="count")
        if spec.args["sort"]:
            order = np.argsort(counts.to_numpy(), kind="stable")
            order = order if spec.args["ascending"] else order[::-1]
            counts, counts_acc = counts.iloc[order], counts_acc.iloc[order]
        return counts, counts_acc
    table = pd.DataFrame({out: rel.values for out, rel in cols.items()}, index=idx)
    table_acc = pd.DataFrame({out: rel.accuracy for out, rel in cols.items()}, index=idx)
    if not spec.args["as_index"]:
        table, table_acc = table.reset_index(), table_acc.reset_index()
    result: Any = table
    accuracy: Any = table_acc
    for nid in spec.post:
        node = plan.nodes[nid]
        if node.op == "select":
            result, accuracy = result[list(node.args["columns"])], accuracy[list(node.args["columns"])]
        else:
            result, accuracy = result[node.args["name"]], accuracy[node.args["name"]]
    return result, accuracy
