"""GBDT training on another party's data through an approved job (issue 6), against a real kernel.

Analyst A trains on dataset D owned by B without code access: B approves the exact job spec, A gets a model handle
(evaluate/predict on A's data), and exporting the model waits for B's release. Every refusal is a PolicyViolation
and is in the audit log.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import pytest
import xgboost as xgb

import mesatee_notebook as mn
from mesatee_notebook.remote.ml import RemoteModel
from tests.conftest import KernelProc

FEATURES = ["x0", "x1", "x2", "x3"]
PARAMS = {"objective": "binary:logistic", "max_depth": 3, "eta": 0.3, "seed": 7, "tree_method": "hist"}
ROUNDS = 20


def frame(rows: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(rng.normal(size=(rows, len(FEATURES))), columns=FEATURES)
    df["y"] = ((df.x0 + df.x1**2 + rng.normal(scale=0.3, size=rows)) > 1).astype(int)
    df["ssn"] = rng.integers(0, 10**9, size=rows)
    return df


class Parties:
    def __init__(self, kernel: KernelProc, root: Path) -> None:
        policy = cast("mn.Policy", kernel.policy())
        self.a = mn.connect(kernel.url, policy=policy, identity=root / "a")
        self.b = mn.connect(kernel.url, policy=policy, identity=root / "b")
        self.c = mn.connect(kernel.url, policy=policy, identity=root / "c")
        self.data = frame(600, 0)
        self.dataset = f"churn_{uuid.uuid4().hex[:8]}"
        self.b.upload(self.data, self.dataset, policy=mn.DataPolicy(min_group_size=20, hidden_columns=("ssn",)))

    def close(self) -> None:
        for s in (self.a, self.b, self.c):
            s.close()

    def create(self, name: str, *, owner: str | None = None, **params: Any) -> Any:
        return self.a.jobs.create(
            name,
            kind="gbdt.train",
            inputs={"data": {"dataset": self.dataset, "owner": owner or self.b.party_id}},
            params={"label": "y", "params": PARAMS, "num_boost_round": ROUNDS, **params},
            receivers=[self.a.party_id],
        )


@pytest.fixture(scope="module")
def parties(kernel: KernelProc, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Parties]:
    p = Parties(kernel, tmp_path_factory.mktemp("gbdt_job"))
    yield p
    p.close()


def job_name() -> str:
    return f"train-churn-{uuid.uuid4().hex[:8]}"


def refusals(session: Any, job_id: str) -> list[str]:
    return [
        str(e["details"].get("reason"))
        for e in session.audit()
        if e.get("kind") == "refusal" and (e.get("details") or {}).get("job_id") == job_id
    ]


def test_train_on_another_partys_data_through_an_approved_job(parties: Parties) -> None:
    a, b, name = parties.a, parties.b, job_name()
    created = parties.create(name)
    assert created.state == "created" and created.missing_approvals == [b.party_id]

    # B sees exactly what it approves: the dataset, the label, the parameters, the receiver, the digest
    seen = b.jobs.status(name)
    assert seen.spec_digest == created.spec_digest and seen.receivers == [a.party_id]
    assert seen.info["params"]["datasets"] == {"data": {"dataset": parties.dataset}}
    assert seen.info["params"]["label"] == "y" and seen.info["params"]["params"] == PARAMS
    done = b.jobs.approve(name, spec_digest=seen.spec_digest)
    assert done.state == "done", done.error

    model = a.jobs.result(name)
    assert isinstance(model, RemoteModel) and model.last_receipt is not None
    assert model.info["trainer"] == a.party_id and model.info["data_owners"] == [b.party_id]
    assert model.features == FEATURES and not model.released  # the hidden column is never read

    # A's own data: predictions equal local xgboost on the same data, params and seed
    train = parties.data
    booster = xgb.train(
        PARAMS,
        xgb.DMatrix(train[FEATURES].to_numpy(dtype=np.float32), label=train["y"].to_numpy(), feature_names=FEATURES),
        num_boost_round=ROUNDS,
    )
    mine = frame(300, 1)
    want = booster.inplace_predict(mine[FEATURES].to_numpy(dtype=np.float32))
    np.testing.assert_allclose(model.predict(mine[FEATURES], engine="xgboost"), want, rtol=0, atol=1e-6)
    metrics = model.evaluate(mine[[*FEATURES, "y"]])
    assert metrics["rows"] == len(mine) and 0.5 < metrics["auc"] <= 1.0

    # export waits for B's release
    with pytest.raises(mn.PolicyViolation, match="not released"):
        model.export()
    with pytest.raises(mn.PolicyViolation, match="only a party whose data trained"):
        a.gbdt.release(model)
    b.gbdt.release(model.id)
    assert model.refresh().released
    exported = xgb.Booster()
    exported.load_model(bytearray(model.export()))
    np.testing.assert_allclose(exported.inplace_predict(mine[FEATURES].to_numpy(dtype=np.float32)), want, atol=1e-6)

    entries = b.audit()
    jid = created.job_id
    mine_entries = [e for e in entries if (e.get("details") or {}).get("job_id") == jid]
    kinds = {(e.get("kind"), (e.get("details") or {}).get("event")) for e in mine_entries}
    assert {("job", "created"), ("upload", None), ("approval", None), ("result", "done")} <= kinds
    assert any((e.get("details") or {}).get("service") == "gbdt.train" for e in mine_entries)
    assert any(e.get("kind") == "refusal" and (e.get("details") or {}).get("model") == model.id for e in entries)


def test_refusals_are_policy_violations_and_audited(parties: Parties) -> None:
    a, b, c, name = parties.a, parties.b, parties.c, job_name()
    job_id = parties.create(name).job_id

    # no result before B approves
    with pytest.raises(mn.PolicyViolation, match="no result"):
        a.jobs.result(name)
    # an approval for a different spec, and approvals by parties who own no input
    with pytest.raises(mn.PolicyViolation, match="digest"):
        b.jobs.approve(name, spec_digest="0" * 64)
    with pytest.raises(mn.PolicyViolation, match="not a party"):
        c.jobs.approve(name)
    with pytest.raises(mn.PolicyViolation, match="owns no input"):
        c.call("job.approve", {"job": name, "spec_digest": b.jobs.status(name).spec_digest})
    with pytest.raises(mn.PolicyViolation, match="owns no input"):
        a.call("job.submit_dataset", {"job": name, "spec_digest": b.jobs.status(name).spec_digest})
    assert b.jobs.status(name).state == "created"

    b.jobs.approve(name)
    for other in (b, c):  # only the receiver gets the result
        with pytest.raises(mn.PolicyViolation, match="not a receiver"):
            other.jobs.result(name)
    assert isinstance(a.jobs.result(name), RemoteModel)
    reasons = refusals(b, job_id)
    for words in ("no result", "digest", "not a party", "owns no input", "not a receiver"):
        assert any(words in r for r in reasons), (words, reasons)

    # a job that names someone else as the dataset's owner: that party cannot put B's dataset in
    for claimed_by, approver in ((c.party_id, c), (a.party_id, a)):
        claim = job_name()
        if approver is a:  # the creator owns the input and approves at creation: refused there
            with pytest.raises(mn.PolicyViolation, match="only a dataset's owner"):
                parties.create(claim, owner=claimed_by)
        else:
            parties.create(claim, owner=claimed_by)
            with pytest.raises(mn.PolicyViolation, match="only a dataset's owner"):
                approver.jobs.approve(claim)
        status = a.jobs.status(claim)
        assert status.state != "done" and status.missing_inputs == ["data"]
        assert any("only a dataset's owner" in r for r in refusals(approver, status.job_id))


def test_a_model_that_would_read_a_hidden_column_is_refused(parties: Parties) -> None:
    a, b, name = parties.a, parties.b, job_name()
    parties.create(name, columns=[*FEATURES, "ssn", "y"])
    status = b.jobs.approve(name)
    assert status.state == "failed" and "hidden column(s) ssn" in str(status.error)
    with pytest.raises(mn.PolicyViolation, match="failed"):
        a.jobs.result(name)
