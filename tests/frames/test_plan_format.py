"""The plan format: Hypothesis round trips, and structural validation of bad plans."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesatee_notebook.errors import FrameTooLarge, MalformedFrame, MesateeError, VersionMismatch
from mesatee_notebook.wire.datapolicy import DataPolicy
from mesatee_notebook.wire.plan import _ENUMS as ENUMS
from mesatee_notebook.wire.plan import (
    AGG_FUNCS,
    DTYPES,
    MAX_PLAN_BYTES,
    OPS,
    plan_from_json,
    plan_from_obj,
    plan_to_json,
)

names = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12)
i64 = st.integers(-(2**63), 2**63 - 1)
timestamps = st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2200, 1, 1)).map(
    lambda d: {"$ts": pd.Timestamp(d).isoformat()}
)
literals = st.one_of(
    st.none(),
    st.booleans(),
    i64,
    st.floats(allow_nan=False, allow_infinity=False),
    names,
    st.sampled_from([{"$float": "nan"}, {"$float": "inf"}, {"$float": "-inf"}]),
    timestamps,
)


def arg_strategy(op: str, name: str, kind: str, earlier: list[str]) -> st.SearchStrategy[Any]:
    refs = st.sampled_from(earlier) if earlier else st.nothing()
    operand = st.one_of(refs.map(lambda r: {"ref": r}), literals.map(lambda v: {"lit": v}))
    enum = ENUMS.get((op, name))
    return {
        "node": refs,
        "operand": operand,
        "str": st.sampled_from(sorted(enum)) if enum else names,
        "strs": st.lists(names, max_size=4),
        "int": st.integers(0, 2**63 - 1),
        "bool": st.booleans(),
        "bools": st.lists(st.booleans(), max_size=4),
        "literal": literals,
        "literals": st.lists(literals, max_size=5),
        "dtype_spec": st.one_of(
            st.sampled_from(sorted(DTYPES)), st.dictionaries(names, st.sampled_from(sorted(DTYPES)), max_size=3)
        ),
        "rename_map": st.dictionaries(names, names, max_size=3),
        "suffixes": st.tuples(names, names).map(list),
        "aggs": st.lists(st.tuples(names, names, st.sampled_from(sorted(AGG_FUNCS))).map(list), min_size=1, max_size=3),
        "assigns": st.lists(st.tuples(names, operand).map(list), min_size=1, max_size=3),
    }[kind]


def refs_of(node: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for name, kind in OPS[node["op"]].items():
        value = node["args"][name]
        if kind == "node":
            out.append(value)
        elif kind == "operand" and "ref" in value:
            out.append(value["ref"])
        elif kind == "assigns":
            out.extend(v["ref"] for _, v in value if "ref" in v)
    return out


@st.composite
def plan_objects(draw: st.DrawFn) -> dict[str, Any]:
    """A random, structurally valid plan: a DAG over every op, pruned to what the root reaches."""
    ids: list[str] = []
    nodes: dict[str, Any] = {}
    for i in range(draw(st.integers(1, 8))):
        usable = [
            op for op, spec in OPS.items() if ids or ("node" not in spec.values() and "assigns" not in spec.values())
        ]
        op = draw(st.sampled_from(usable))
        args = {name: draw(arg_strategy(op, name, kind, ids)) for name, kind in OPS[op].items()}
        nid = draw(st.sampled_from([f"n{i}", f"node-{i}", f"{i}"]))
        if nid in nodes:
            nid = f"x{i}"
        nodes[nid] = {"op": op, "args": args}
        ids.append(nid)
    root = ids[-1]
    reach, stack = set(), [root]
    while stack:
        cur = stack.pop()
        if cur not in reach:
            reach.add(cur)
            stack.extend(refs_of(nodes[cur]))
    kept = {k: v for k, v in nodes.items() if k in reach}
    return {"version": 1, "root": root, "nodes": kept}


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(plan_objects())
def test_plan_round_trip(obj: dict[str, Any]) -> None:
    plan = plan_from_obj(obj)
    text = plan_to_json(plan)
    assert json.loads(text) == obj
    again = plan_from_json(text)
    assert plan_to_json(again) == text
    assert again.root == plan.root
    assert set(again.nodes) == set(plan.nodes)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=12,
)


@settings(max_examples=300)
@given(
    st.fixed_dictionaries({"version": st.sampled_from([1, 1, 2]), "root": st.text(max_size=3), "nodes": json_values})
)
def test_arbitrary_json_is_refused_with_typed_errors(obj: dict[str, Any]) -> None:
    with pytest.raises(MesateeError):
        plan_from_json(json.dumps(obj))


SOURCE = {"op": "source", "args": {"name": "p"}}


def plan(nodes: dict[str, Any], root: str = "n1", version: Any = 1) -> str:
    return json.dumps({"version": version, "root": root, "nodes": nodes})


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (plan({"n1": {"op": "drop_table", "args": {}}}), "unknown plan op"),
        (plan({"n0": SOURCE, "n1": {"op": "head", "args": {"input": "n0", "n": "5"}}}), "non-negative int64"),
        (plan({"n0": SOURCE, "n1": {"op": "head", "args": {"input": "n0", "n": -1}}}), "non-negative int64"),
        (plan({"n0": SOURCE, "n1": {"op": "head", "args": {"input": "n0", "n": True}}}), "non-negative int64"),
        (plan({"n0": SOURCE, "n1": {"op": "head", "args": {"input": "n9", "n": 5}}}), "unknown node"),
        (plan({"n0": SOURCE, "n1": {"op": "head", "args": {"input": "n0"}}}), "exactly the arguments"),
        (plan({"n0": SOURCE, "n1": {"op": "head", "args": {"input": "n0", "n": 1, "x": 1}}}), "exactly the arguments"),
        (plan({"n0": SOURCE, "n1": {"op": "head", "args": {"input": "n1", "n": 1}}}), "cycle"),
        (
            plan(
                {
                    "n0": {"op": "head", "args": {"input": "n1", "n": 1}},
                    "n1": {"op": "head", "args": {"input": "n0", "n": 1}},
                }
            ),
            "cycle",
        ),
        (plan({"n0": SOURCE, "n1": SOURCE}), "does not use"),
        (plan({"n0": SOURCE}, root="n7"), "root"),
        (plan({"n1": {"op": "source", "args": {"name": 3}}}), "a string"),
        (plan({"n1": {"op": "source", "args": {"name": "\x00x"}}}), "NUL"),
        (
            plan(
                {
                    "n0": SOURCE,
                    "n1": {"op": "binary", "args": {"op": "eval", "left": {"ref": "n0"}, "right": {"lit": 1}}},
                }
            ),
            "one of",
        ),
        (
            plan(
                {
                    "n0": SOURCE,
                    "n1": {"op": "binary", "args": {"op": "add", "left": {"ref": "n0"}, "right": {"lit": [1]}}},
                }
            ),
            "scalar",
        ),
        (
            plan(
                {
                    "n0": SOURCE,
                    "n1": {"op": "binary", "args": {"op": "add", "left": {"ref": "n0"}, "right": {"lit": 2**70}}},
                }
            ),
            "int64",
        ),
        (plan({"n0": SOURCE, "n1": {"op": "binary", "args": {"op": "add", "left": {"ref": "n0"}, "right": 3}}}), "ref"),
        (
            plan(
                {
                    "n0": SOURCE,
                    "n1": {
                        "op": "binary",
                        "args": {"op": "add", "left": {"ref": "n0"}, "right": {"lit": {"$py": "os"}}},
                    },
                }
            ),
            "tagged",
        ),
        (plan({"n0": SOURCE, "n1": {"op": "astype", "args": {"input": "n0", "dtype": "object"}}}), "not supported"),
        (
            plan(
                {
                    "n0": SOURCE,
                    "n1": {
                        "op": "groupby_agg",
                        "args": {
                            "input": "n0",
                            "by": ["a"],
                            "aggs": [["o", "a", "exec"]],
                            "as_index": True,
                            "dropna": True,
                            "sort": True,
                        },
                    },
                }
            ),
            "unknown aggregation",
        ),
        (
            '{"version": 1, "root": "n1", "nodes": {"n1": {"op": "fillna", "args": {"input": "n1", "value": NaN}}}}',
            "NaN",
        ),
        ('{"version": 1, "version": 1, "root": "n1", "nodes": {}}', "duplicate key"),
        ("not json", "not valid JSON"),
        ("[]", "exactly"),
    ],
)
def test_malformed_plans_are_refused(text: str, fragment: str) -> None:
    with pytest.raises(MalformedFrame, match=fragment):
        plan_from_json(text)


def test_version_mismatch_names_both_versions() -> None:
    with pytest.raises(VersionMismatch, match="version 2"):
        plan_from_json(plan({"n1": SOURCE}, version=2))


def test_oversized_plan_is_refused_before_parsing() -> None:
    with pytest.raises(FrameTooLarge):
        plan_from_json(" " * (MAX_PLAN_BYTES + 1))


def test_plans_are_never_pickle() -> None:
    text = plan_to_json(plan_from_json(plan({"n1": SOURCE})))
    assert text == '{"nodes":{"n1":{"args":{"name":"p"},"op":"source"}},"root":"n1","version":1}'


policies = st.builds(
    DataPolicy,
    min_group_size=st.integers(0, 1000),
    hidden_columns=st.lists(names.filter(bool), unique=True, max_size=4).map(tuple),
    allow_rows=st.booleans(),
    small_group=st.sampled_from(["suppress", "refuse"]),
    code_access=st.lists(names.filter(bool), unique=True, max_size=3).map(tuple),
    differencing_guard=st.booleans(),
)


@given(policies)
def test_datapolicy_round_trip(policy: DataPolicy) -> None:
    assert DataPolicy.from_dict(json.loads(json.dumps(policy.to_dict()))) == policy


@pytest.mark.parametrize(
    "data",
    [
        {"min_group_size": "10"},
        {"min_group_size": -1},
        {"min_group_size": True},
        {"allow_rows": "yes"},
        {"small_group": "ignore"},
        {"hidden_columns": "ssn"},
        {"hidden_columns": ["a", "a"]},
        {"code_access": [1]},
        {"allow_everything": True},
    ],
)
def test_bad_policies_are_refused(data: dict[str, Any]) -> None:
    with pytest.raises(MalformedFrame):
        DataPolicy.from_dict(data)


def test_policy_accepts_lists_and_checks_code_access() -> None:
    policy = DataPolicy(hidden_columns=["ssn"], code_access=["bob"])  # type: ignore[arg-type]
    assert policy.hidden_columns == ("ssn",)
    assert policy.allows_code_access("bob", owner="alice")
    assert policy.allows_code_access("alice", owner="alice")
    assert not policy.allows_code_access("eve", owner="alice")
