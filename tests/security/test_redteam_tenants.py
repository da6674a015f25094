"""Red team, session 6: hostile tenants against each other's data, budgets and services, on a real kernel over TLS.

Holes in another helper's area are ``xfail(strict=True)``: the test fails the day the hole is fixed, so whoever
fixes it removes the mark.
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
from tests.security.conftest import salary_rows


@pytest.fixture(scope="module")
def parties(kernel: KernelProc, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("rt_tenants")
    policy = cast("mn.Policy", kernel.policy())
    owner = mn.connect(kernel.url, policy=policy, identity=root / "owner")
    analyst = mn.connect(kernel.url, policy=policy, identity=root / "analyst")
    dp = mn.DP(epsilon=1.0, bounds={"salary": (0, 250_000)}, query_epsilon=0.5)  # unit=None: a row is a person
    owner.upload(salary_rows(200, seed=6), "rt_dp_rows", policy=mn.DataPolicy(privacy=dp), replace=True)
    yield {"kernel": kernel, "owner": owner, "analyst": analyst, "root": Path(root), "policy": policy}
    for s in (owner, analyst):
        s.close()


def _own_model(analyst: mn.Session) -> Any:
    """A model the analyst trains on its own data: it outputs 1 for the target row when its salary > 100000."""
    rng = np.random.default_rng(1)
    n = 400
    own = pd.DataFrame({"id": rng.integers(0, 20, n), "salary": rng.integers(0, 250_000, n)})
    own["y"] = ((own.id == 7) & (own.salary > 100_000)).astype("float64")
    return analyst.gbdt.train(
        own, label="y", params={"objective": "reg:squarederror", "max_depth": 4, "eta": 1.0}, num_boost_round=4
    )


def test_predictions_on_a_dp_dataset_do_not_reset_the_privacy_budget(parties: dict[str, Any]) -> None:
    analyst = parties["analyst"]
    sdf = analyst.dataframe("rt_dp_rows")
    assert isinstance(sdf.salary.count().collect(epsilon=1.0), mn.DPResult)  # the whole budget, spent
    with pytest.raises(mn.PolicyViolation, match="budget"):
        sdf.salary.count().collect(epsilon=0.5)
    model = _own_model(analyst)
    # A derived dataset of the owner's rows (one prediction per record) must not come with a budget of its own.
    with pytest.raises(mn.PolicyViolation):
        pred = model.predict("rt_dp_rows")
        pred.count().collect(epsilon=1.0)


def test_guard_histories_of_datasets_whose_names_share_a_prefix_stay_apart(parties: dict[str, Any]) -> None:
    """The sealed guard history of ``rtg`` was listed by name prefix, so it took in ``rtg_more``'s releases too.

    Their label arrays differ in length: the next release of ``rtg`` failed (an evaluation error), so whoever
    names a dataset after yours could make your analysts' queries on it fail, or be refused for another
    dataset's releases.
    """
    owner, analyst = parties["owner"], parties["analyst"]
    policy = mn.DataPolicy(min_group_size=5)
    owner.upload(pd.DataFrame({"x": np.arange(60)}), "rtg_more", policy=policy, replace=True)
    owner.upload(pd.DataFrame({"x": np.arange(40)}), "rtg", policy=policy, replace=True)
    assert len(analyst.dataframe("rtg_more")) == 60
    assert len(analyst.dataframe("rtg")) == 40
    rtg = analyst.dataframe("rtg")
    assert int(rtg[rtg.x >= 10].x.count().collect()) == 30
