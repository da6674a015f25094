"""Red team, session 7: a derived dataset against its root's differencing history, on a real kernel over TLS.

``gbdt.predict`` on another party's dataset keeps one prediction per source row as a new dataset under the
source's policy; its releases count in the root's guard history (``services/frames.budget_root``). The sealed
history is the root's, but each worker kept it in memory per *dataset name*: a history read for the derived
dataset before a release on the root never learnt of that release, so a pair "every row of the root" and "every
row but one, through the predictions" passed the guard. The analyst's own model makes the predictions name the
rows it wants (here: row 7, and a half of the rest).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, cast

import numpy as np
import pandas as pd
import pytest

import mesatee_notebook as mn
from tests.conftest import KernelProc


@pytest.fixture(scope="module")
def lab(kernel: KernelProc, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("rt_derived")
    policy = cast("mn.Policy", kernel.policy())
    owner = mn.connect(kernel.url, policy=policy, identity=root / "owner")
    analyst = mn.connect(kernel.url, policy=policy, identity=root / "analyst")
    rows = pd.DataFrame({"id": np.arange(200, dtype=np.int64), "salary": np.arange(200, dtype=np.int64) * 10 + 1000})
    owner.upload(rows, "rt_drv_pay", policy=mn.DataPolicy(min_group_size=5, allow_rows=False), replace=True)
    yield {"kernel": kernel, "owner": owner, "analyst": analyst}
    for s in (owner, analyst):
        s.close()


def _marker_model(analyst: mn.Session) -> Any:
    """The analyst's own model: 1.0 for id 7, 2.0 for ids >= 100, else 0.0 (learnt exactly from its own table)."""
    ids = np.tile(np.arange(200, dtype=np.int64), 3)
    own = pd.DataFrame({"id": ids, "salary": np.zeros(len(ids), dtype=np.int64)})
    own["y"] = np.where(own.id == 7, 1.0, np.where(own.id >= 100, 2.0, 0.0))
    params = {"objective": "reg:squarederror", "max_depth": 6, "eta": 1.0, "lambda": 0.0, "min_child_weight": 0.0}
    return analyst.gbdt.train(own, label="y", params=params, num_boost_round=3)


def test_a_derived_dataset_sees_every_release_of_its_root(lab: dict[str, Any]) -> None:
    analyst = lab["analyst"]
    pred = _marker_model(analyst).predict("rt_drv_pay", name="rt_drv_marks")
    marks = pred  # a SecureSeries of the predictions, one per row of the root
    assert int(marks[marks > 1.5].count().collect()) == 100  # ids >= 100, through the predictions
    pay = analyst.dataframe("rt_drv_pay")
    assert int(pay.salary.count().collect()) == 200  # every row of the root
    with pytest.raises(mn.PolicyViolation, match="differencing"):
        rest = int(marks[(marks < 0.5) | (marks > 1.5)].count().collect())  # every row but id 7
        assert rest != 199


def test_a_replaced_dataset_with_more_rows_keeps_a_working_and_protective_history(lab: dict[str, Any]) -> None:
    """The owner replaces a dataset with one row appended; the guard history of its analysts stays.

    The old releases' records are over 40 rows, the new ones over 41: comparing them failed every later query of
    the analyst on that dataset (a ValueError, "evaluating the plan failed"). Now positions are compared as they
    are: the appended row is one no old release held, so "sum of all rows" before and after (their difference is
    the new row's value) is refused, and any query far from the old releases is answered.
    """
    owner, analyst = lab["owner"], lab["analyst"]
    policy = mn.DataPolicy(min_group_size=5)
    owner.upload(pd.DataFrame({"x": np.arange(40, dtype=np.int64)}), "rt_drv_grow", policy=policy, replace=True)
    assert int(analyst.dataframe("rt_drv_grow").x.sum().collect()) == sum(range(40))
    grown = pd.DataFrame({"x": np.append(np.arange(40, dtype=np.int64), 777_777)})
    owner.upload(grown, "rt_drv_grow", policy=policy, replace=True)
    sdf = analyst.dataframe("rt_drv_grow")
    assert int(sdf[sdf.x >= 20].x.count().collect()) == 21
    with pytest.raises(mn.PolicyViolation, match="differencing"):
        total = int(sdf.x.sum().collect())
        assert total - sum(range(40)) != 777_777
