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

Why this module is over ~500 lines: the evaluator's entry point and the release rules around it; just over.
"""

from __future__ import annotations

import hashlib
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from mesatee_notebook.enclave.dp import (
    BudgetLedger,
    LedgerStore,
    MemoryLedgerStore,
    bound_contributions,
    dp_aggregate,
)
from mesatee_notebook.enclave.frame_eval import (
    _plain,
    _Run,
)
from mesatee_notebook.enclave.frame_guard import (
    GuardStore,
    _DifferencingGuard,
)
from mesatee_notebook.enclave.frame_rules import (
    _budget_arg,
    _dp_groups,
    _dp_shape,
    _dp_spec,
    _refuse_dp_unsupported,
    _refuse_hidden_merge_keys,
    _refuse_record_values,
    _refuse_row_revealing,
    _released_categories,
)
from mesatee_notebook.enclave.frame_values import (
    Cells,
    _compose,
    _FrameV,
    _positions,
    _renumber,
    _ScalarV,
    _SeriesV,
    _Value,
)
from mesatee_notebook.errors import (
    MesateeError,
    NotFound,
    PolicyViolation,
    RemoteExecutionError,
)
from mesatee_notebook.wire.datapolicy import DataPolicy
from mesatee_notebook.wire.plan import (
    Plan,
    Schema,
    SourceInfo,
    infer_plan,
    plan_from_json,
    source_columns,
)

__all__ = ["AuditHook", "DatasetRegistry", "FrameEvaluator", "FrameResult"]

DatasetRegistry = Mapping[str, tuple[pd.DataFrame, DataPolicy, str]]
AuditHook = Callable[[dict[str, Any]], None]
IntArray = npt.NDArray[np.int64]


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
        # (party, dataset, unit) -> (the frame, weakly: an evicted one is freed, whether its units are unique); per
        # party like the worker's dataset cache, so another party's query neither warms nor evicts it for the caller
        self._unique_units: dict[tuple[str, str, str], tuple[weakref.ref[pd.DataFrame], bool]] = {}

    # -- public -----------------------------------------------------------

    def forget_party(self, party: str) -> None:
        """Re-read ``party``'s differencing history from the guard store on its next query.

        A kernel with several service workers calls this when a party's previous query ran in another worker.
        """
        with self._guard_lock:
            self._guard.forget(party)

    def dataset_info(self, name: str, party: str) -> dict[str, Any]:
        """Return the public schema of a dataset as ``party`` sees it (hidden columns listed, not shown)."""
        df, policy, owner = self._meta_lookup(name)
        return {
            "name": name,
            "columns": [list(c) for c in source_columns(df.dtypes.items())],
            "hidden": [] if party == owner else list(policy.hidden_columns),
            "policy": policy.to_dict(),
            "owner": owner,
        }

    def privacy_budget(self, name: str, party: str) -> dict[str, Any] | None:
        """The DP budget ``party`` has spent and has left on dataset ``name`` (None: not a DP dataset)."""
        _, policy, owner = self._meta_lookup(name)
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

    def _meta_lookup(self, name: str) -> tuple[pd.DataFrame, DataPolicy, str]:
        """A frame with the dataset's columns and dtypes (its rows where they are at hand), policy and owner."""
        return self._lookup(name)

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
        if self._static_checks(plan, schemas, protected):
            return self._evaluate_dp(plan, schemas, stored, protected, party, event, digest, epsilon, delta)
        run = _Run(plan, schemas, {n: df for n, (df, _, _) in stored.items()}, set(protected))
        value = run.evaluate()
        released, suppressed = self._release(value, protected, party, run.n_src)
        event.update(outcome="released", suppressed=suppressed)
        if isinstance(released, (pd.DataFrame, pd.Series)):
            event["rows_out"] = len(released)
        return FrameResult(released, digest, tuple(names), root.level, suppressed)

    # -- the DP mode -------------------------------------------------------

    def _units_unique(self, party: str, name: str, df: pd.DataFrame, unit: str) -> bool:
        hit = self._unique_units.get((party, name, unit))
        if hit is None or hit[0]() is not df:
            for key in [k for k, (ref, _) in self._unique_units.items() if ref() is None]:
                del self._unique_units[key]  # their frames are gone
            hit = (weakref.ref(df), bool(df[unit].is_unique))
            self._unique_units[(party, name, unit)] = hit
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
        run = _Run(Plan(spec.input_id, plan.nodes), schemas, frames, set(protected), isolate_rows=True)
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
        if value.origin.dup.get(name, False) or not (
            priv.unit is None or self._units_unique(party, name, source, priv.unit)
        ):
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
        released, accuracy = _released_categories(released), _released_categories(accuracy)
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

    def _static_checks(self, plan: Plan, schemas: Mapping[str, Schema], protected: Mapping[str, DataPolicy]) -> bool:
        """The refusals decided from the plan alone, before anything is evaluated; True: a DP-mode query.

        For every analyst: no merge on a hidden key, no row-revealing op of a dataset that keeps its rows.
        A query over a DP-mode dataset then follows the DP evaluator's own rules (True is returned);
        any other query also may not release one record's value (min, max, quantiles ... of such a dataset),
        nor row-level results the owners do not allow (:meth:`_static_policy`).
        """
        _refuse_hidden_merge_keys(plan, schemas, protected)
        _refuse_row_revealing(plan, schemas, protected)
        if any(pol.privacy is not None for pol in protected.values()):
            return True
        _refuse_record_values(plan, schemas, protected)
        self._static_policy(schemas[plan.root], protected)
        return False

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
            return self._release_scalar(value, protected, party, n_src), 0
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
        data = self._suppress_cells(data.copy() if any(cells.values()) else data, pos, cells, protected)
        members = _renumber(origin.members, pos, origin.n)
        kept = {ds: counts[pos] for ds, counts in origin.sizes.items()}  # = bincount of the renumbered pairs
        self._guard_release(party, protected, members, len(pos), origin.dup, n_src, kept)
        if origin.keys is not None:
            data = data.set_axis(origin.keys.take(pos), axis=0)
        return (_released_categories(data) if protected else data), int(small.sum())

    def _release_scalar(
        self, value: _ScalarV, protected: Mapping[str, DataPolicy], party: str, n_src: Mapping[str, int]
    ) -> Any:
        for ds, count in value.counts.items():
            k = protected[ds].min_group_size
            if count < k:
                msg = (
                    f"the result is computed from fewer than {k} rows of dataset {ds!r} "
                    f"(min_group_size={k}); widen the selection"
                )
                raise PolicyViolation(msg, dataset=ds, rule="min_group_size")
        self._guard_release(party, protected, value.members, 1, value.dup, n_src)
        return _plain(value.value)

    def _suppress_cells(
        self, data: Any, pos: IntArray, cells: Mapping[str, Cells], protected: Mapping[str, DataPolicy]
    ) -> Any:
        """Blank (or refuse) the cells of released groups computed from too few rows."""
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
        return data

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
        sizes: Mapping[str, IntArray] | None = None,
    ) -> None:
        staged = []
        for ds, (g, s) in members.items():
            pol = protected[ds]
            if pol.differencing_guard:
                known = None if sizes is None else sizes.get(ds)
                fp, rel = self._guard.prepare(g, s, n_groups, n_src[ds], dup.get(ds, False), known)
                staged.append(((party, ds), fp, rel, pol.min_group_size))
        with self._guard_lock:
            for key, fp, rel, k in staged:
                self._guard.check(key, fp, rel, k)
            for key, fp, rel, _ in staged:
                self._guard.record(key, fp, rel)
