"""SecureDataFrame end to end: real kernel processes, real party identities, the signed audit log.

Three parties on the session's kernel: the *owner* uploads, the *analyst* explores through the
proxy, the *coder* is given code access by the owner. Every collect comes back with a receipt
that verifies offline and names the service and the party; every refusal is a PolicyViolation
and is in the audit log that both the owner and the analyst can read and verify.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import pytest
from _frames_support import patients

import mesatee_notebook as mn
from mesatee_notebook.attestation.measurement import canonical_json
from mesatee_notebook.remote.frame import SecureDataFrame
from tests.conftest import KernelProc, start_kernel, stop_kernel

POLICY = mn.DataPolicy(min_group_size=10, hidden_columns=("ssn",), allow_rows=False)
STRICT = mn.DataPolicy(min_group_size=10, hidden_columns=("ssn",), allow_rows=False, small_group="refuse")


class Parties:
    """Sessions of three parties on one kernel, and the datasets they uploaded."""

    def __init__(self, kernel: KernelProc, root: Path) -> None:
        self.kernel = kernel
        self.policy = cast("mn.Policy", kernel.policy())
        self.owner = mn.connect(kernel.url, policy=self.policy, identity=root / "owner")
        self.analyst = mn.connect(kernel.url, policy=self.policy, identity=root / "analyst")
        self.coder = mn.connect(kernel.url, policy=self.policy, identity=root / "coder")
        self.data = patients()
        self.data.loc[7, "region"] = "island"  # one person alone in a region
        self.visits = pd.DataFrame(
            {"id": np.arange(0, 400, 2, dtype=np.int64).repeat(3), "cost": np.arange(600, dtype=np.float64) % 97}
        )

    def close(self) -> None:
        for s in (self.owner, self.analyst, self.coder):
            s.close()


@pytest.fixture(scope="module")
def parties(kernel: KernelProc, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Parties]:
    p = Parties(kernel, tmp_path_factory.mktemp("parties"))
    p.owner.upload(p.data, "e2e_patients", policy=POLICY)
    p.owner.upload(p.data, "e2e_strict", policy=STRICT)
    p.owner.upload(p.visits, "e2e_visits", policy=mn.DataPolicy(min_group_size=10))
    mine = pd.DataFrame({"id": np.full(20, 7, dtype=np.int64), "tag": np.arange(20)})
    p.analyst.upload(mine, "e2e_mine", policy=mn.DataPolicy(min_group_size=0, allow_rows=True))
    yield p
    p.close()


def verified_collect(lazy: Any, session: mn.Session, policy: mn.Policy) -> Any:
    """Collect, then check the receipt offline: signed by the attested kernel, for this service and party."""
    value, receipt = lazy.collect_with_receipt()
    assert isinstance(receipt, mn.Receipt) and receipt is session.last_receipt
    checked = mn.verify_receipt(receipt.to_json(), policy)  # offline: from its JSON text alone
    assert checked.predicate["service"] == "frame.collect"
    assert checked.predicate["party"] == session.party_id
    call = {"service": "frame.collect", "args": {"plan": lazy.plan_json()}}
    assert checked.predicate["code"]["sha256"] == hashlib.sha256(canonical_json(call)).hexdigest()  # this plan
    return value


def last_seq(session: mn.Session) -> int:
    return max((int(e["seq"]) for e in session.audit()), default=-1)


def refusals_since(session: mn.Session, seq: int, party: str) -> list[dict[str, Any]]:
    return [e for e in session.audit() if e["seq"] > seq and e["kind"] == "refusal" and e["party"] == party]


def assert_refused_and_audited(parties: Parties, attack: Callable[[], Any], match: str) -> dict[str, Any]:
    """The attack raises PolicyViolation; both the owner and the analyst see the refusal in the audit log."""
    seq = last_seq(parties.owner)
    with pytest.raises(mn.PolicyViolation, match=match):
        attack()
    by_owner = refusals_since(parties.owner, seq, parties.analyst.party_id or "")
    by_analyst = refusals_since(parties.analyst, seq, parties.analyst.party_id or "")
    assert len(by_owner) == 1 and by_owner == by_analyst
    event: dict[str, Any] = by_owner[0]["details"]
    assert event["outcome"] == "refused" and event["party"] == parties.analyst.party_id
    assert parties.owner.party_id in by_owner[0]["concerns"]
    return event


# -- what another party sees ---------------------------------------------------------------------------------


def test_schema_is_public_and_len_is_a_policy_checked_count(parties: Parties) -> None:
    sdf = parties.analyst.dataframe("e2e_patients")
    assert isinstance(sdf, SecureDataFrame)
    assert list(sdf.columns) == list(parties.data.columns)
    assert dict(sdf.dtypes.astype(str)) == dict(parties.data.dtypes.astype(str))
    assert "ssn" in sdf.schema.hidden
    assert len(sdf) == 400
    assert parties.analyst.last_receipt is not None
    checked = mn.verify_receipt(parties.analyst.last_receipt, parties.policy)
    assert checked.predicate["service"] == "frame.collect" and checked.predicate["party"] == parties.analyst.party_id
    listed = {d["name"]: d for d in parties.analyst.datasets()}
    assert listed["e2e_patients"]["owner"] == parties.owner.party_id
    assert listed["e2e_patients"]["hidden"] == ["ssn"] and listed["e2e_patients"]["rows"] == 400


def test_the_issue_query_gives_pandas_answer_with_a_receipt(parties: Parties) -> None:
    sdf = parties.analyst.dataframe("e2e_patients")
    q = (
        sdf[sdf.age > 40]
        .assign(bmi=sdf.weight / (sdf.height**2))
        .groupby("region")
        .agg(n=("bmi", "size"), mean_bmi=("bmi", "mean"))
    )
    got = verified_collect(q, parties.analyst, parties.policy)
    df = parties.data
    want = (
        df[df.age > 40]
        .assign(bmi=df.weight / df.height**2)
        .groupby("region")
        .agg(n=("bmi", "size"), mean_bmi=("bmi", "mean"))
    )
    want = want[want.n >= 10]
    pd.testing.assert_frame_equal(got, want)
    entry = next(e for e in reversed(parties.analyst.audit()) if e["kind"] == "query")
    assert entry["details"]["plan_sha256"] == hashlib.sha256(q.plan_json().encode()).hexdigest()
    assert entry["details"]["outcome"] == "released"


def test_describe_value_counts_corr(parties: Parties) -> None:
    sdf, df = parties.analyst.dataframe("e2e_patients"), parties.data
    with pytest.raises(mn.PolicyViolation, match="record's exact value"):
        sdf.describe().collect()  # min, quartiles and max are records' values
    desc = verified_collect(parties.owner.dataframe("e2e_patients").describe(), parties.owner, parties.policy)
    pd.testing.assert_frame_equal(desc, df.describe())
    counts = verified_collect(sdf.value_counts("region"), parties.analyst, parties.policy)
    assert "island" not in counts.index  # the one-person region is suppressed, not released
    pd.testing.assert_series_equal(counts, df.region.value_counts().drop("island"))
    corr = verified_collect(sdf.weight.corr(sdf.height), parties.analyst, parties.policy)
    assert corr == pytest.approx(df.weight.corr(df.height))


def test_merge_of_two_enclave_frames_stays_remote_and_only_aggregates_leave(parties: Parties) -> None:
    sdf, visits = parties.analyst.dataframe("e2e_patients"), parties.analyst.dataframe("e2e_visits")
    joined = sdf[["id", "region", "age"]].merge(visits, on="id")
    assert isinstance(joined, SecureDataFrame)  # lazy: nothing has been computed or sent
    assert list(joined.columns) == ["id", "region", "age", "cost"]
    got = verified_collect(
        joined.groupby("region").agg(n=("cost", "size"), total=("cost", "sum")), parties.analyst, parties.policy
    )
    df = parties.data[["id", "region", "age"]].merge(parties.visits, on="id")
    want = df.groupby("region").agg(n=("cost", "size"), total=("cost", "sum"))
    pd.testing.assert_frame_equal(got, want.drop("island", errors="ignore"))
    event = assert_refused_and_audited(parties, lambda: joined.head().collect(), "allow_rows=False")
    assert event["level"] == "rows" and sorted(event["datasets"]) == ["e2e_patients", "e2e_visits"]


# -- policy attacks: refused, and in the audit log ---------------------------------------------------------------


def test_group_of_size_one_is_refused_or_suppressed(parties: Parties) -> None:
    strict = parties.analyst.dataframe("e2e_strict")
    assert_refused_and_audited(
        parties, lambda: strict.groupby("region").agg(m=("income", "mean")).collect(), "fewer than 10 rows"
    )
    sdf = parties.analyst.dataframe("e2e_patients")  # small_group="suppress": released without the group
    res = parties.analyst.call("frame.collect", {"plan": sdf.groupby("region").agg(m=("income", "mean")).plan_json()})
    assert "island" not in res.values["result"].index and res.info["suppressed"] == 1


def test_filter_then_count_to_single_out_one_person(parties: Parties) -> None:
    sdf = parties.analyst.dataframe("e2e_patients")
    event = assert_refused_and_audited(parties, lambda: len(sdf[sdf.id == 7]), "fewer than 10 rows")
    assert event["root_op"] == "count_rows"
    assert_refused_and_audited(parties, lambda: sdf[sdf.id == 7].income.mean().collect(), "fewer than 10 rows")


def test_head_on_a_rows_forbidden_frame(parties: Parties) -> None:
    sdf = parties.analyst.dataframe("e2e_patients")
    event = assert_refused_and_audited(parties, lambda: sdf.head().collect(), "allow_rows=False")
    assert event["root_op"] == "head" and event["level"] == "rows"


def test_a_join_that_would_reveal_rows(parties: Parties) -> None:
    sdf, mine = parties.analyst.dataframe("e2e_patients"), parties.analyst.dataframe("e2e_mine")
    joined = mine.merge(sdf, on="id")  # 20 rows of the analyst's own, all about patient 7
    assert_refused_and_audited(parties, lambda: joined[["tag", "income"]].collect(), "allow_rows=False")
    assert_refused_and_audited(parties, lambda: joined.income.mean().collect(), "fewer than 10 rows")


@pytest.mark.parametrize(
    ("build", "nodes"),
    [
        (
            lambda s: s.rename(columns={"ssn": "x"}),
            {
                "r": {"op": "rename", "args": {"input": "s", "columns": {"ssn": "alias"}}},
                "root": {
                    "op": "value_counts",
                    "args": {
                        "input": "r",
                        "subset": ["alias"],
                        "normalize": False,
                        "sort": True,
                        "ascending": False,
                        "dropna": True,
                    },
                },
            },
        ),
        (
            lambda s: s.assign(x=s["ssn"]),
            {
                "c": {"op": "column", "args": {"input": "s", "name": "ssn"}},
                "a": {"op": "assign", "args": {"input": "s", "columns": [["copy", {"ref": "c"}]]}},
                "root": {"op": "select", "args": {"input": "a", "columns": ["copy", "age"]}},
            },
        ),
    ],
    ids=["rename", "assign"],
)
def test_hidden_column_through_rename_or_assign(
    parties: Parties, build: Callable[[Any], Any], nodes: dict[str, Any]
) -> None:
    sdf = parties.analyst.dataframe("e2e_patients")
    seq = last_seq(parties.owner)
    with pytest.raises(mn.PolicyViolation, match="ssn"):
        build(sdf)  # the client refuses on the line it is written, nothing is sent ...
    assert refusals_since(parties.owner, seq, parties.analyst.party_id or "") == []
    plan = json.dumps(
        {"version": 1, "root": "root", "nodes": {"s": {"op": "source", "args": {"name": "e2e_patients"}}, **nodes}}
    )
    event = assert_refused_and_audited(  # ... and a hand-written plan is refused by the enclave, and logged
        parties, lambda: parties.analyst.call("frame.collect", {"plan": plan}), "hides"
    )
    assert event["plan_sha256"] == hashlib.sha256(plan.encode()).hexdigest()


def test_the_owner_is_exempt(parties: Parties) -> None:
    sdf = parties.owner.dataframe("e2e_patients")
    got = verified_collect(sdf[sdf.id == 7][["id", "ssn", "region"]], parties.owner, parties.policy)
    pd.testing.assert_frame_equal(got, parties.data.loc[[7], ["id", "ssn", "region"]])


# -- code cells ------------------------------------------------------------------------------------------------


def test_code_cells_reach_a_dataset_only_with_code_access(parties: Parties) -> None:
    code = "df = mesatee.dataframe('e2e_visits')\nfloat(df.cost.sum())"
    seq = last_seq(parties.owner)
    with pytest.raises(mn.PolicyViolation, match="code_access"):
        parties.coder.run(code)
    refused = refusals_since(parties.owner, seq, parties.coder.party_id or "")
    assert [e["details"]["reason"] for e in refused] == ["no code access"]
    policy = mn.DataPolicy(min_group_size=10, code_access=(parties.coder.party_id or "",))
    parties.owner.upload(parties.visits, "e2e_visits", policy=policy, replace=True)
    try:
        assert parties.coder.run(code).value == pytest.approx(parties.visits.cost.sum())
        released = [e for e in parties.owner.audit() if e["seq"] > seq and e["kind"] == "release"]
        assert [e["party"] for e in released] == [parties.coder.party_id]
        with pytest.raises(mn.PolicyViolation, match="code_access"):
            parties.analyst.run(code)  # code access is per party
    finally:
        parties.owner.upload(parties.visits, "e2e_visits", policy=mn.DataPolicy(min_group_size=10), replace=True)


def test_only_the_owner_may_replace_or_delete(parties: Parties) -> None:
    with pytest.raises(mn.PolicyViolation, match="belongs to another party"):
        parties.analyst.upload(parties.visits, "e2e_visits", replace=True)
    with pytest.raises(mn.PolicyViolation, match="only the owner"):
        parties.analyst.call("dataset.delete", {"name": "e2e_visits"})


# -- a restart keeps the datasets ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_datasets_survive_a_kernel_restart(tmp_path: Path) -> None:
    first = start_kernel(tmp_path / "data")
    try:
        owner = mn.connect(first.url, policy=cast("mn.Policy", first.policy()), identity=tmp_path / "owner")
        owner.upload(patients(), "kept", policy=POLICY)
        owner.close()
    finally:
        stop_kernel(first)
    second = start_kernel(tmp_path / "data")
    try:
        assert second.fingerprint == first.fingerprint and second.port != 0
        policy = cast("mn.Policy", second.policy())
        analyst = mn.connect(second.url, policy=policy, identity=tmp_path / "analyst")
        assert [d["name"] for d in analyst.datasets()] == ["kept"]
        sdf = analyst.dataframe("kept")
        assert verified_collect(sdf.income.sum(), analyst, policy) == pytest.approx(patients().income.sum())
        with pytest.raises(mn.PolicyViolation):
            sdf.head().collect()
        analyst.close()
    finally:
        stop_kernel(second)


def test_datasets_with_readers_are_unknown_to_everyone_else() -> None:
    """A dataset a job made for its receivers (``readers``) cannot be queried, or even found, by anyone else."""
    from mesatee_notebook.enclave.services import ServiceContext
    from mesatee_notebook.enclave.services.frames import SealedDatasets
    from mesatee_notebook.wire.codecs import encode_value

    data = b"".join(encode_value(pd.DataFrame({"x": [1, 2]})).parts)
    meta = {
        "name": "r",
        "owner": "job",
        "readers": ["alice"],
        "sha256": hashlib.sha256(data).hexdigest(),
        "policy": mn.DataPolicy().to_dict(),
    }
    blobs = {"datasets/r/meta": json.dumps(meta).encode(), "datasets/r/data": data}

    class Ctx:
        state: dict[str, Any] = {}

        def __init__(self, party: str) -> None:
            self.party = party

        def seal_get(self, name: str) -> bytes:
            return blobs[name]

    registry = SealedDatasets()
    registry.ctx = cast("ServiceContext", Ctx("alice"))
    assert registry["r"][0].x.tolist() == [1, 2]
    registry.ctx = cast("ServiceContext", Ctx("mallory"))
    with pytest.raises(KeyError):
        registry["r"]
