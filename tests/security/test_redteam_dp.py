"""Red team, session 7: the DP budget and the failure oracle against a hostile analyst, on a real kernel over TLS.

- **Failure oracle.** A DP query that fails before its charge costs nothing, so whether it fails must not depend
  on one record. Session 6 closed elementwise failures (``frame_values._row_isolated``); here the failure is moved
  to a step that is not elementwise: a NaN made from the target row (``d / d`` with ``d = salary - t``) turned into
  a nullable boolean (a missing mask value fails pandas' filter), a nullable integer, or a mixed-type merge key.
  Each query, on either side of the target, is a noisy release (the stand-ins keep the row's own value missing).
- **Derived datasets.** A chain of predictions (a prediction of a prediction) is charged to the root, and a delete
  and re-upload of the root by its owner refunds nothing (the ledger is keyed by the root's name).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, cast

import numpy as np
import pandas as pd
import pytest

import mesatee_notebook as mn
from tests.conftest import KernelProc
from tests.security.conftest import TARGET, salary_rows

DP = mn.DP(epsilon=1.0, bounds={"salary": (0, 250_000)}, query_epsilon=0.05)


@pytest.fixture(scope="module")
def lab(kernel: KernelProc, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("rt_dp7")
    policy = cast("mn.Policy", kernel.policy())
    owner = mn.connect(kernel.url, policy=policy, identity=root / "owner")
    analyst = mn.connect(kernel.url, policy=policy, identity=root / "analyst")
    owner.upload(salary_rows(300, seed=7), "rt_dp7_rows", policy=mn.DataPolicy(privacy=DP), replace=True)
    own = pd.DataFrame({"k": ["a", "b"], "v": [1.0, 2.0]})
    analyst.upload(own, "rt_dp7_mine", replace=True)
    yield {"owner": owner, "analyst": analyst, "kernel": kernel}
    for s in (owner, analyst):
        s.close()


def _outcome(query: Any) -> str:
    try:
        return type(query.collect(epsilon=0.01)).__name__
    except mn.MesateeError as exc:
        return f"{type(exc).__name__}: {exc}"


def test_a_failure_past_the_elementwise_step_is_no_oracle(lab: dict[str, Any]) -> None:
    sdf = lab["analyst"].dataframe("rt_dp7_rows")
    mine = lab["analyst"].dataframe("rt_dp7_mine")

    def nan_at(t: int) -> Any:
        d = sdf.salary - t
        return d / d  # NaN exactly for the rows whose salary is t

    attacks = {
        "nullable-mask": lambda t: sdf[nan_at(t).astype("boolean")].salary.count(),
        "nullable-int": lambda t: sdf.assign(salary=nan_at(t).astype("Int64")).salary.sum(),
        "mixed-key": lambda t: (
            sdf.assign(k=(sdf.salary == t).map({True: 1, False: "a"})).merge(mine, on="k").id.count()
        ),
    }
    for name, build in attacks.items():
        outcomes = {_outcome(build(t)) for t in (TARGET - 1, TARGET)}
        assert len(outcomes) == 1, f"{name}: the outcome depends on the target row: {outcomes}"
    log = (lab["kernel"].data_dir / "serve.log").read_text(errors="replace")
    assert "Traceback" not in log


def _model(analyst: mn.Session) -> Any:
    own = pd.DataFrame({"id": np.arange(100, dtype=np.int64), "salary": np.arange(100, dtype=np.int64) * 1000})
    own["y"] = (own.salary > 50_000).astype("float64")
    return analyst.gbdt.train(own, label="y", params={"objective": "reg:squarederror"}, num_boost_round=2)


def test_a_chain_of_derived_datasets_and_a_re_upload_share_the_roots_budget(lab: dict[str, Any]) -> None:
    owner, analyst = lab["owner"], lab["analyst"]
    owner.upload(salary_rows(300, seed=7), "rt_dp7_chain", policy=mn.DataPolicy(privacy=DP), replace=True)
    model = _model(analyst)
    first = model.predict("rt_dp7_chain", name="rt_dp7_p1")
    assert isinstance(first.count().collect(epsilon=0.6), mn.DPResult)  # charged to rt_dp7_chain
    own = pd.DataFrame({"prediction": np.linspace(0, 1, 50), "y": np.linspace(0, 1, 50) > 0.5})
    on_predictions = analyst.gbdt.train(own.astype({"y": "float64"}), label="y", num_boost_round=2)
    second = on_predictions.predict("rt_dp7_p1", name="rt_dp7_p2")  # a prediction of a prediction: the same root
    with pytest.raises(mn.PolicyViolation, match="budget"):
        second.count().collect(epsilon=0.6)
    owner.delete_dataset("rt_dp7_chain")
    rows = salary_rows(300, seed=7)
    owner.upload(rows, "rt_dp7_chain", policy=mn.DataPolicy(privacy=DP))  # deleted, then uploaded again
    again = analyst.dataframe("rt_dp7_chain")
    with pytest.raises(mn.PolicyViolation, match="budget"):
        again.salary.count().collect(epsilon=0.6)  # the 0.6 spent before the delete still counts
