"""The differencing guard's history is sealed: a kernel restart does not reset a party's release budget."""

from __future__ import annotations

import pandas as pd
import pytest

import mesatee_notebook as mn
from tests.conftest import start_kernel, stop_kernel


@pytest.mark.slow
def test_differencing_guard_survives_a_restart(tmp_path):
    data_dir = tmp_path / "k"
    df = pd.DataFrame({"id": range(40), "g": ["a", "b"] * 20, "x": range(40)})
    k = start_kernel(data_dir)
    try:
        owner = mn.connect(k.url, policy=k.policy(), identity=tmp_path / "owner")
        owner.upload(df, "people", policy=mn.DataPolicy(min_group_size=10, allow_rows=False))
        analyst = mn.connect(k.url, policy=k.policy(), identity=tmp_path / "analyst")
        sdf = analyst.dataframe("people")
        first = sdf.groupby("g").agg(n=("x", "size")).collect()
        assert first["n"].tolist() == [20, 20]
        owner.close()
        analyst.close()
    finally:
        stop_kernel(k)
    k2 = start_kernel(data_dir)
    try:
        analyst = mn.connect(k2.url, policy=k2.policy(), identity=tmp_path / "analyst")
        sdf = analyst.dataframe("people")
        with pytest.raises(mn.PolicyViolation, match="differencing"):
            sdf[sdf.id != 5].groupby("g").agg(n=("x", "size")).collect()
        analyst.close()
    finally:
        stop_kernel(k2)
