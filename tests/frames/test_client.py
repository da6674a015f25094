"""The client wrappers: lazy, immutable, typed early, and never evaluated by accident."""

from __future__ import annotations

import json
import pickle
from typing import Any

import numpy as np
import pytest
from _frames_support import ANALYST, OWNER, POLICY, World, patients

from mesatee_notebook.errors import FrameUsageError, MalformedFrame, MesateeError, NotFound, PolicyViolation
from mesatee_notebook.remote.frame import SecureDataFrame


@pytest.fixture
def sdf(world: World) -> SecureDataFrame:
    return world.frame("patients", ANALYST)


@pytest.mark.parametrize(
    "use",
    [
        lambda s: bool(s),
        lambda s: bool(s.age),
        lambda s: bool(s.age > 3),
        lambda s: bool(s.age.mean()),
        lambda s: bool(s.groupby("region")),
        lambda s: iter(s),
        lambda s: list(s.age),
        lambda s: list(s.groupby("region")),
        lambda s: np.asarray(s.age),
        lambda s: len(s.age.sum()),
        lambda s: s.age if s.age > 40 else None,
        lambda s: s.age > 3 and s.age < 5,
        lambda s: pickle.dumps(s),
    ],
)
def test_truthiness_and_iteration_traps_raise(world: World, sdf: SecureDataFrame, use: Any) -> None:
    with pytest.raises(FrameUsageError) as info:
        use(sdf)
    assert isinstance(info.value, MesateeError)
    assert isinstance(info.value, TypeError)
    assert world.events == []  # nothing was evaluated


def test_usage_error_is_a_leaf_of_the_one_error_tree() -> None:
    from mesatee_notebook import errors
    from mesatee_notebook.remote import frame

    assert frame.FrameUsageError is errors.FrameUsageError  # still importable from where it was
    assert "FrameUsageError (TypeError)" in (errors.__doc__ or "")
    err = errors.error_from_wire(FrameUsageError("lazy").to_wire())
    assert type(err) is FrameUsageError and err.code == "frame.usage"


def test_trap_message_says_why(sdf: SecureDataFrame) -> None:
    with pytest.raises(FrameUsageError, match=r"lazy.*collect\(\)"):
        bool(sdf)


def test_frames_are_immutable(sdf: SecureDataFrame) -> None:
    with pytest.raises(FrameUsageError, match="assign"):
        sdf["x"] = 1
    with pytest.raises(AttributeError):
        sdf.not_a_column  # noqa: B018


def test_len_is_an_explicit_policy_checked_count(world: World, sdf: SecureDataFrame) -> None:
    assert len(sdf) == 400
    assert len(sdf[sdf.age >= 18]) == 400
    assert [e["root_op"] for e in world.events] == ["count_rows", "count_rows"]
    with pytest.raises(PolicyViolation):
        len(sdf[sdf.id < 3])


def test_scalar_conversions_evaluate(sdf: SecureDataFrame) -> None:
    assert float(sdf.age.mean()) == pytest.approx(patients().age.mean())
    assert int(sdf.age.count()) == 400


def test_repr_shows_a_lazy_expression_not_data(sdf: SecureDataFrame) -> None:
    q = sdf[sdf.age > 40].assign(bmi=sdf.weight / (sdf.height**2)).groupby("region").agg(n=("bmi", "size"))
    text = repr(q)
    assert "lazy" in text and "groupby(['region'])" in text and "n  int64" in text.replace("   ", " ")
    assert "source('patients')" in text
    html = q._repr_html_()
    assert "<table>" in html and "lazy" in html
    source_text = repr(sdf)
    assert "(hidden)" in source_text  # ssn is marked
    for value in ("north", "100000007", str(patients().income[0])):
        assert value not in text + html + source_text


def test_repr_html_escapes_names(world: World) -> None:
    sdf = SecureDataFrame.from_source("<b>x</b>", {"<script>": "int64"}, None)
    assert "<script>" not in sdf._repr_html_()


def test_type_errors_surface_when_building(sdf: SecureDataFrame) -> None:
    with pytest.raises(MalformedFrame, match="numeric"):
        _ = sdf.region + 1
    with pytest.raises(MalformedFrame, match="compare"):
        _ = sdf.region < 3
    with pytest.raises(MalformedFrame, match="boolean predicate"):
        _ = sdf[sdf.age]
    with pytest.raises(MalformedFrame, match="mean"):
        sdf.groupby("region").agg(m=("region", "mean"))
    with pytest.raises(NotFound, match="'agee'"):
        sdf.groupby("region").agg(m=("agee", "mean"))
    with pytest.raises(MalformedFrame, match="different frames"):
        agg = sdf.groupby("region").agg(n=("age", "size"))
        _ = agg[sdf.age > 3]
    with pytest.raises(MalformedFrame, match="fillna"):
        sdf.region.fillna(0)
    with pytest.raises(FrameUsageError, match="MultiIndex"):
        sdf.groupby("region").agg({"age": ["mean", "max"]})
    with pytest.raises(MalformedFrame, match="describe"):
        sdf.describe().assign(x=1)


def test_plan_json_has_no_data_and_shares_nodes(sdf: SecureDataFrame) -> None:
    q = sdf[sdf.age > 40][["age", "region"]]
    plan = json.loads(q.plan_json())
    ops = [n["op"] for n in plan["nodes"].values()]
    assert ops.count("source") == 1  # `sdf` appears twice in the expression, once in the plan
    assert sorted(ops) == ["binary", "column", "filter", "select", "source"]


def test_unbound_frame_cannot_collect() -> None:
    sdf = SecureDataFrame.from_source("t", {"a": "int64"}, None)
    with pytest.raises(FrameUsageError, match="not bound"):
        sdf.collect()


def test_dataset_info_lists_hidden_columns_for_others_only(world: World) -> None:
    assert world.evaluator.dataset_info("patients", ANALYST)["hidden"] == ["ssn"]
    assert world.evaluator.dataset_info("patients", OWNER)["hidden"] == []
    assert world.evaluator.dataset_info("patients", ANALYST)["policy"] == POLICY.to_dict()
    with pytest.raises(NotFound):
        world.evaluator.dataset_info("nope", ANALYST)


def test_describe_skips_hidden_and_non_numeric_columns(sdf: SecureDataFrame) -> None:
    assert list(sdf.describe().columns) == ["id", "age", "weight", "height", "income"]
