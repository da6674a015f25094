"""Red team, session 6: the differencing guard between a cluster head and the service workers.

A plan that names a partitioned dataset runs in the head (``cluster/head.py`` routes it), with its own
``FrameEvaluator``; the others run in the general pool's workers. Each evaluator reads a (party, dataset)
guard history from sealed storage once and then keeps it in memory, and neither learns of the releases the
other records afterwards. An analyst who mixes its own partitioned dataset into a query of another party's
single-node dataset gets the query answered by the head against a stale history: the pair "sum of all
rows" (worker) and "sum of all rows but one" (head) is released, and their difference is that row's value.
Fixed: the head re-reads the party's sealed history before each check (``forget_party``), and after a head call
every service pool serves the party's next call as ``fresh``, so its worker re-reads it too.

Session 7: the same pair sent at once still passed (each evaluator's check and record were atomic only within
itself). Fixed: the supervisor holds one turn per party around every ``frame.collect``, whichever evaluator
serves it (``enclave/party_turns.py``).
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import pytest

import mesatee_notebook as mn
from tests.conftest import KernelProc, start_kernel, stop_kernel

from .conftest import Cluster

pytestmark = pytest.mark.slow

SECRET = 987_654


@pytest.fixture(scope="module")
def head(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KernelProc]:
    data_dir = tmp_path_factory.mktemp("rt_head")
    shutil.copytree(cluster.data_dir / "platform", data_dir / "platform")
    k = start_kernel(data_dir, "--cluster", cluster.url)
    yield k
    stop_kernel(k)


def test_the_head_and_the_workers_share_one_differencing_history(head: KernelProc, tmp_path: Path) -> None:
    policy = cast("mn.Policy", head.policy())
    with (
        mn.connect(head.url, policy=policy, identity=tmp_path / "owner") as owner,
        mn.connect(head.url, policy=policy, identity=tmp_path / "analyst") as analyst,
    ):
        data = pd.DataFrame({"id": np.arange(200, dtype=np.int64), "salary": np.arange(200, dtype=np.int64) + 1000})
        data.loc[7, "salary"] = SECRET
        owner.upload(data, "rt_payroll", policy=mn.DataPolicy(min_group_size=5), replace=True)
        mine = pd.DataFrame({"k": -np.arange(1, 41, dtype=np.int64), "v": np.ones(40)})  # matches no id
        analyst.upload(mine, "rt_mine_parts", partitions=2, replace=True)
        pay, parts = analyst.dataframe("rt_payroll"), analyst.dataframe("rt_mine_parts")

        def via_head(rows: Any) -> Any:  # naming a partitioned dataset sends the plan to the head
            return rows.merge(parts, left_on="id", right_on="k", how="left").salary.sum().collect()

        via_head(pay[pay.id >= 100])  # the head reads the (still short) history once
        total = int(pay.salary.sum().collect())  # a worker: every row
        with pytest.raises(mn.PolicyViolation, match="differencing"):
            rest = int(via_head(pay[pay.id != 7]))  # every row but one: the head must refuse it
            assert total - rest != SECRET


def test_a_head_call_and_a_worker_call_of_one_party_cannot_both_pass_the_guard(
    head: KernelProc, tmp_path: Path
) -> None:
    """Session 7: the same attack with the two calls at once (the check and the record were atomic per evaluator only).

    The worker's query is made slow (a merge with a large table of the analyst's own), the head's quick, and both are
    sent together: the worker, not yet told of the head's release, checks against its cached history; the head
    checks before the worker has recorded. Without one turn per party across the head and the workers
    (``enclave/party_turns.py``) both were released, and their difference was row 7's salary.
    """
    policy = cast("mn.Policy", head.policy())
    with (
        mn.connect(head.url, policy=policy, identity=tmp_path / "owner") as owner,
        mn.connect(head.url, policy=policy, identity=tmp_path / "analyst") as analyst,
        mn.connect(head.url, policy=policy, identity=tmp_path / "analyst") as analyst2,  # same key, second channel
    ):
        data = pd.DataFrame({"id": np.arange(200, dtype=np.int64), "salary": np.arange(200, dtype=np.int64) + 1000})
        data.loc[7, "salary"] = SECRET
        owner.upload(data, "rt_race_pay", policy=mn.DataPolicy(min_group_size=5), replace=True)
        mine = pd.DataFrame({"k": -np.arange(1, 41, dtype=np.int64), "v": np.ones(40)})  # matches no id
        analyst.upload(mine, "rt_race_parts", partitions=2, replace=True)
        big = pd.DataFrame({"k": np.arange(1_500_000, dtype=np.int64) % 200, "w": np.ones(1_500_000)})
        analyst.upload(big, "rt_race_big", replace=True)  # single-node: a merge with it runs in a worker, slowly
        pay = analyst.dataframe("rt_race_pay")
        pay.id[pay.id >= 100].count().collect()  # the worker now holds the party's (short) history in memory
        pay2, parts = analyst2.dataframe("rt_race_pay"), analyst2.dataframe("rt_race_parts")
        mybig = analyst.dataframe("rt_race_big")
        out: dict[str, Any] = {}

        def slow_worker() -> None:  # every row of the owner's data (each one many times), in a worker
            try:
                out["all"] = int(pay.merge(mybig, left_on="id", right_on="k").salary.sum().collect())
            except mn.PolicyViolation as exc:
                out["all"] = exc

        def quick_head() -> None:  # every row but row 7, in the head
            try:
                rows = pay2[pay2.id != 7]
                out["rest"] = int(rows.merge(parts, left_on="id", right_on="k", how="left").salary.sum().collect())
            except mn.PolicyViolation as exc:
                out["rest"] = exc

        worker = threading.Thread(target=slow_worker)
        worker.start()
        time.sleep(0.05)  # the worker's call is dispatched first (as not fresh: nothing told it of a head call)
        quick_head()
        worker.join(60)
        refused = [k for k, v in out.items() if isinstance(v, mn.PolicyViolation)]
        assert refused, f"both released: their difference is row 7's salary ({out['all']} vs {out['rest']})"
        assert all("differencing" in str(out[k]) for k in refused)


def test_a_name_reused_as_a_derived_dataset_is_charged_to_its_root_on_the_head(
    head: KernelProc, tmp_path: Path
) -> None:
    """Session 7: the head remembered each name's budget root for its whole life (its store context never changes).

    An analyst's first name ``X`` is a DP dataset of its own (a second key's); the head resolves X's root as X. The
    second key deletes X, and the analyst names a prediction over the victim's DP dataset ``X``: its root is the
    victim's dataset, whose budget the analyst has spent. A query of X that the head serves (X merged with the
    analyst's partitioned table) was charged to X's old ledger, with budget left: the victim's budget escaped.
    """
    policy = cast("mn.Policy", head.policy())
    dp = mn.DataPolicy(privacy=mn.DP(epsilon=1.0, bounds={"salary": (0, 250_000)}, query_epsilon=0.1))
    with (
        mn.connect(head.url, policy=policy, identity=tmp_path / "victim") as victim,
        mn.connect(head.url, policy=policy, identity=tmp_path / "analyst") as analyst,
        mn.connect(head.url, policy=policy, identity=tmp_path / "accomplice") as accomplice,
    ):
        rows = pd.DataFrame({"id": np.arange(200, dtype=np.int64), "salary": np.arange(200, dtype=np.int64) + 1000})
        victim.upload(rows, "rt_rx_victim", policy=dp, replace=True)
        accomplice.upload(rows, "rt_rx_name", policy=dp, replace=True)
        parts = pd.DataFrame({"k": -np.arange(1, 41, dtype=np.float64), "v": np.ones(40)})  # matches no key
        analyst.upload(parts, "rt_rx_parts", partitions=2, replace=True)
        mine = analyst.dataframe("rt_rx_parts")
        assert isinstance(analyst.dataframe("rt_rx_victim").salary.count().collect(epsilon=1.0), mn.DPResult)
        named = analyst.dataframe("rt_rx_name")
        via_head = named.merge(mine, left_on="id", right_on="k", how="left").salary.count()
        assert isinstance(via_head.collect(epsilon=0.1), mn.DPResult)  # the head resolves rt_rx_name's root
        accomplice.delete_dataset("rt_rx_name")
        own = pd.DataFrame({"id": np.arange(50, dtype=np.int64), "salary": np.arange(50, dtype=np.int64)})
        own["y"] = (own.id % 2).astype("float64")
        model = analyst.gbdt.train(own, label="y", num_boost_round=2)
        model.predict("rt_rx_victim", name="rt_rx_name")  # the same name, now over the victim's rows
        reused = analyst.dataframe("rt_rx_name")
        again = reused.merge(mine, left_on="prediction", right_on="k", how="left").prediction.count()
        with pytest.raises(mn.PolicyViolation, match="budget"):
            again.collect(epsilon=0.5)  # the victim's budget is spent: refused, whichever evaluator serves it


def test_two_analysts_charging_one_cap_at_once_through_the_head_and_a_worker_stay_under_it(
    head: KernelProc, tmp_path: Path
) -> None:
    """The owner's cap over all analysts (``total_epsilon``) is charged by two evaluators, in two processes, at once.

    The turn per party does not serialise two parties; the ledger's *write, then verify* does: at most one of two
    charges that together pass the cap is kept, whichever evaluator makes it (``enclave/dp.py``).
    """
    policy = cast("mn.Policy", head.policy())
    dp = mn.DP(epsilon=1.0, total_epsilon=1.0, bounds={"salary": (0, 250_000)})
    with (
        mn.connect(head.url, policy=policy, identity=tmp_path / "owner") as owner,
        mn.connect(head.url, policy=policy, identity=tmp_path / "a") as a,
        mn.connect(head.url, policy=policy, identity=tmp_path / "b") as b,
    ):
        rows = pd.DataFrame({"id": np.arange(200, dtype=np.int64), "salary": np.arange(200, dtype=np.int64) + 1000})
        owner.upload(rows, "rt_cap_rows", policy=mn.DataPolicy(privacy=dp), replace=True)
        parts = pd.DataFrame({"k": -np.arange(1, 41, dtype=np.int64), "v": np.ones(40)})
        a.upload(parts, "rt_cap_parts", partitions=2, replace=True)
        pa, pb, mine = a.dataframe("rt_cap_rows"), b.dataframe("rt_cap_rows"), a.dataframe("rt_cap_parts")
        out: dict[str, Any] = {}

        def run(key: str, query: Any) -> None:
            try:
                out[key] = query.collect(epsilon=0.6)
            except mn.PolicyViolation as exc:
                out[key] = exc

        threads = [
            threading.Thread(
                target=run, args=("head", pa.merge(mine, left_on="id", right_on="k", how="left").salary.count())
            ),
            threading.Thread(target=run, args=("worker", pb.salary.count())),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        released = [k for k, v in out.items() if isinstance(v, mn.DPResult)]
        assert len(out) == 2 and len(released) <= 1, out
        assert all("budget" in str(v) for v in out.values() if isinstance(v, mn.PolicyViolation))
