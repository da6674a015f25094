"""Policy attacks: each is refused (or suppressed) in the enclave, and every query reaches the audit hook."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd
import pytest
from _frames_support import ANALYST, OWNER, POLICY, World, patients

from mesatee_notebook.errors import MalformedFrame, NotFound, PolicyViolation, RemoteExecutionError
from mesatee_notebook.wire.datapolicy import DataPolicy

EVE = "party-eve"


def last(world: World) -> dict[str, Any]:
    return world.events[-1]


def assert_refused(world: World, fragment: str) -> None:
    event = last(world)
    assert event["outcome"] == "refused"
    assert fragment in event["reason"]
    assert event["party"] == ANALYST


def with_lonely_patient(policy: DataPolicy) -> World:
    df = patients()
    df.loc[7, "region"] = "island"  # one person in a region of their own
    return World({"patients": (df, policy, OWNER)})


# -- small groups -------------------------------------------------------------


def test_group_of_size_one_is_suppressed() -> None:
    world = with_lonely_patient(POLICY)
    sdf = world.frame("patients", ANALYST)
    out = sdf.groupby("region").agg(n=("age", "size"), m=("income", "mean")).collect()
    assert "island" not in out.index
    assert set(out.index) == {"north", "south", "east", "west"}
    assert (out.n >= 10).all()
    assert last(world)["outcome"] == "released"
    assert last(world)["suppressed"] == 1


def test_group_of_size_one_is_refused_when_policy_says_refuse() -> None:
    world = with_lonely_patient(DataPolicy(min_group_size=10, hidden_columns=("ssn",), small_group="refuse"))
    sdf = world.frame("patients", ANALYST)
    with pytest.raises(PolicyViolation, match="fewer than 10 rows"):
        sdf.groupby("region").agg(m=("income", "mean")).collect()
    assert_refused(world, "small_group='refuse'")
    with pytest.raises(PolicyViolation):
        sdf.value_counts("region").collect()
    assert_refused(world, "fewer than 10")


def test_value_counts_suppresses_rare_values() -> None:
    world = with_lonely_patient(POLICY)
    counts = world.frame("patients", ANALYST).region.value_counts().collect()
    assert "island" not in counts.index
    assert counts.sum() == 399


def test_cells_from_few_non_missing_values_are_suppressed() -> None:
    df = patients()
    df["lab"] = np.where(df.region == "north", np.nan, 1.0)
    df.loc[df.index[df.region == "north"][0], "lab"] = 123.0  # only one north patient has a value
    world = World({"patients": (df, POLICY, OWNER)})
    out = world.frame("patients", ANALYST).groupby("region").agg(n=("lab", "size"), m=("lab", "mean")).collect()
    assert np.isnan(out.loc["north", "m"])
    assert out.loc["north", "n"] >= 10
    assert not np.isnan(out.loc["south", "m"])


def test_boolean_mean_of_a_homogeneous_group_is_suppressed() -> None:
    df = patients()
    df.loc[df.region == "east", "smoker"] = False
    df.loc[df.index[df.region == "east"][0], "smoker"] = True  # exactly one smoker in the east
    world = World({"patients": (df, POLICY, OWNER)})
    sdf = world.frame("patients", ANALYST)
    out = sdf.groupby("region").agg(frac=("smoker", "mean")).collect()
    assert np.isnan(out.loc["east", "frac"])
    assert not np.isnan(out.loc["west", "frac"])
    with pytest.raises(PolicyViolation, match="fewer than 10"):
        sdf[sdf.region == "east"].smoker.sum().collect()


# -- singling out -------------------------------------------------------------


def test_filter_then_count_to_single_out_one_person_is_refused() -> None:
    world = World({"patients": (patients(), POLICY, OWNER)})
    sdf = world.frame("patients", ANALYST)
    with pytest.raises(PolicyViolation, match="fewer than 10 rows"):
        len(sdf[sdf.id == 7])
    assert_refused(world, "min_group_size=10")
    with pytest.raises(PolicyViolation):
        sdf[sdf.id == 7].income.mean().collect()
    with pytest.raises(PolicyViolation):
        (sdf.id == 7).sum().collect()  # the same count, as a boolean sum over every row
    out = sdf[sdf.id == 7].groupby("region").agg(m=("income", "mean"), n=("age", "size")).collect()
    assert out.empty  # the one-person group is suppressed
    assert last(world)["suppressed"] == 1
    assert [e["outcome"] for e in world.events] == ["refused", "refused", "refused", "released"]


def test_differencing_attack_is_refused() -> None:
    world = World({"patients": (patients(), POLICY, OWNER)})
    sdf = world.frame("patients", ANALYST)
    total = sdf.income.sum().collect()
    with pytest.raises(PolicyViolation, match="differencing guard"):
        sdf[sdf.id != 7].income.sum().collect()  # total - this = patient 7's income
    assert_refused(world, "differencing guard")
    assert len(sdf) == 400  # the same row set again is fine
    assert sdf[sdf.age > 50].income.sum().collect() < total  # a genuinely different set is fine


def test_differencing_by_group_is_refused() -> None:
    world = World({"patients": (patients(), POLICY, OWNER)})
    sdf = world.frame("patients", ANALYST)
    sdf.groupby("region").agg(s=("income", "sum")).collect()
    with pytest.raises(PolicyViolation, match="differencing guard"):
        sdf[sdf.id != 7].groupby("region").agg(s=("income", "sum")).collect()
    assert_refused(world, "differencing guard")
    # the same groups released with other statistics are the same row sets: allowed
    sdf.groupby("region").agg(m=("age", "mean")).collect()
    assert last(world)["outcome"] == "released"


def test_differencing_guard_is_per_party_and_can_be_turned_off() -> None:
    policy = DataPolicy(min_group_size=10, hidden_columns=("ssn",), differencing_guard=False)
    world = World({"patients": (patients(), policy, OWNER)})
    sdf = world.frame("patients", ANALYST)
    total = sdf.income.sum().collect()
    rest = sdf[sdf.id != 7].income.sum().collect()
    assert total - rest == patients().income[7]  # what the guard exists to stop
    guarded = World({"patients": (patients(), POLICY, OWNER)})
    guarded.frame("patients", ANALYST).income.sum().collect()
    assert guarded.frame("patients", EVE)[guarded.frame("patients", EVE).id != 7].income.sum().collect() == rest
    assert guarded.evaluator.released_count(ANALYST, "patients") == 1


def test_release_history_is_bounded_by_refusal() -> None:
    world = World({"patients": (patients(), POLICY, OWNER)}, history_limit=2)
    sdf = world.frame("patients", ANALYST)
    sdf[sdf.age > 30].income.mean().collect()
    sdf[sdf.age > 60].income.mean().collect()
    sdf[sdf.age > 60].income.mean().collect()  # a repeat is not a new release
    with pytest.raises(PolicyViolation, match="history"):
        sdf[sdf.age > 45].income.mean().collect()


@pytest.mark.parametrize(
    "query",
    [
        lambda s: s.income.max(),
        lambda s: s.income.min(),
        lambda s: s.income.median(),
        lambda s: s.income.quantile(0.9),
        lambda s: s.describe(),
        lambda s: s.income.describe(),
        lambda s: s.groupby("region").agg(top=("income", "max")),
        lambda s: s.groupby("region")["age"].quantile(0.25),
    ],
)
def test_record_values_are_refused_for_analysts_when_rows_are_forbidden(query: Any) -> None:
    """min, max, quantiles and describe are real records' values: refused in the threshold mode."""
    world = World({"patients": (patients(), POLICY, OWNER)})
    with pytest.raises(PolicyViolation, match="one record's exact value"):
        query(world.frame("patients", ANALYST)).collect()
    assert_refused(world, "record's exact value")
    query(world.frame("patients", OWNER)).collect()  # the owner is exempt
    assert world.events[-1]["outcome"] == "released"


# -- rows -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "query",
    [
        lambda s: s.head(),
        lambda s: s.tail(3),
        lambda s: s[s.age > 40][["age", "region"]],
        lambda s: s.age,
        lambda s: s.sort_values("income")[["income"]].head(1),
        lambda s: s[["region"]].drop_duplicates(),
        lambda s: s.assign(b=s.weight / s.height**2)[["b"]],
    ],
)
def test_row_level_results_are_refused_when_rows_are_forbidden(query: Any) -> None:
    world = World({"patients": (patients(), POLICY, OWNER)})
    with pytest.raises(PolicyViolation, match="allow_rows=False"):
        query(world.frame("patients", ANALYST)).collect()
    assert_refused(world, "does not allow row-level results")
    assert world.events[-1]["level"] == "rows"


def test_rows_are_released_when_allowed_but_never_hidden_columns() -> None:
    policy = DataPolicy(min_group_size=10, hidden_columns=("ssn",), allow_rows=True)
    world = World({"patients": (patients(), policy, OWNER)})
    sdf = world.frame("patients", ANALYST)
    with pytest.raises(PolicyViolation, match="hidden column"):
        sdf.head().collect()
    visible = [c for c in sdf.columns if c != "ssn"]
    got = sdf[visible].head(3).collect()
    pd.testing.assert_frame_equal(got, patients()[visible].head(3))


def test_owner_is_exempt_from_own_policy() -> None:
    world = World({"patients": (patients(), POLICY, OWNER)})
    sdf = world.frame("patients", OWNER)
    pd.testing.assert_frame_equal(sdf.head().collect(), patients().head())
    assert sdf[sdf.id == 7].ssn.collect().tolist() == ["100000007"]
    assert len(sdf[sdf.id == 7]) == 1
    assert world.events[-1]["outcome"] == "released"


# -- joins ----------------------------------------------------------------------


def attacker_world(policy: DataPolicy = POLICY) -> World:
    mine = pd.DataFrame({"id": [7] * 20, "ssn": ["100000007"] * 20, "tag": range(20)})
    return World(
        {
            "patients": (patients(), policy, OWNER),
            "mine": (mine, DataPolicy(min_group_size=0, allow_rows=True), ANALYST),
        }
    )


def test_join_that_would_reveal_rows_is_refused() -> None:
    world = attacker_world()
    sdf, mine = world.frame("patients", ANALYST), world.frame("mine", ANALYST)
    joined = mine.merge(sdf, on="id")
    with pytest.raises(PolicyViolation, match="allow_rows=False"):
        joined[["tag", "income"]].collect()
    assert_refused(world, "row-level")
    # 20 joined rows, but all about one patient: the count is of the patient's rows, not of the join's
    with pytest.raises(PolicyViolation, match="fewer than 10 rows"):
        joined.income.mean().collect()
    out = joined.groupby("region").agg(m=("income", "mean"), n=("tag", "size")).collect()
    assert out.empty and world.events[-1]["suppressed"] == 1


def test_merge_on_a_hidden_key_is_refused_for_analysts() -> None:
    """A guess table (or a dictionary of candidates) joined on a hidden column recovers it: refused, use PSI."""
    world = attacker_world(DataPolicy(min_group_size=10, hidden_columns=("ssn",), allow_rows=True))
    sdf, mine = world.frame("patients", ANALYST), world.frame("mine", ANALYST)
    joined = mine.merge(sdf, on="ssn")  # the plan may be built (a hidden column is a key, not a value) ...
    for attempt in (lambda: joined[["tag", "age"]].collect(), lambda: len(joined), lambda: joined.ssn.collect()):
        with pytest.raises(PolicyViolation, match="hidden"):
            attempt()  # ... but it is never evaluated for an analyst
    assert_refused(world, "PSI")
    big = World(
        {
            "patients": (patients(), POLICY, OWNER),
            "mine": (
                pd.DataFrame({"ssn": [f"{100000000 + i}" for i in range(0, 400, 2)]}),
                DataPolicy(allow_rows=True),
                ANALYST,
            ),
        }
    )
    b_sdf, b_mine = big.frame("patients", ANALYST), big.frame("mine", ANALYST)
    with pytest.raises(PolicyViolation, match="PSI"):
        b_mine.merge(b_sdf, on="ssn").groupby("region").agg(n=("age", "size")).collect()  # aggregates too
    owner_view = big.frame("patients", OWNER).merge(big.frame("patients", OWNER), on="ssn")
    assert len(owner_view) == 400  # the owner may join on their own hidden column


# -- hidden columns ---------------------------------------------------------------


@pytest.mark.parametrize(
    "attempt",
    [
        lambda s: s.rename(columns={"ssn": "x"}),
        lambda s: s.assign(x=s["ssn"]),
        lambda s: s.assign(ssn=s.age),
        lambda s: s[["ssn", "age"]],
        lambda s: s.groupby("ssn").agg(n=("age", "size")),
        lambda s: s.value_counts("ssn"),
        lambda s: s.sort_values("ssn"),
        lambda s: s[s.ssn == "100000007"],
        lambda s: s.drop_duplicates("ssn"),
        lambda s: s.groupby("region").agg(n=("ssn", "nunique")),
        lambda s: s.astype({"ssn": "str"}),
    ],
)
def test_hidden_column_references_are_refused_at_build_time(attempt: Any) -> None:
    world = World({"patients": (patients(), POLICY, OWNER)})
    with pytest.raises(PolicyViolation, match="ssn"):
        attempt(world.frame("patients", ANALYST))
    assert world.events == []  # nothing was sent


def raw_plan(nodes: dict[str, Any], root: str) -> str:
    return json.dumps({"version": 1, "root": root, "nodes": nodes})


SRC = {"op": "source", "args": {"name": "patients"}}


@pytest.mark.parametrize(
    ("nodes", "root"),
    [
        # a hand-written plan that renames the hidden column, then aggregates it
        (
            {
                "s": SRC,
                "r": {"op": "rename", "args": {"input": "s", "columns": {"ssn": "alias"}}},
                "g": {
                    "op": "groupby_agg",
                    "args": {
                        "input": "r",
                        "by": ["alias"],
                        "aggs": [["n", "age", "size"]],
                        "as_index": True,
                        "dropna": True,
                        "sort": True,
                    },
                },
            },
            "g",
        ),
        # assign a copy of the hidden column under a new name, then count values of it
        (
            {
                "s": SRC,
                "c": {"op": "column", "args": {"input": "s", "name": "ssn"}},
                "a": {"op": "assign", "args": {"input": "s", "columns": [["copy", {"ref": "c"}]]}},
                "v": {
                    "op": "value_counts",
                    "args": {
                        "input": "a",
                        "subset": ["copy"],
                        "normalize": False,
                        "sort": True,
                        "ascending": False,
                        "dropna": True,
                    },
                },
            },
            "v",
        ),
        # describe with the hidden column named explicitly
        ({"s": SRC, "d": {"op": "describe", "args": {"input": "s", "columns": ["ssn"]}}}, "d"),
    ],
)
def test_hidden_column_aliasing_is_refused_by_the_enclave(nodes: dict[str, Any], root: str) -> None:
    world = World({"patients": (patients(), POLICY, OWNER)})
    with pytest.raises(PolicyViolation, match="hides"):
        world.evaluator.evaluate(raw_plan(nodes, root), ANALYST)
    assert_refused(world, "ssn")


# -- other refusals and audit -------------------------------------------------------


def test_invalid_and_unknown_plans_are_audited() -> None:
    world = World({"patients": (patients(), POLICY, OWNER)})
    with pytest.raises(MalformedFrame):
        world.evaluator.evaluate('{"version": 1, "root": "a", "nodes": {"a": {"op": "exec", "args": {}}}}', ANALYST)
    assert world.events[-1]["outcome"] == "invalid"
    with pytest.raises(NotFound):
        world.evaluator.evaluate(raw_plan({"s": {"op": "source", "args": {"name": "secret"}}}, "s"), ANALYST)
    assert world.events[-1]["outcome"] == "invalid"
    with pytest.raises(NotFound):
        world.evaluator.evaluate(
            raw_plan({"s": SRC, "c": {"op": "column", "args": {"input": "s", "name": "nope"}}}, "c"), ANALYST
        )
    assert len(world.events) == 3
    assert all(len(e["plan_sha256"]) == 64 for e in world.events)


def test_evaluation_errors_do_not_leak_values() -> None:
    world = World({"patients": (patients(), POLICY, OWNER)})
    sdf = world.frame("patients", ANALYST)
    with pytest.raises(RemoteExecutionError) as info:
        sdf.region.astype("int64").sum().collect()
    assert "north" not in str(info.value) and "south" not in str(info.value)
    assert "withheld" in str(info.value)
    assert world.events[-1]["outcome"] == "error"
    owner = world.frame("patients", OWNER)
    with pytest.raises(RemoteExecutionError, match="ValueError: "):
        owner.region.astype("int64").sum().collect()


def test_audit_hook_failure_blocks_the_release() -> None:
    from mesatee_notebook.enclave.frames import FrameEvaluator

    def broken(_: dict[str, Any]) -> None:
        raise OSError("audit log unavailable")

    evaluator = FrameEvaluator({"patients": (patients(), POLICY, OWNER)}, broken)
    with pytest.raises(OSError, match="audit"):
        evaluator.evaluate(raw_plan({"s": SRC, "n": {"op": "count_rows", "args": {"input": "s"}}}, "n"), ANALYST)
