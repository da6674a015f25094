"""Red team, session 6: a hostile analyst against the SecureDataFrame's release rules, on a real kernel over TLS.

Each test is one attack that worked (the hole's regression test) or a cheap pin of a guarantee the attack
could not break. The target is the salary (123457) of ``id == 7`` in ``tests/frames/test_dp_attacks.staff``.
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
from tests.frames.test_dp_attacks import POLICY, TARGET, staff


class _Lab:
    def __init__(self, kernel: KernelProc, root: Path) -> None:
        self.kernel = kernel
        self.root = root
        self.policy = cast("mn.Policy", kernel.policy())
        self.owner = mn.connect(kernel.url, policy=self.policy, identity=root / "owner")
        data = staff()
        data["bonus"] = (data.salary / 10).astype("float64")
        data.loc[7, "bonus"] = np.nan  # the one missing value
        self.owner.upload(data, "rt_dp_staff", policy=POLICY, replace=True)
        self.sessions: list[mn.Session] = [self.owner]

    def attacker(self, name: str, dataset: str = "rt_dp_staff") -> Any:
        s = mn.connect(self.kernel.url, policy=self.policy, identity=self.root / name)
        self.sessions.append(s)
        return s.dataframe(dataset)


@pytest.fixture(scope="module")
def lab(kernel: KernelProc, tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Lab]:
    lab = _Lab(kernel, tmp_path_factory.mktemp("rt_frames"))
    yield lab
    for s in lab.sessions:
        s.close()


def _no_traceback_in_log(kernel: KernelProc) -> None:
    log = (kernel.data_dir / "serve.log").read_text(errors="replace")
    assert "Traceback" not in log


def test_a_row_that_cannot_be_computed_is_no_oracle_in_dp_mode(lab: _Lab) -> None:
    """``2 ** (salary - t)`` raised for integer salaries below ``t``: success or error told one record's bit exactly.

    A binary search of ~18 such DP queries at a tiny epsilon each recovered the salary exactly, past any noise.
    In DP mode a row an elementwise op cannot compute now gets a stand-in value (its own row only), so both
    sides of the target answer alike: a noisy release.
    """
    sdf = lab.attacker("pow_oracle")
    one = sdf[sdf.id == 7]
    outcomes = []
    for threshold in (TARGET - 1, TARGET + 1):  # below: every exponent >= 0; above: negative for the target
        query = one.assign(salary=2 ** (one.salary - threshold)).salary.count()
        outcomes.append(type(query.collect(epsilon=0.01)).__name__)
    assert outcomes == ["DPResult", "DPResult"]
    # a cast that fails on the one missing value (IntCastingNaNError) is no oracle either
    res = sdf.assign(age=sdf.bonus.astype("int64")).age.sum().collect(epsilon=0.01)
    assert isinstance(res, mn.DPResult)
    _no_traceback_in_log(lab.kernel)


def _categories(value: Any) -> set[str]:
    out: set[str] = set()
    frame = value.to_frame() if hasattr(value, "to_frame") and not hasattr(value, "columns") else value
    for idx in [frame.index, *(frame.index.levels if hasattr(frame.index, "levels") else [])]:
        if hasattr(idx, "categories"):
            out |= {str(c) for c in idx.categories}
    for c in frame.columns:
        if hasattr(frame[c], "cat"):
            out |= {str(x) for x in frame[c].cat.categories}
    return out


def test_released_categorical_keys_carry_only_released_categories(lab: _Lab) -> None:
    """A category key's released groups carried every category of the column, released or not.

    The one record of ``tiny_village`` was suppressed (threshold mode) or not selected (DP partition selection),
    yet its name came back in the result's categories: whether a record with that value exists leaked.
    """
    data = staff()
    data["city"] = pd.Series([f"c{i % 5}" for i in range(len(data))])
    data.loc[7, "city"] = "tiny_village"
    data["city"] = data["city"].astype("category")
    lab.owner.upload(data, "rt_cat_thr", policy=mn.DataPolicy(min_group_size=10, allow_rows=False), replace=True)
    dp = mn.DP(epsilon=3.0, delta=1e-6, bounds={"salary": (0, 250_000)}, unit="id")
    lab.owner.upload(data, "rt_cat_dp", policy=mn.DataPolicy(privacy=dp), replace=True)
    analyst = mn.connect(lab.kernel.url, policy=lab.policy, identity=lab.root / "cat_analyst")
    lab.sessions.append(analyst)
    thr, dpf = analyst.dataframe("rt_cat_thr"), analyst.dataframe("rt_cat_dp")
    released = [
        thr.groupby("city").agg(n=("salary", "size")).collect(),
        thr.groupby("city", as_index=False).agg(n=("salary", "size")).collect(),
        thr.groupby(["city", "region"]).agg(n=("salary", "size")).collect(),
        thr.city.value_counts().collect(),
        dpf.groupby("city").agg(n=("salary", "size")).collect(epsilon=0.5, delta=1e-7).value,
        dpf.value_counts("city").collect(epsilon=0.5, delta=1e-7).value,
    ]
    for value in released:
        assert len(value) >= 1
        assert "tiny_village" not in _categories(value), value
    _no_traceback_in_log(lab.kernel)


def test_dp_groups_do_not_come_in_the_order_of_the_records(lab: _Lab) -> None:
    """``groupby(sort=False)`` released the selected keys in the order they first occur in the rows.

    That order is one record's (here row 0's region) and moved with it, whatever the noise: two datasets that
    differ in one record gave two orders. Released keys now come in key order.
    """
    dp = mn.DP(epsilon=3.0, delta=1e-6, bounds={"salary": (0, 250_000)}, unit="id")
    orders = []
    for first in ("west", "east"):
        data = staff()
        data.loc[0, "region"] = first
        lab.owner.upload(data, f"rt_order_{first}", policy=mn.DataPolicy(privacy=dp), replace=True)
        sdf = lab.attacker(f"order_{first}", f"rt_order_{first}")
        res = sdf.groupby("region", sort=False).agg(n=("salary", "size")).collect(epsilon=1.0, delta=1e-7)
        assert set(res.value.index) == {"east", "north", "south", "west"}
        orders.append(list(res.value.index))
    assert orders[0] == orders[1]
