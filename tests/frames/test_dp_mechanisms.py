"""DP mode, in process: noise scales against the mechanisms' formulas, coverage of the reported accuracy, the rules.

The noise comes from OpenDP's CSPRNG and cannot be seeded; the data of each run is seeded, and every
statistical assertion has a false-alarm probability below about 1e-4 (stated next to it).
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import numpy as np
import pandas as pd
import pytest
from _frames_support import ANALYST, OWNER, World

from mesatee_notebook.enclave.dp import BudgetLedger, MemoryLedgerStore, bound_contributions
from mesatee_notebook.errors import MalformedFrame, PolicyViolation
from mesatee_notebook.remote.frame import DPResult
from mesatee_notebook.wire.datapolicy import DP, DataPolicy

BIG = 1e9  # a budget that never runs out, for tests of the mechanisms themselves


def people(n: int, seed: int, groups: int = 4) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "id": np.arange(n, dtype=np.int64),
            "ssn": [f"{100000000 + i}" for i in range(n)],
            "salary": rng.integers(20_000, 200_000, n),
            "age": rng.integers(18, 100, n),
            "g": rng.integers(0, groups, n),
        }
    )


def dp_world(df: pd.DataFrame, **dp: Any) -> World:
    dp.setdefault("epsilon", BIG)
    dp.setdefault("bounds", {"salary": (0, 250_000), "age": (18, 100)})
    policy = DataPolicy(privacy=DP(**dp), hidden_columns=("ssn",))
    return World({"people": (df, policy, OWNER)})


def discrete_laplace_var(scale: float) -> float:
    """Variance of the discrete Laplace distribution P(k) ∝ exp(-|k| / scale)."""
    q = math.exp(-1 / scale)
    return 2 * q / (1 - q) ** 2


# -- noise scales against the formulas ------------------------------------------------------------------


@pytest.mark.parametrize(("k", "epsilon"), [(1, 0.5), (2, 0.5), (1, 2.0)])
def test_count_noise_matches_the_discrete_laplace_formula(k: int, epsilon: float) -> None:
    """Counts: scale b = k / epsilon; the sample variance of 4,000 noisy zero counts matches 2q/(1-q)^2."""
    groups = 4000
    df = people(50, seed=1).assign(g=np.zeros(50, dtype=np.int64))
    world = dp_world(df, max_rows_per_unit=k, public_groups={"g": list(range(groups))})
    res = world.frame("people", ANALYST).groupby("g").agg(n=("age", "size")).collect(epsilon=epsilon)
    assert isinstance(res, DPResult)
    meta = res.mechanisms["n"]
    assert meta["scale"] == pytest.approx(k / epsilon)  # the formula b = Δ/ε with Δ = k
    assert meta["sensitivity"] == k
    noise = res.value["n"].to_numpy()[1:]  # groups 1.. are empty: what is released is the noise (clamped at 0)
    # a symmetric noise clamped at 0: P(0) = P(|Z| = 0) + P(Z < 0); compare E[max(Z, 0)^2] = Var/2
    want = discrete_laplace_var(k / epsilon) / 2
    got = float(np.mean(noise.astype(np.float64) ** 2))
    sd = want * math.sqrt(11 / len(noise))  # Var(max(Z,0)^2) = E[Z^4]/2 - Var^2/4 = 11 want^2 (Laplace)
    assert abs(got - want) < 5 * sd, (got, want)  # 5 sigma: false alarm < 1e-5
    first = int(res.value["n"].iloc[0])
    assert abs(first - 50 * 1) <= 20 * k / epsilon  # the one populated group: 50 rows (one per unit)


def test_sum_noise_matches_the_formula_sensitivity_k_times_bound() -> None:
    """Sums: clamped to [0, 250000] on an integer grid, so Δ = k·250000 and b = Δ/ε; variance checked."""
    groups, epsilon = 2000, 1.0
    df = people(groups * 3, seed=2).assign(g=np.repeat(np.arange(groups), 3))
    world = dp_world(df, public_groups={"g": list(range(groups))})
    res = world.frame("people", ANALYST).groupby("g").agg(s=("salary", "sum")).collect(epsilon=epsilon)
    meta = res.mechanisms["s"]
    assert meta["sensitivity"] == 250_000
    assert meta["scale"] == pytest.approx(250_000 / epsilon)
    noise = res.value["s"].to_numpy(dtype=np.float64) - df.groupby("g").salary.sum().to_numpy(dtype=np.float64)
    want = discrete_laplace_var(250_000 / epsilon)
    got = float(np.var(noise))
    assert abs(got - want) / want < 5 * math.sqrt(5 / groups), (got, want)  # Var(s^2) = 5 Var^2 for Laplace
    assert abs(float(np.mean(noise))) < 5 * math.sqrt(want / groups)  # unbiased
    acc = float(res.accuracy["s"].iloc[0])
    assert acc == pytest.approx(250_000 / epsilon * math.log(1 / 0.05), rel=0.01)  # b·ln(1/alpha) for the tails
    assert 0.92 < float(np.mean(np.abs(noise) <= acc)) <= 1.0


def test_clamping_bounds_every_value() -> None:
    df = people(200, seed=3)
    df.loc[7, "salary"] = 10**12  # far outside the bounds: it counts as 250000
    world = dp_world(df)
    got = world.frame("people", ANALYST).salary.sum().collect(epsilon=1e6)
    want = float(df.salary.clip(0, 250_000).sum())
    assert abs(float(got) - want) <= got.accuracy + 1
    assert got.accuracy < 10  # at epsilon 1e6 the noise is tiny: the clamp is what is checked


# -- utility: the reported interval covers the truth at the stated rate --------------------------------


def test_dp_mean_lands_in_its_95_percent_interval_at_the_stated_rate() -> None:
    """5,000 rows, epsilon 1: over 200 seeded datasets the truth is inside the reported interval >= 95%."""
    runs, misses, widths = 200, 0, []
    for seed in range(runs):
        df = people(5000, seed=seed)
        world = dp_world(df)
        res = world.frame("people", ANALYST).salary.mean().collect(epsilon=1.0)
        lo, hi = res.interval()
        misses += not lo <= df.salary.mean() <= hi
        widths.append(res.accuracy)
        assert res.mechanisms["value"]["confidence"] == 0.95
    # Binomial(200, 0.05): P(X > 22) < 1e-3; the union-bound interval is conservative, so far fewer miss.
    assert misses <= 22, misses
    assert np.median(widths) < 1000  # and it is useful: ± under 1000 on salaries of ~110,000


def test_variance_interval_covers_the_truth() -> None:
    misses = 0
    for seed in range(40):
        df = people(5000, seed=seed)
        res = dp_world(df).frame("people", ANALYST).age.var().collect(epsilon=1.0)
        misses += abs(res.value - df.age.var(ddof=0)) > res.accuracy
    assert misses <= 6  # Binomial(40, 0.05): P(X > 6) < 2e-2 even at the nominal rate; conservative in fact


# -- contribution bounding, groups ----------------------------------------------------------------------


def test_a_unit_counts_at_most_max_rows_per_unit_times() -> None:
    df = people(300, seed=4)
    df = pd.concat([df, *[df[df.id == 7]] * 500], ignore_index=True)  # person 7 has 501 rows
    for k in (1, 3):
        sdf = dp_world(df, unit="id", max_rows_per_unit=k).frame("people", ANALYST)
        assert int(sdf[sdf.id == 7].id.count().collect(epsilon=1e6)) == k  # only k of them enter an aggregate
        assert int(sdf.id.count().collect(epsilon=1e6)) == 299 + k


def test_bound_contributions_keeps_the_first_k_rows_of_each_unit() -> None:
    units = np.array([5, 1, 5, 5, 2, 1, 5])
    assert bound_contributions(units, 2).tolist() == [True, True, True, False, True, True, False]
    assert bound_contributions(np.array([np.nan, np.nan, 1.0]), 1).tolist() == [True, False, True]


def test_public_groups_release_exactly_the_declared_keys() -> None:
    df = people(400, seed=5)
    world = dp_world(df, public_groups={"g": [0, 1, 2, 3, 99]})
    res = world.frame("people", ANALYST).groupby("g").agg(n=("age", "size"), m=("age", "mean")).collect(epsilon=1e6)
    assert list(res.value.index) == [0, 1, 2, 3, 99]  # 99 is declared but empty: released (noise only)
    assert res.meta["groups"] == "public"
    assert res.value["n"].tolist()[:4] == df.groupby("g").size().tolist()


def test_undeclared_group_keys_pass_partition_selection() -> None:
    df = people(400, seed=6, groups=3)
    df.loc[7, "g"] = 77  # a group of one
    world = dp_world(df, delta=1e-6)
    res = world.frame("people", ANALYST).groupby("g").agg(n=("age", "size")).collect(epsilon=1e6, delta=1e-7)
    assert 77 not in res.value.index  # below the threshold, whatever the noise
    assert sorted(res.value.index) == [0, 1, 2]
    sel = res.meta["selection"]
    assert sel["threshold"] >= 2 and sel["delta"] == 1e-7
    world0 = dp_world(df)  # delta = 0: no partition selection
    with pytest.raises(PolicyViolation, match="partition selection needs a delta"):
        world0.frame("people", ANALYST).groupby("g").agg(n=("age", "size")).collect(epsilon=1.0)


def test_value_counts_and_len_are_noisy_counts() -> None:
    df = people(400, seed=7)
    world = dp_world(df, public_groups={"g": [0, 1, 2, 3]})
    sdf = world.frame("people", ANALYST)
    counts = sdf.g.value_counts().collect(epsilon=1e6)
    pd.testing.assert_series_equal(counts.value.sort_index(), df.g.value_counts().sort_index(), check_names=False)
    assert len(sdf) == 400  # len() is a DP count too (and spends budget)
    assert world.evaluator.privacy_budget("people", ANALYST)["queries"] == 2


# -- the rules of the DP mode ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "match"),
    [
        (lambda s: s.head(), "row-level results are never released"),
        (lambda s: s.salary.max(), "not released in DP mode"),
        (lambda s: s.describe(), "not available in DP mode"),
        (lambda s: s.salary.corr(s.age), "not available in DP mode"),
        (lambda s: s.id.sum(), "needs bounds"),
        (lambda s: (s.salary * s.age).sum(), "needs bounds"),
        (lambda s: s.groupby("g").agg(n=("age", "size")).sort_values("n"), "post-process"),
        (lambda s: s.merge(s, on="id").age_x.count(), "once"),
        (lambda s: s.g.value_counts(normalize=True), "normalize"),
    ],
)
def test_dp_mode_refuses_what_it_cannot_release(query: Any, match: str) -> None:
    world = dp_world(people(100, seed=8), delta=1e-6)
    with pytest.raises(PolicyViolation, match=match):
        query(world.frame("people", ANALYST)).collect(epsilon=0.1)
    assert world.events[-1]["outcome"] == "refused"
    assert world.evaluator.privacy_budget("people", ANALYST)["queries"] == 0  # refused before any charge


def test_the_owner_is_exempt_and_spends_nothing() -> None:
    df = people(100, seed=9)
    world = dp_world(df, epsilon=1.0)
    assert world.frame("people", OWNER).salary.max().collect() == df.salary.max()
    assert world.evaluator.privacy_budget("people", OWNER)["epsilon_spent"] == 0


def test_dp_policy_round_trips_and_rejects_bad_input() -> None:
    pol = DataPolicy(
        privacy=DP(epsilon=3.0, delta=1e-7, bounds={"salary": (0, 250_000)}, unit="id", total_epsilon=10,
                   public_groups={"region": ["north", "south"]}),
        hidden_columns=("ssn",),
    )  # fmt: skip
    assert DataPolicy.from_dict(pol.to_dict()) == pol
    for bad in (
        {"epsilon": 0},
        {"epsilon": -1},
        {"epsilon": float("nan")},
        {"epsilon": 1, "delta": 1.0},
        {"epsilon": 1, "bounds": {"x": (5, 1)}},
        {"epsilon": 1, "bounds": {"x": (0, float("inf"))}},
        {"epsilon": 1, "max_rows_per_unit": 0},
        {"epsilon": 1, "public_groups": {"g": []}},
        {"epsilon": 1, "query_epsilon": 2},
    ):
        with pytest.raises(MalformedFrame):
            DP(**bad)
    with pytest.raises(MalformedFrame, match="unknown DP field"):
        DataPolicy.from_dict({"privacy": {"epsilon": 1, "sigma": 2}})
    with pytest.raises(MalformedFrame, match="hidden"):
        DataPolicy(privacy=DP(epsilon=1, bounds={"ssn": (0, 1)}), hidden_columns=("ssn",))


def test_query_epsilon_must_be_positive_and_finite() -> None:
    world = dp_world(people(50, seed=10))
    sdf = world.frame("people", ANALYST)
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(MalformedFrame):
            sdf.age.mean().collect(epsilon=bad)


# -- the ledger under concurrent chargers ----------------------------------------------------------------


class _SlowStore(MemoryLedgerStore):
    """Yields between every operation, so concurrent chargers interleave as much as they can."""

    def put(self, name: str, data: bytes) -> None:
        time.sleep(0.001)
        super().put(name, data)

    def list(self, prefix: str) -> list[str]:
        time.sleep(0.001)
        return super().list(prefix)


def test_concurrent_ledgers_never_pass_the_cap_together() -> None:
    """Two workers (two ledgers, one store), 16 threads: the admitted total never exceeds the cap."""
    store = _SlowStore()
    ledgers = [BudgetLedger(store), BudgetLedger(store)]
    policy = DP(epsilon=1.0, total_epsilon=0.5)
    admitted: list[float] = []
    lock = threading.Lock()

    def spend(i: int) -> None:
        for _ in range(5):
            try:
                ledgers[i % 2].charge("d", f"party{i}", policy, 0.1, 0.0)
            except PolicyViolation:
                continue
            with lock:
                admitted.append(0.1)

    threads = [threading.Thread(target=spend, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert math.fsum(admitted) <= 0.5 + 1e-9
    status = ledgers[0].status("d", "party0", policy)
    assert status.all_epsilon_spent == pytest.approx(math.fsum(admitted))
    assert len(admitted) >= 1  # refusals are safe, but not everyone is refused


def test_counts_of_text_columns_and_sums_of_booleans() -> None:
    df = people(300, seed=11).assign(flag=lambda d: d.age > 60, name=lambda d: d.ssn.where(d.age > 30))
    world = dp_world(df, public_groups={"g": [0, 1, 2, 3]})
    res = world.frame("people", ANALYST).groupby("g").agg(named=("name", "count"), old=("flag", "sum"))
    got = res.collect(epsilon=1e6).value
    assert got["named"].tolist() == df.groupby("g").name.count().tolist()
    assert got["old"].tolist() == df.groupby("g").flag.sum().tolist()  # booleans are bounded by (0, 1)
