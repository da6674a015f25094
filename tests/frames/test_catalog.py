"""The one op catalog (wire/ops): both sides use the same typed nodes, the wire format stays, nothing drifts."""

from __future__ import annotations

import inspect
import json
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pytest
from _frames_support import ANALYST, OWNER, POLICY, World, patients

from mesatee_notebook.enclave.frame_eval import _Run
from mesatee_notebook.errors import FrameNotSupported, FrameUsageError, MalformedFrame, PolicyViolation
from mesatee_notebook.remote.frame import SecureDataFrame, SecureGroupBy, SecureSeries
from mesatee_notebook.remote.frame_accessors import _StrMethods
from mesatee_notebook.wire.datapolicy import DataPolicy
from mesatee_notebook.wire.ops import OP_CLASSES, OPS, InferCtx, Op, op
from mesatee_notebook.wire.plan import Plan, plan_from_json, plan_to_json, plan_to_obj

OPEN = DataPolicy(min_group_size=0, allow_rows=True, differencing_guard=False)


def test_every_op_has_one_visitor_and_every_visitor_one_op() -> None:
    visitors = {n[len("visit_") :] for n, _ in inspect.getmembers(_Run) if n.startswith("visit_")}
    classes = {cls.__name__ for cls in OP_CLASSES.values()}
    assert classes - visitors == set(), "ops the enclave cannot evaluate"
    assert visitors - classes == set(), "visitors for no op"
    for name, cls in OP_CLASSES.items():
        assert cls.op == name
        assert cls.infer is not Op.infer, f"{cls.__name__} has no schema rule"
        assert OPS[name] == {s.wire: s.kind for s in cls.SPECS}


def test_registering_an_op_twice_is_refused() -> None:
    with pytest.raises(AssertionError, match="registered twice"):
        op("filter")(type("Again", (Op,), {"__slots__": ()}))


@dataclass(frozen=True, slots=True, eq=False)
class _Unknown(Op):
    """A node class of some newer catalog that this enclave does not know."""

    op: ClassVar[str] = "future_op"
    SPECS: ClassVar[tuple[Any, ...]] = ()

    def infer(self, ctx: InferCtx) -> Any:
        raise NotImplementedError


def test_an_op_without_a_visitor_is_a_typed_error() -> None:
    run = _Run(Plan("n0", {"n0": _Unknown()}), {}, {}, set())
    with pytest.raises(FrameNotSupported, match="not evaluated by this enclave"):
        run.evaluate()
    with pytest.raises(MalformedFrame, match="not an op of the plan format"):
        plan_to_obj("n0", {"n0": _Unknown()})


# A plan written by the version-1 format before the catalog (every argument kind appears once):
# it must still decode, type and re-encode to the same canonical text.
V1_PLAN = {
    "version": 1,
    "root": "n9",
    "nodes": {
        "n0": {"op": "source", "args": {"name": "d"}},
        "n1": {"op": "column", "args": {"input": "n0", "name": "x"}},
        "n2": {"op": "binary", "args": {"op": "gt", "left": {"ref": "n1"}, "right": {"lit": {"$float": "-inf"}}}},
        "n3": {"op": "filter", "args": {"input": "n0", "predicate": "n2"}},
        "n4": {"op": "assign", "args": {"input": "n3", "columns": [["z", {"lit": 1}], ["w", {"ref": "n5"}]]}},
        "n5": {"op": "map", "args": {"input": "n1", "func": "clip", "args": [0, None]}},
        "n6": {"op": "astype", "args": {"input": "n4", "dtype": {"z": "float64"}}},
        "n7": {"op": "rename", "args": {"input": "n6", "columns": {"w": "v"}}},
        "n8": {
            "op": "merge",
            "args": {
                "left": "n7", "right": "n0", "how": "left", "left_on": ["a"], "right_on": ["a"],
                "suffixes": ["_l", "_r"],
            },
        },
        "n9": {
            "op": "groupby_agg",
            "args": {
                "input": "n8", "by": ["a"], "aggs": [["m", "x_l", "mean"], ["n", "x_l", "size"]],
                "as_index": True, "dropna": True, "sort": True,
            },
        },
    },
}  # fmt: skip


def test_a_version_1_plan_still_decodes_types_and_reencodes() -> None:
    text = json.dumps(V1_PLAN, sort_keys=True, separators=(",", ":"))
    plan = plan_from_json(text)
    assert plan_to_json(plan) == text
    assert plan_from_json(text) == plan  # plans compare by content
    assert plan_from_json(text.replace('"mean"', '"sum"')) != plan
    sdf = World({"d": (pd.DataFrame({"a": [1, 2], "x": [0.5, 1.5]}), OPEN, OWNER)}).frame("d", OWNER)
    assert plan.nodes["n5"].args == {"input": "n1", "func": "clip", "args": (0, None)}
    assert sdf.schema.columns == (("a", "int64"), ("x", "float64"))


def test_a_future_plan_version_is_refused_clearly() -> None:
    with pytest.raises(Exception, match="plan version 2 is not supported"):
        plan_from_json(json.dumps({**V1_PLAN, "version": 2}))


def test_client_nodes_are_the_wire_nodes() -> None:
    sdf = World({"d": (patients(50), OPEN, OWNER)}).frame("d", OWNER)
    expr = sdf[sdf.age > 30].groupby("region").weight.mean()
    plan = plan_from_json(expr.plan_json())
    assert {type(n) for n in plan.nodes.values()} <= set(OP_CLASSES.values())
    assert type(expr._node) is OP_CLASSES["column"]
    assert type(expr._node.input) is OP_CLASSES["groupby_agg"]
    assert "groupby(['region']).agg(weight=mean(weight))" in expr.explain()


# -- len(), float(), int(): explicit evaluation; bool(), iteration, arrays: refused ---------------


def _world() -> World:
    return World({"p": (patients(200), POLICY, OWNER)})


def test_len_float_int_are_explicit_evaluations_one_query_each() -> None:
    world = _world()
    backend = world.backend(ANALYST)
    sdf = backend.dataframe("p")
    df = patients(200)
    assert len(sdf) == len(df)
    assert float(sdf.weight.mean()) == pytest.approx(df.weight.mean())
    assert int(sdf.age.sum()) == int(df.age.sum())
    assert len(backend.plans) == 3
    assert json.loads(backend.plans[0])["nodes"][json.loads(backend.plans[0])["root"]]["op"] == "count_rows"
    # and the policy applies to each: a count of two records is refused like any result
    with pytest.raises(PolicyViolation):
        len(sdf[sdf.id < 2])
    with pytest.raises(PolicyViolation):
        float(sdf[sdf.id < 2].weight.mean())


@pytest.mark.parametrize(
    "use",
    [bool, list, np.asarray, lambda v: v and 1, lambda v: [x for x in v]],
    ids=["bool", "list", "asarray", "and", "for"],
)
def test_implicit_conversions_raise_and_send_nothing(use: Any) -> None:
    backend = _world().backend(ANALYST)
    sdf = backend.dataframe("p")
    for value in (sdf, sdf.age, sdf.age.sum()):
        with pytest.raises(FrameUsageError, match="lazy"):
            use(value)
    assert backend.plans == []


def test_len_of_a_scalar_and_float_of_a_series_raise() -> None:
    sdf = _world().frame("p", ANALYST)
    with pytest.raises(FrameUsageError):
        len(sdf.age.sum())
    with pytest.raises(TypeError):
        float(sdf.age)  # type: ignore[arg-type]


# -- the shape-alike wrappers are catalog entries -----------------------------------------------

_ENTRY = re.compile(r"^    (\w+) = _(operator|method_form|reduction|window_fn|str_fn|frame_reduction|group_agg)\(")


@pytest.mark.parametrize("cls", [SecureSeries, SecureDataFrame, SecureGroupBy, _StrMethods])
def test_catalog_entries_are_named_documented_methods(cls: type) -> None:
    source = inspect.getsource(cls)
    names = [m.group(1) for line in source.splitlines() if (m := _ENTRY.match(line))]
    assert names, cls
    for name in names:
        fn = vars(cls)[name]
        assert fn.__name__ == name, (cls, name)
        assert fn.__doc__, (cls, name)


def test_pair_deduplication_is_the_same_with_a_bitmap_or_a_hash(monkeypatch: pytest.MonkeyPatch) -> None:
    from mesatee_notebook.enclave import frame_values

    rng = np.random.default_rng(0)
    g = rng.integers(0, 7, 5000).astype(np.int64)
    s = rng.integers(0, 300, 5000).astype(np.int64)
    want = set(zip(g.tolist(), s.tolist(), strict=True))
    for limit in (1 << 26, 0):  # the bitmap path, then the hash path
        monkeypatch.setattr(frame_values, "_BITMAP_MAX", limit)
        dg, ds = frame_values._dedupe(g, s, 300)
        assert len(dg) == len(want)
        assert set(zip(dg.tolist(), ds.tolist(), strict=True)) == want
    assert len(frame_values._dedupe(g[:0], s[:0], 300)[0]) == 0
