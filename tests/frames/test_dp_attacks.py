"""The attacks of issue 12, against a DP-mode dataset on a real kernel: each is refused or recovers nothing.

The target is the salary (123457) of the row with ``id == 7``. Every attacker is a party with its own key.
"Recovers nothing" is checked two ways: the estimate is not the exact salary (noise is drawn from OpenDP's
CSPRNG; the chance that a discrete Laplace of scale >= 250000/eps lands exactly is below 1e-5), and the
noise bound the enclave reports for the estimate is wider than a tenth of the salary range, so no
estimate pins the target down.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import pytest

import mesatee_notebook as mn
from tests.conftest import KernelProc

TARGET = 123_457
RANGE = 250_000
POLICY = mn.DataPolicy(
    privacy=mn.DP(
        epsilon=3.0, delta=1e-7, bounds={"salary": (0, RANGE), "age": (18, 100)}, unit="id", query_epsilon=0.3,
        public_groups={"region": ["north", "south", "east", "west", "island"]},
    ),
    hidden_columns=("ssn",),
)  # fmt: skip


def staff(n: int = 1000) -> pd.DataFrame:
    rng = np.random.default_rng(12)
    df = pd.DataFrame(
        {
            "id": np.arange(n, dtype=np.int64),
            "ssn": [f"{100000000 + 7919 * i % 900000000:09d}" for i in range(n)],
            "salary": rng.integers(20_000, 120_000, n),
            "age": rng.integers(18, 90, n),
            "region": rng.choice(["north", "south", "east", "west"], n),
        }
    )
    df.loc[7, "salary"] = TARGET
    df.loc[7, "region"] = "island"  # alone in a group
    df.loc[:9, "salary"] = np.minimum(df.loc[:9, "salary"], 100_000)  # 9 rows known to be lower
    df.loc[7, "salary"] = TARGET
    return df


class Lab:
    def __init__(self, kernel: KernelProc, root: Path) -> None:
        self.kernel = kernel
        self.root = root
        self.policy = cast("mn.Policy", kernel.policy())
        self.owner = mn.connect(kernel.url, policy=self.policy, identity=root / "owner")
        self.data = staff()
        self.owner.upload(self.data, "dp_staff", policy=POLICY, replace=True)
        self.sessions: list[mn.Session] = [self.owner]

    def attacker(self, name: str) -> Any:
        s = mn.connect(self.kernel.url, policy=self.policy, identity=self.root / name)
        self.sessions.append(s)
        return s.dataframe("dp_staff")

    def close(self) -> None:
        for s in self.sessions:
            s.close()


@pytest.fixture(scope="module")
def lab(kernel: KernelProc, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    lab = Lab(kernel, tmp_path_factory.mktemp("dp_attacks"))
    yield lab
    lab.close()


def assert_not_recovered(estimate: float, accuracy: float) -> None:
    assert estimate != TARGET
    assert accuracy > RANGE / 10, accuracy  # the enclave's own noise bound: no better than ±25,000


def noisy(result: Any) -> tuple[float, float]:
    assert isinstance(result, mn.DPResult)
    return float(result.value), float(result.accuracy)


def test_crafted_arithmetic_is_refused_or_clamped(lab: Lab) -> None:
    sdf = lab.attacker("arith")
    one_hot = [
        sdf.salary * (sdf.id == 7),
        (sdf.id == 7).astype("int64") * sdf.salary,
        sdf.salary * (1 // (1 + (sdf.id - 7) ** 2)),
    ]
    for expr in one_hot:
        with pytest.raises(mn.PolicyViolation, match="needs bounds"):
            expr.sum().collect()  # an unnamed expression has no declared bounds
    for expr in one_hot:  # named like a bounded column: clamped to [0, 250000] and noisy
        est, acc = noisy(sdf.assign(salary=expr).salary.sum().collect())
        assert_not_recovered(est, acc)


def test_three_query_tracker_recovers_nothing(lab: Lab) -> None:
    sdf = lab.attacker("tracker")
    a = (sdf.id < 30) | (sdf.id >= 970)  # 60 rows
    t = sdf.id >= 970  # 30 rows
    b = (sdf.id < 30) & (sdf.id != 7)  # 29 rows
    results = [sdf[m].salary.sum().collect() for m in (a, t, b)]
    est = float(results[0].value) - float(results[1].value) - float(results[2].value)
    acc = min(r.accuracy for r in results)  # the estimate is at least as noisy as its noisiest part
    assert_not_recovered(est, acc)


def test_total_minus_released_groups_recovers_nothing(lab: Lab) -> None:
    sdf = lab.attacker("complement")
    total = sdf.salary.sum().collect()
    groups = sdf.groupby("region").agg(s=("salary", "sum")).collect()
    assert "island" in groups.value.index  # public groups are all released (nothing is suppressed) ...
    others = groups.value.drop("island")["s"].sum()
    est = float(total.value) - float(others)  # ... and every one of them is noisy
    assert_not_recovered(est, float(total.accuracy))
    island, island_acc = float(groups.value.loc["island", "s"]), float(groups.accuracy.loc["island", "s"])
    assert_not_recovered(island, island_acc)


def test_refusals_are_no_oracle_binary_search_fails(lab: Lab) -> None:
    """18 count queries: each is a noisy count (never a refusal that depends on the data), so the search drifts."""
    sdf = lab.attacker("oracle")
    lo, hi = 0, 2**18
    for _ in range(18):
        mid = (lo + hi) // 2
        n = sdf[(sdf.id == 7) & (sdf.salary >= mid)].id.count().collect(epsilon=0.15)  # exact: 0 or 1
        lo, hi = (mid, hi) if int(n) >= 1 else (lo, mid)
    assert lo != TARGET  # all 18 noisy answers would have to fall on the right side: p < 1e-4
    budget = sdf.privacy_budget()
    assert budget.queries == 18
    assert budget.epsilon_spent == pytest.approx(2.7)
    assert len(sdf) > 0  # the policy's default 0.3 brings the total to exactly 3.0: still allowed
    with pytest.raises(mn.PolicyViolation, match="privacy budget exhausted"):
        len(sdf)  # the only refusal, and it depends on the budget spent, not on the data
    assert sdf.privacy_budget().epsilon_remaining == 0


def test_merge_on_the_hidden_column_is_refused(lab: Lab) -> None:
    sdf = lab.attacker("merger")
    me = lab.sessions[-1]
    guess = pd.DataFrame({"ssn": [lab.data.loc[7, "ssn"]], "hit": [1]})
    me.upload(guess, f"guess_{me.party_id[:8]}", policy=mn.DataPolicy(allow_rows=True, min_group_size=0))
    mine = me.dataframe(f"guess_{me.party_id[:8]}")
    with pytest.raises(mn.PolicyViolation, match="PSI"):
        mine.merge(sdf, on="ssn", how="left").hit.count().collect()
    words = [f"{100000000 + 7919 * i % 900000000:09d}" for i in range(97_535)]
    candidates = pd.DataFrame({"ssn": words, "cand": words})  # a dictionary join: which candidate matches id 7?
    me.upload(candidates, f"dict_{me.party_id[:8]}", policy=mn.DataPolicy(allow_rows=True, min_group_size=0))
    words = me.dataframe(f"dict_{me.party_id[:8]}")
    with pytest.raises(mn.PolicyViolation, match="PSI"):
        joined = words.merge(sdf, on="ssn")
        joined[joined.id == 7].groupby("cand").agg(n=("id", "size")).collect()
    assert sdf.privacy_budget().epsilon_spent == 0  # refused before anything was charged


def test_extremes_and_describe_are_refused_and_quantiles_are_noisy(lab: Lab) -> None:
    sdf = lab.attacker("extremes")
    few = sdf[sdf.id < 10]  # the target and 9 rows known to be lower
    for q in (few.salary.max(), sdf.salary.max(), sdf.salary.min(), sdf.describe()):
        with pytest.raises(mn.PolicyViolation, match="DP mode"):
            q.collect()
    top = few.salary.quantile(0.99).collect()
    assert float(top.value) != TARGET  # a candidate of a 1025-point grid over [0, 250000]; 123457 is not on it
    assert top.mechanisms["value"]["accuracy_unit"] == "rank"
    assert float(top.accuracy) > 10  # a rank error beyond the whole 10-row selection


def test_a_second_key_has_its_own_budget_but_the_cap_holds(lab: Lab, kernel: KernelProc) -> None:
    """Per-analyst budgets restart with a fresh key; the owner's cap over all analysts does not."""
    capped = mn.DataPolicy(
        privacy=mn.DP(epsilon=1.0, bounds={"salary": (0, RANGE)}, unit="id", total_epsilon=1.5, query_epsilon=0.5),
        hidden_columns=("ssn",),
    )
    lab.owner.upload(lab.data, "dp_capped", policy=capped, replace=True)
    spent = []
    for i in range(3):  # key 0 spends its own 1.0; key 1 gets 0.5 before the cap; key 2 gets nothing
        s = mn.connect(kernel.url, policy=lab.policy, identity=lab.root / f"fresh{i}")
        lab.sessions.append(s)
        sdf = s.dataframe("dp_capped")
        for _ in range(2):
            try:
                r = sdf.salary.mean().collect()
            except mn.PolicyViolation as exc:
                assert "privacy budget exhausted" in str(exc)
                continue
            spent.append(r.epsilon)
            assert r.budget.all_analysts is not None
    assert sum(spent) == pytest.approx(1.5)  # three queries of 0.5, over however many keys
    assert len(spent) == 3
