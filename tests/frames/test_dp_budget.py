"""The DP budget on a real kernel: in every receipt, shared by a party's sessions, sealed across restarts and deaths."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import mesatee_notebook as mn
from mesatee_notebook.attestation.measurement import canonical_json
from mesatee_notebook.wire.digest import payload_digest
from tests.conftest import KernelProc, start_kernel, stop_kernel
from tests.waiting import wait_dead

POLICY = mn.DataPolicy(
    privacy=mn.DP(epsilon=1.0, bounds={"x": (0, 100)}, query_epsilon=0.25, public_groups={"g": ["a", "b"]}),
    hidden_columns=("secret",),
)


def frame(n: int = 200) -> pd.DataFrame:
    rng = np.random.default_rng(3)
    return pd.DataFrame(
        {"x": rng.integers(0, 100, n), "g": rng.choice(["a", "b"], n), "secret": [f"s{i}" for i in range(n)]}
    )


def test_budget_is_in_every_receipt_and_runs_out_at_the_total(kernel: KernelProc, tmp_path: Path) -> None:
    policy = kernel.policy()
    owner = mn.connect(kernel.url, policy=policy, identity=tmp_path / "owner")
    analyst = mn.connect(kernel.url, policy=policy, identity=tmp_path / "analyst")
    try:
        owner.upload(frame(), "dp_budget", policy=POLICY)
        sdf = analyst.dataframe("dp_budget")
        assert sdf.privacy_budget().epsilon_remaining == 1.0
        left = []
        for _ in range(4):
            res = sdf.groupby("g").agg(m=("x", "mean")).collect()
            assert isinstance(res, mn.DPResult)
            checked = mn.verify_receipt(res.receipt.to_json(), policy)  # offline, from its JSON
            assert checked.predicate["party"] == analyst.party_id
            left.append(res.budget.epsilon_remaining)
            html = res._repr_html_()
            assert "privacy budget" in html and f"{res.budget.epsilon_remaining:.4g} left" in html
        assert left == pytest.approx([0.75, 0.5, 0.25, 0.0])
        with pytest.raises(mn.PolicyViolation, match="privacy budget exhausted"):
            sdf.x.sum().collect()
        with pytest.raises(mn.PolicyViolation, match="privacy budget exhausted"):
            sdf.x.sum().collect(epsilon=1e-6)  # not even a sliver more
        assert sdf.privacy_budget().epsilon_spent == pytest.approx(1.0)
        refusals = [e for e in analyst.audit() if e["kind"] == "refusal" and "budget" in e["details"].get("reason", "")]
        assert len(refusals) == 2
        # the owner's own queries are exact and free
        assert owner.dataframe("dp_budget").x.sum().collect() == int(frame().x.sum())
    finally:
        owner.close()
        analyst.close()


def test_receipt_info_carries_the_budget(kernel: KernelProc, tmp_path: Path) -> None:
    policy = kernel.policy()
    owner = mn.connect(kernel.url, policy=policy, identity=tmp_path / "owner")
    analyst = mn.connect(kernel.url, policy=policy, identity=tmp_path / "analyst")
    try:
        owner.upload(frame(), "dp_receipt", policy=POLICY)
        sdf = analyst.dataframe("dp_receipt")
        res = analyst.call("frame.collect", {"plan": sdf.x.mean().plan_json(), "epsilon": 0.1})
        budget = res.info["privacy_budget"]["dp_receipt"]
        assert budget["epsilon_spent"] == pytest.approx(0.1) and budget["epsilon_remaining"] == pytest.approx(0.9)
        assert res.info["dp"]["epsilon"] == 0.1
        assert res.info["dp"]["columns"]["value"]["mechanism"].startswith("discrete laplace")
        assert res.verified.subjects["info"] == payload_digest(canonical_json(res.info))  # signed
    finally:
        owner.close()
        analyst.close()


@pytest.mark.slow
def test_a_new_session_of_the_same_party_shares_the_ledger(kernel: KernelProc, tmp_path: Path) -> None:
    policy = kernel.policy()
    owner = mn.connect(kernel.url, policy=policy, identity=tmp_path / "owner")
    owner.upload(frame(), "dp_shared", policy=POLICY)
    first = mn.connect(kernel.url, policy=policy, identity=tmp_path / "analyst")
    second = mn.connect(kernel.url, policy=policy, identity=tmp_path / "analyst")  # same key, another session
    try:
        first.dataframe("dp_shared").x.mean().collect(epsilon=0.6)
        sdf2 = second.dataframe("dp_shared")
        assert sdf2.privacy_budget().epsilon_spent == pytest.approx(0.6)
        with pytest.raises(mn.PolicyViolation, match="privacy budget exhausted"):
            sdf2.x.mean().collect(epsilon=0.5)
        first.close()
        third = mn.connect(kernel.url, policy=policy, identity=tmp_path / "analyst")
        assert third.dataframe("dp_shared").privacy_budget().epsilon_remaining == pytest.approx(0.4)
        third.close()
    finally:
        owner.close()
        second.close()


def _service_worker_pid(kernel: KernelProc) -> int:
    import psutil

    info = json.loads((kernel.data_dir / "kernel.json").read_text())
    workers = [
        p for p in psutil.Process(info["pid"]).children()
        if p.status() != psutil.STATUS_ZOMBIE and "--service" in p.cmdline()
    ]  # fmt: skip
    assert len(workers) == 1
    return int(workers[0].pid)


@pytest.mark.slow
def test_the_ledger_survives_a_service_worker_death_and_a_restart(tmp_path: Path) -> None:
    data_dir = tmp_path / "k"
    k = start_kernel(data_dir)
    try:
        policy = k.policy()
        owner = mn.connect(k.url, policy=policy, identity=tmp_path / "owner")
        owner.upload(frame(), "dp_sealed", policy=POLICY)
        analyst = mn.connect(k.url, policy=policy, identity=tmp_path / "analyst")
        analyst.dataframe("dp_sealed").x.mean().collect(epsilon=0.3)
        worker = _service_worker_pid(k)
        os.kill(worker, signal.SIGKILL)
        wait_dead(worker)  # not a fixed 0.5 s: on a loaded machine it may not have died yet
        try:
            spent = analyst.dataframe("dp_sealed").privacy_budget().epsilon_spent
        except mn.MesateeError:  # the death noticed during that call: nothing released, ask again
            spent = analyst.dataframe("dp_sealed").privacy_budget().epsilon_spent
        assert spent == pytest.approx(0.3)  # a new worker reads the sealed ledger
        analyst.dataframe("dp_sealed").x.mean().collect(epsilon=0.3)
        owner.close()
        analyst.close()
    finally:
        stop_kernel(k)
    k2 = start_kernel(data_dir)
    try:
        analyst = mn.connect(k2.url, policy=k2.policy(), identity=tmp_path / "analyst")
        sdf = analyst.dataframe("dp_sealed")
        assert sdf.privacy_budget().epsilon_spent == pytest.approx(0.6)
        with pytest.raises(mn.PolicyViolation, match="privacy budget exhausted"):
            sdf.x.mean().collect(epsilon=0.5)
        analyst.close()
    finally:
        stop_kernel(k2)


@pytest.mark.slow
def test_party_view_lists_a_meter_per_dp_dataset(kernel: KernelProc, tmp_path: Path) -> None:
    from mesatee_notebook.remote.frame import budget_meters_html

    policy = kernel.policy()
    owner = mn.connect(kernel.url, policy=policy, identity=tmp_path / "owner")
    analyst = mn.connect(kernel.url, policy=policy, identity=tmp_path / "analyst")
    try:
        owner.upload(frame(), "dp_view", policy=POLICY)
        analyst.dataframe("dp_view").x.mean().collect(epsilon=0.2)
        budgets = {b.dataset: b for b in analyst.privacy_budgets()}
        assert budgets["dp_view"].epsilon_spent == pytest.approx(0.2)
        html = budget_meters_html(list(budgets.values()))
        assert html.count("class='mesatee-budget'") == len(budgets) and "dp_view" in html
        assert "0.8 left" in html
        # the attestation card's party view (what %mesatee attest shows this analyst)
        from mesatee_notebook.magics._magics import _budgets
        from mesatee_notebook.magics.display import AttestationCard

        card = AttestationCard(analyst.attestation, budgets=_budgets(analyst))
        assert "your privacy budgets" in card._repr_html_() and "0.8 left" in card._repr_html_()
        assert "privacy budget dp_view: spent epsilon 0.2 of" in repr(card)
        anonymous = mn.connect(kernel.url, policy=policy, identity=False)
        try:
            assert _budgets(anonymous) == []
        finally:
            anonymous.close()
    finally:
        owner.close()
        analyst.close()


def test_a_dp_dataset_cannot_leave_its_budget_through_a_psi_join(kernel: KernelProc, tmp_path: Path) -> None:
    """The join's result would be a new dataset with a fresh budget: refused until the ledger can follow it."""
    policy = kernel.policy()
    owner = mn.connect(kernel.url, policy=policy, identity=tmp_path / "owner")
    other = mn.connect(kernel.url, policy=policy, identity=tmp_path / "other")
    try:
        df = frame().assign(key=lambda d: d.index.astype("int64"))
        owner.upload(df, "dp_psi", policy=POLICY)
        owner.psi.create("dp_join", [owner.party_id, other.party_id], mode="join")
        with pytest.raises(mn.PolicyViolation, match="DP-mode policy in join mode"):
            owner.psi.submit("dp_join", dataset="dp_psi", column="key", value_columns=["x"])
        with pytest.raises(mn.PolicyViolation, match="DP-mode policy in join mode"):
            owner.psi.submit("dp_join", [1, 2, 3], values=pd.DataFrame({"x": [1, 2, 3]}), policy=POLICY)
    finally:
        owner.close()
        other.close()


def test_a_dp_policy_must_name_existing_columns(kernel: KernelProc, tmp_path: Path) -> None:
    owner = mn.connect(kernel.url, policy=kernel.policy(), identity=tmp_path / "owner")
    try:
        bad = mn.DataPolicy(privacy=mn.DP(epsilon=1.0, bounds={"salary": (0, 1)}, unit="person"))
        with pytest.raises(mn.EncodingError, match=r"\['person', 'salary'\]"):
            owner.upload(frame(), "dp_bad", policy=bad)
    finally:
        owner.close()
