"""Jobs: the pure state machine, its refusals, and persistence through sealed storage."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mesatee_notebook.attestation.audit_verify import verify_audit_log
from mesatee_notebook.enclave.audit import AuditLog
from mesatee_notebook.enclave.jobs import (
    ApproveJob,
    AuditAction,
    CancelJob,
    CreateJob,
    FetchResult,
    FinishJob,
    Job,
    JobInput,
    JobSpec,
    JobState,
    JobStore,
    NotifyParties,
    ReleaseResult,
    RunJob,
    StartJob,
    StopJob,
    SubmitInput,
    transition,
)
from mesatee_notebook.enclave.sealing import SealedStore
from mesatee_notebook.errors import EncodingError, NotFound, PolicyViolation

ALICE, BOB, CAROL, MALLORY = "a" * 64, "b" * 64, "c" * 64, "f" * 64
JID = "0123456789abcdef0123456789abcdef"
D1, D2 = hashlib.sha256(b"alice").hexdigest(), hashlib.sha256(b"bob").hexdigest()


def psi_spec() -> JobSpec:
    return JobSpec(
        job_id=JID,
        kind="psi",
        creator=ALICE,
        inputs=(JobInput("left", ALICE), JobInput("right", BOB)),
        receivers=(ALICE, CAROL),
        params={"mode": "cardinality"},
    )


def created() -> Job:
    return transition(None, CreateJob(psi_spec())).job


def approved() -> Job:
    job = created()
    digest = job.spec.digest()
    for ev in (
        SubmitInput(JID, ALICE, "left", D1),
        ApproveJob(JID, ALICE, digest),
        SubmitInput(JID, BOB, "right", D2),
        ApproveJob(JID, BOB, digest),
    ):
        job = transition(job, ev).job
    return job


def test_happy_path_states_and_actions() -> None:
    t = transition(None, CreateJob(psi_spec()))
    assert t.job.state is JobState.CREATED
    assert any(isinstance(a, NotifyParties) and a.parties == {BOB, CAROL} for a in t.actions)
    job = transition(t.job, SubmitInput(JID, ALICE, "left", D1)).job
    assert job.state is JobState.WAITING_FOR_INPUTS
    job = transition(job, ApproveJob(JID, ALICE, job.spec.digest())).job
    job = transition(job, SubmitInput(JID, BOB, "right", D2)).job
    assert job.state is JobState.WAITING_FOR_INPUTS and job.missing_approvals == [BOB]
    t = transition(job, ApproveJob(JID, BOB, job.spec.digest()))
    assert t.job.state is JobState.APPROVED
    assert RunJob(JID) in t.actions
    t = transition(t.job, StartJob(JID))
    assert t.job.state is JobState.RUNNING
    t = transition(t.job, FinishJob(JID, "ee" * 32))
    assert t.job.state is JobState.DONE
    t = transition(t.job, FetchResult(JID, CAROL))
    assert ReleaseResult(JID, CAROL, "ee" * 32) in t.actions
    assert any(isinstance(a, AuditAction) and a.kind == "release" for a in t.actions)


def test_approval_before_upload_also_gates() -> None:
    job = created()
    for party in (ALICE, BOB):
        job = transition(job, ApproveJob(JID, party, job.spec.digest())).job
    assert job.state is JobState.WAITING_FOR_INPUTS and job.missing_inputs == ["left", "right"]
    with pytest.raises(PolicyViolation, match="cannot start: it is waiting_for_inputs; missing inputs"):
        transition(job, StartJob(JID))


@pytest.mark.parametrize(
    ("job_factory", "event", "message"),
    [
        (lambda: approved(), SubmitInput(JID, ALICE, "left", D1), "already submitted input 'left'"),
        (
            lambda: transition(created(), SubmitInput(JID, ALICE, "left", D1)).job,
            SubmitInput(JID, ALICE, "left", D2),
            "already submitted input 'left'; an input cannot be replaced",
        ),
        (created, SubmitInput(JID, MALLORY, "left", D1), "is not a party to this job"),
        (created, SubmitInput(JID, BOB, "left", D1), "belongs to another party"),
        (created, SubmitInput(JID, CAROL, "right", D1), "belongs to another party"),
        (created, SubmitInput(JID, ALICE, "middle", D1), "has no input named 'middle'"),
        (created, ApproveJob(JID, CAROL, "00" * 32), "owns no input"),
        (created, ApproveJob(JID, ALICE, "00" * 32), "different job spec"),
        (approved, ApproveJob(JID, ALICE, psi_spec().digest()), "already approved"),
        (created, StartJob(JID), "cannot start"),
        (approved, FetchResult(JID, ALICE), "no result to release"),
        (created, CancelJob(JID, CAROL), "may not cancel"),
        (created, FinishJob(JID, "00" * 32), "not running"),
    ],
)
def test_refusals(job_factory: object, event: object, message: str) -> None:
    job = job_factory()  # type: ignore[operator]
    with pytest.raises(PolicyViolation, match=message) as info:
        transition(job, event)  # type: ignore[arg-type]
    assert info.value.details["job_id"] == JID
    assert JID in str(info.value)


def test_result_only_to_receivers() -> None:
    job = transition(transition(approved(), StartJob(JID)).job, FinishJob(JID, "ee" * 32)).job
    for outsider in (BOB, MALLORY):  # BOB owns an input but is not a receiver
        with pytest.raises(PolicyViolation, match="is not a receiver of this job's result"):
            transition(job, FetchResult(JID, outsider))
    assert transition(job, FetchResult(JID, ALICE)).job.released_to == {ALICE}


def test_cancel_rules() -> None:
    running = transition(approved(), StartJob(JID)).job
    t = transition(running, CancelJob(JID, BOB))
    assert t.job.state is JobState.CANCELLED and StopJob(JID) in t.actions
    with pytest.raises(PolicyViolation, match="already cancelled"):
        transition(t.job, CancelJob(JID, ALICE))
    cancelled = transition(created(), CancelJob(JID, ALICE)).job
    with pytest.raises(PolicyViolation, match="is cancelled; inputs are closed"):
        transition(cancelled, SubmitInput(JID, ALICE, "left", D1))
    with pytest.raises(PolicyViolation, match="is cancelled; approvals are closed"):
        transition(cancelled, ApproveJob(JID, ALICE, cancelled.spec.digest()))


def test_unknown_job_and_bad_specs() -> None:
    with pytest.raises(NotFound, match="no job"):
        transition(None, StartJob(JID))
    with pytest.raises(PolicyViolation, match="already exists"):
        transition(created(), CreateJob(psi_spec()))
    bad = [
        (JobSpec("nothex", "psi", ALICE, (JobInput("a", ALICE),), (ALICE,)), EncodingError, "invalid job id"),
        (JobSpec(JID, "PSI!", ALICE, (JobInput("a", ALICE),), (ALICE,)), EncodingError, "invalid kind"),
        (JobSpec(JID, "psi", ALICE, (), (ALICE,)), PolicyViolation, "at least one input"),
        (JobSpec(JID, "psi", ALICE, (JobInput("a", ALICE),) * 2, (ALICE,)), PolicyViolation, "distinct"),
        (JobSpec(JID, "psi", ALICE, (JobInput("../x", ALICE),), (ALICE,)), EncodingError, "invalid input name"),
        (JobSpec(JID, "psi", ALICE, (JobInput("a", ALICE),), ()), PolicyViolation, "receiver"),
        (
            JobSpec(JID, "psi", ALICE, (JobInput("a", ALICE),), (ALICE,), {"x": object()}),
            EncodingError,
            "plain JSON",
        ),
    ]
    for spec, exc, msg in bad:
        with pytest.raises(exc, match=msg):
            transition(None, CreateJob(spec))


def test_random_event_sequences_keep_invariants() -> None:
    rng = random.Random(1)
    parties = [ALICE, BOB, CAROL, MALLORY]
    for _ in range(300):
        job = created()
        released: set[str] = set()
        for _ in range(12):
            p = rng.choice(parties)
            ev = rng.choice(
                [
                    SubmitInput(JID, p, rng.choice(["left", "right"]), D1),
                    ApproveJob(JID, p, job.spec.digest()),
                    StartJob(JID),
                    FinishJob(JID, "ee" * 32),
                    FetchResult(JID, p),
                    CancelJob(JID, p),
                ]
            )
            before = job
            try:
                t = transition(job, ev)
            except PolicyViolation:
                continue
            job = t.job
            if job.state is JobState.RUNNING and before.state is not JobState.RUNNING:
                assert before.state is JobState.APPROVED
                assert not before.missing_inputs and not before.missing_approvals
            released |= {a.party for a in t.actions if isinstance(a, ReleaseResult)}
        assert released <= set(psi_spec().receivers)


# -- persistence -------------------------------------------------------------------------------------------------


@pytest.fixture
def sealed(tmp_path: Path) -> SealedStore:
    return SealedStore(tmp_path / "sealed", bytes(range(32)), "ab" * 32)


def test_store_round_trip_restart_and_audit(tmp_path: Path, sealed: SealedStore) -> None:
    key = Ed25519PrivateKey.generate()
    audit = AuditLog(tmp_path / "audit.jsonl", key)
    jobs = JobStore(sealed, audit)
    job = jobs.create(
        creator=ALICE, kind="psi", inputs={"left": ALICE, "right": BOB}, receivers=[ALICE], job_id=JID
    ).job
    jobs.submit_input(JID, ALICE, "left", b"alice rows")
    with pytest.raises(PolicyViolation, match="not a party"):
        jobs.submit_input(JID, MALLORY, "right", b"evil")
    with pytest.raises(PolicyViolation, match="already submitted"):
        jobs.submit_input(JID, ALICE, "left", b"alice rows v2")
    assert sealed.list(f"jobs/{JID}/input/") == [f"jobs/{JID}/input/left"]
    jobs.approve(JID, ALICE, job.spec.digest())

    restarted = JobStore(sealed, audit)  # a restart restores the job and its state
    assert restarted.get(JID).state is JobState.WAITING_FOR_INPUTS
    restarted.submit_input(JID, BOB, "right", b"bob rows")
    t = restarted.approve(JID, BOB, job.spec.digest())
    assert RunJob(JID) in t.actions
    with pytest.raises(PolicyViolation, match="only readable while running"):
        restarted.input_data(JID, "left")
    restarted.start(JID)
    assert restarted.input_data(JID, "left") == b"alice rows"
    restarted.finish(JID, b'{"cardinality": 1}')
    assert restarted.fetch_result(JID, ALICE) == b'{"cardinality": 1}'
    with pytest.raises(PolicyViolation, match="not a receiver"):
        restarted.fetch_result(JID, BOB)

    entries = audit.entries()
    verify_audit_log(entries, key.public_key())
    kinds = [e["kind"] for e in entries]
    assert kinds.count("refusal") == 3
    assert {"job", "upload", "approval", "result", "release"} <= set(kinds)
    bob_view = audit.visible_to(BOB)
    assert any(e["kind"] == "release" for e in bob_view)  # BOB can see that the result was released, not the result
    verify_audit_log(bob_view, key.public_key(), partial=True)
    assert JobStore(sealed).get(JID).released_to == {ALICE}


def test_running_job_fails_on_restart(sealed: SealedStore) -> None:
    jobs = JobStore(sealed)
    spec = jobs.create(
        creator=ALICE,
        kind="gbdt.train",
        inputs={"train": BOB},
        receivers=[ALICE],
        params={"objective": "binary:logistic", "rounds": 20},
    ).job.spec
    jobs.submit_input(spec.job_id, BOB, "train", b"bob's training frame")
    jobs.approve(spec.job_id, BOB, spec.digest())
    jobs.start(spec.job_id)
    again = JobStore(sealed)
    job = again.get(spec.job_id)
    assert job.state is JobState.FAILED and job.error == "the enclave restarted while the job was running"
    assert any(isinstance(a, NotifyParties) and a.what == "failed" for a in again.recovered_actions)
    assert job.spec.params["rounds"] == 20
    with pytest.raises(NotFound):
        again.get("f" * 32)


def test_sealed_state_is_the_job_json(sealed: SealedStore) -> None:
    jobs = JobStore(sealed)
    jobs.create(creator=ALICE, kind="psi", inputs={"left": ALICE}, receivers=[ALICE], job_id=JID)
    state = json.loads(sealed.get(f"jobs/{JID}/state"))
    assert state["state"] == "created" and state["spec"]["inputs"] == [{"name": "left", "owner": ALICE}]
    assert Job.from_json(state) == jobs.get(JID)


def test_purge_only_terminal(sealed: SealedStore) -> None:
    jobs = JobStore(sealed)
    jobs.create(creator=ALICE, kind="psi", inputs={"left": ALICE}, receivers=[ALICE], job_id=JID)
    jobs.submit_input(JID, ALICE, "left", b"x")
    with pytest.raises(PolicyViolation, match="only finished"):
        jobs.purge(JID)
    jobs.cancel(JID, ALICE)
    jobs.purge(JID)
    assert sealed.list(f"jobs/{JID}") == [f"jobs/{JID}/state"]


def test_owner_helpers_check_first_run_once_and_refuse_through_the_callers_hook(sealed: SealedStore) -> None:
    """``jobs.submit``/``jobs.approve``: the one owner path of PSI, gbdt.train, FaaS tasks and generic jobs."""
    from mesatee_notebook.enclave import jobs as core

    store = JobStore(sealed)
    job = store.create(
        creator=ALICE, kind="psi", inputs={"left": ALICE, "right": BOB}, receivers=[ALICE], job_id=JID
    ).job
    refusals: list[tuple[str, str]] = []
    ran: list[str] = []

    def refuse(j: Job, reason: str, details: dict[str, object]) -> PolicyViolation:
        refusals.append((reason, str(details.get("event"))))
        return PolicyViolation(f"refused: {reason}")

    def run(j: Job) -> Job:
        ran.append(j.job_id)
        return j

    digest = job.spec.digest()
    job = core.submit(store, job, ALICE, "left", b"alice's set", refuse=refuse, run=run)
    with pytest.raises(PolicyViolation, match=r"refused: .*belongs to another party"):
        core.submit(store, job, ALICE, "right", b"not hers", refuse=refuse, run=run)
    assert sealed.list(f"jobs/{JID}/input/right") == []  # checked before anything was sealed
    with pytest.raises(PolicyViolation, match=r"refused: .*different job spec"):
        core.approve(store, job, BOB, "0" * 64, refuse=refuse, run=run)
    assert refusals == [
        ("input 'right' belongs to another party; party " + ALICE + " cannot submit it", "SubmitInput"),
        ("the approval is for a different job spec (digest mismatch); fetch the job again and check it", "ApproveJob"),
    ]
    job = core.approve(store, job, ALICE, digest, refuse=refuse, run=run)
    job = core.submit(store, job, BOB, "right", b"bob's set", refuse=refuse, run=run)
    assert ran == []  # Bob has not approved yet
    job = core.approve(store, job, BOB, digest, refuse=refuse, run=run)
    assert ran == [JID] and job.state is JobState.APPROVED  # the step that completed the job ran it, once
