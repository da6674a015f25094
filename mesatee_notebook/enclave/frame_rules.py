"""The owners' policy rules a plan is checked against before evaluation, and the DP mode's query shape."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from mesatee_notebook.enclave.dp import (
    DP_FUNCS,
    Aggregated,
)
from mesatee_notebook.enclave.frame_values import (
    IntArray,
    _codes,
)
from mesatee_notebook.errors import (
    MalformedFrame,
    PolicyViolation,
)
from mesatee_notebook.wire.datapolicy import DP, DataPolicy
from mesatee_notebook.wire.ops import (
    Describe,
    Distinct,
    FrameReduce,
    GroupByAgg,
    GroupMap,
    GroupWindow,
    Merge,
    ModeFrame,
    Op,
    Reduce,
    Window,
)
from mesatee_notebook.wire.plan import (
    QUANTILE_FUNCS,
    ROW_REVEALING_FUNCS,
    ROW_REVEALING_OPS,
    Plan,
    Schema,
    dtype_kind,
)

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
        if not isinstance(node, Merge):
            continue
        for side, keys in ((node.left, node.left_on), (node.right, node.right_on)):
            hidden = [k for k in keys if k in schemas[side].hidden]
            if hidden:
                msg = (
                    f"merge() on hidden column(s) {hidden} is refused: joining a table of guesses against a hidden "
                    "column recovers its values. For a private join use PSI's join mode (session.psi), which "
                    "releases only what every party agreed to"
                )
                raise PolicyViolation(msg, rule="hidden_columns", column=hidden[0])


_RECORD_FUNCS = frozenset({"min", "max", "median", "any", "all", "first", "last"}) | QUANTILE_FUNCS


def _row_revealing(node: Op) -> str | None:
    """The name of what ``node`` does if it reveals single records (or where they are), else None."""
    what: str | None = None
    if isinstance(node, (Window, Distinct)) and node.op in ROW_REVEALING_OPS:
        what = node.func
    elif isinstance(node, GroupWindow):  # a window within each group
        what = f"groupby().{node.func}"
    elif isinstance(node, ModeFrame):  # every column's most common values
        what = "mode"
    elif isinstance(node, (Reduce, FrameReduce)) and node.func in ROW_REVEALING_FUNCS:
        what = node.func
    elif isinstance(node, GroupByAgg):  # idxmax/idxmin per group: where a record is
        found = [f for _, _, f in node.aggs if f in ROW_REVEALING_FUNCS]
        what = f"groupby().{found[0]}" if found else None
    elif isinstance(node, GroupMap):  # a row's rank in its group, or its group's value on every row
        what = f"groupby().{'cumcount' if node.func.startswith('cumcount') else 'transform'}"
    return what


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
    "corr_matrix": "a frame-level corr()/cov() (no DP mechanism for correlations)",
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


def _funcs_of(node: Op) -> list[str]:
    """The aggregation functions a node applies (``describe`` for a describe)."""
    if isinstance(node, (Reduce, FrameReduce)):
        return [node.func]
    if isinstance(node, GroupByAgg):
        return [f for _, _, f in node.aggs]
    return ["describe"] if isinstance(node, Describe) else []


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
        bad = sorted({f for f in _funcs_of(node) if f in _RECORD_FUNCS or f == "describe"})
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
_Aggs = tuple[tuple[str, str | None, str], ...]


def _dp_node(plan: Plan, schemas: Mapping[str, Schema], name: str) -> tuple[str, list[str]]:
    """The one aggregate node a DP query releases, and the select/column nodes applied to it (root first)."""
    post: list[str] = []
    nid = plan.root
    while plan.nodes[nid].op in ("select", "column") and schemas[nid].level == "groups":
        post.append(nid)
        nid = plan.nodes[nid].args["input"]
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
    return nid, post


def _dp_aggs(node: Op, inp: Schema, series_name: str, name: str) -> tuple[tuple[str, ...], _Aggs]:
    """The group keys and (output, column, func) aggregations of a DP aggregate node."""
    a = node.args
    if node.op == "groupby_agg":
        return tuple(a["by"]), tuple((o, c, f) for o, c, f in a["aggs"])
    if node.op == "value_counts":
        if a["normalize"]:
            msg = "value_counts(normalize=True) is not available in DP mode; divide the noisy counts locally"
            raise PolicyViolation(msg, dataset=name, rule="dp")
        return (tuple(a["subset"]) if inp.kind == "frame" else (series_name,)), (("count", None, "size"),)
    if node.op == "reduce":
        return (), (("value", series_name, a["func"]),)
    return (), (("value", None, "size"),)


def _dp_check_funcs(node: Op, inp: Schema, aggs: _Aggs, series_name: str, name: str, priv: DP) -> None:
    """Every DP aggregation has a mechanism, and every clamped column has the owner's bounds."""
    dtypes = dict(inp.columns) if inp.kind == "frame" else {series_name: inp.columns[0][1]}
    for _, col, func in aggs:
        if func not in DP_FUNCS:
            msg = (
                f"{func} is not released in DP mode (dataset {name!r}): min, max and nunique are one record's value "
                "or have no bounded sensitivity; use a quantile (p1, p99, median) or count"
            )
            raise PolicyViolation(msg, dataset=name, rule="dp")
        if func in ("size", "count") or dtype_kind(dtypes.get(col or "", "")) == "bool":
            continue
        if col not in priv.bounds:
            what = f"column {col!r}" if node.op != "reduce" or inp.columns[0][0] is not None else "this expression"
            msg = (
                f"{func} of {what} needs bounds, and the owner of DP dataset {name!r} declared bounds only for "
                f"{sorted(priv.bounds) or 'no column'}; values are clamped to a column's bounds before they count"
            )
            raise PolicyViolation(msg, dataset=name, rule="dp_bounds")


def _dp_spec(plan: Plan, schemas: Mapping[str, Schema], name: str, priv: DP) -> _DPSpec:
    nid, post = _dp_node(plan, schemas, name)
    node = plan.nodes[nid]
    input_id = node.args["input"]
    inp = schemas[input_id]
    series_name = str(inp.columns[0][0]) if inp.kind == "series" and inp.columns[0][0] is not None else "value"
    by, aggs = _dp_aggs(node, inp, series_name, name)
    _dp_check_funcs(node, inp, aggs, series_name, name, priv)
    select = bool(by) and not all(b in priv.public_groups for b in by)
    return _DPSpec(node.op, input_id, by, aggs, select, series_name, tuple(reversed(post)), node.args)


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
    # Keys in key order, whatever ``sort`` says: the order they first occur in is the rows' (one record moves it).
    sort = True
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


def _released_categories(value: Any) -> Any:
    """``value`` with only the categories (and MultiIndex level values) that its released rows hold.

    pandas keeps every category of a key in a group-by's result, and every level value in a MultiIndex after
    rows are taken from it, so a suppressed (or not selected) group's key would leave with the released ones:
    whether a record with that value exists. Arrow carries a categorical's whole dictionary to the client.
    """
    if not isinstance(value, (pd.DataFrame, pd.Series)):
        return value
    if isinstance(value, pd.DataFrame):
        cats = [i for i, dt in enumerate(value.dtypes) if isinstance(dt, pd.CategoricalDtype)]
        if cats:
            value = value.copy()
            for i in cats:
                value.isetitem(i, value.iloc[:, i].cat.remove_unused_categories())
    elif isinstance(value.dtype, pd.CategoricalDtype):
        value = value.cat.remove_unused_categories()
    return value.set_axis(_released_index(value.index), axis=0)


def _released_index(index: pd.Index) -> pd.Index:
    if isinstance(index, pd.CategoricalIndex):
        return index.remove_unused_categories()
    if isinstance(index, pd.MultiIndex):
        index = index.remove_unused_levels()
        levels: list[Any] = [
            lv.remove_unused_categories() if isinstance(lv, pd.CategoricalIndex) else lv for lv in index.levels
        ]
        return index.set_levels(levels, verify_integrity=False)
    return index
