"""Multi-party jobs (the seed's FaaS task model): named inputs with owners, approvals, receivers.

A job names its inputs, each input's owner, and who receives the result. It runs only when every input is present
and every owner has approved this exact job (its spec digest); its result goes only to the receivers. PSI, "GBDT
training on another party's data" and any other engine use the same path: a job has a ``kind`` and ``params``.

States::

    created ──(first input or approval)──> waiting_for_inputs ──(all inputs + all owners approved)──> approved
    approved ──start──> running ──finish──> done
                                └──fail───> failed
    created / waiting_for_inputs / approved / running ──cancel (creator or an owner)──> cancelled

Two layers, like distributed's worker state machine:

- :func:`transition` is the pure core: ``(job, event) -> (job', actions)``; no I/O, raises ``PolicyViolation`` on a
  refusal. Actions tell the caller what to do (run the job, notify parties, release a result, write audit entries).
- :class:`JobStore` persists every job through :class:`~mesatee_notebook.enclave.sealing.SealedStore` (state,
  inputs, result), writes audit entries, and restores jobs after a restart (a job that was running is failed).

An owner's two steps, submitting an input and approving the spec, go through one helper pair, :func:`submit` and
:func:`approve`: check the event against the state machine first (a refusal goes through the caller's ``refuse``,
which audits it), apply it, and run the job (the caller's ``run``) when that made it runnable. Every kind of job
(generic jobs, PSI, ``gbdt.train``, FaaS tasks) uses them; none has its own approval path.

Why this module is over ~500 lines: the one jobs state machine and its one approval path, shared by PSI, GBDT jobs
and FaaS tasks; kept whole so every transition is in one file.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import re
import secrets
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from mesatee_notebook.errors import EncodingError, NotFound, PolicyViolation, TamperedData

__all__ = [
    "Action",
    "ApproveJob",
    "AuditAction",
    "AuditSink",
    "BlobStore",
    "CancelJob",
    "CreateJob",
    "Event",
    "FailJob",
    "FetchResult",
    "FinishJob",
    "Job",
    "JobInput",
    "JobSpec",
    "JobState",
    "JobStore",
    "NotifyParties",
    "ReleaseResult",
    "RunJob",
    "StartJob",
    "StopJob",
    "SubmitInput",
    "Transition",
    "approve",
    "check_event",
    "check_submit",
    "runnable",
    "submit",
    "transition",
    "validate_spec",
]

_INPUT_NAME: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_KIND: Final = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")
_JOB_ID: Final = re.compile(r"^[0-9a-f]{32}$")
RESTART_REASON: Final = "the enclave restarted while the job was running"


class JobState(enum.StrEnum):
    """Where a job is in its life."""

    CREATED = "created"
    WAITING_FOR_INPUTS = "waiting_for_inputs"
    APPROVED = "approved"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        """Return whether no event can change the job any more (except fetching a done job's result)."""
        return self in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


@dataclass(frozen=True)
class JobInput:
    """One named input of a job and the party who owns (uploads and approves) it."""

    name: str
    owner: str


@dataclass(frozen=True)
class JobSpec:
    """What a job is: everything an owner approves. Immutable once created."""

    job_id: str
    kind: str
    creator: str
    inputs: tuple[JobInput, ...]
    receivers: tuple[str, ...]
    params: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """Return the plain-JSON form (also what :meth:`digest` hashes)."""
        return {
            "job_id": self.job_id,
            "kind": self.kind,
            "creator": self.creator,
            "inputs": [{"name": i.name, "owner": i.owner} for i in self.inputs],
            "receivers": list(self.receivers),
            "params": dict(self.params),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> JobSpec:
        """Rebuild from :meth:`to_json`."""
        return cls(
            job_id=str(data["job_id"]),
            kind=str(data["kind"]),
            creator=str(data["creator"]),
            inputs=tuple(JobInput(str(i["name"]), str(i["owner"])) for i in data["inputs"]),
            receivers=tuple(str(r) for r in data["receivers"]),
            params=dict(data.get("params") or {}),
        )

    def digest(self) -> str:
        """SHA-256 (hex) of the canonical JSON spec: what an owner's approval is bound to."""
        return hashlib.sha256(_canonical(self.to_json())).hexdigest()

    @property
    def owners(self) -> frozenset[str]:
        """Parties who own at least one input."""
        return frozenset(i.owner for i in self.inputs)

    @property
    def parties(self) -> frozenset[str]:
        """Everyone the job concerns: creator, owners and receivers."""
        return frozenset({self.creator, *self.owners, *self.receivers})

    def input(self, name: str) -> JobInput | None:
        """Return the input called ``name``, if any."""
        return next((i for i in self.inputs if i.name == name), None)


@dataclass(frozen=True)
class Job:
    """A job's spec plus its current state. Immutable: transitions return a new ``Job``."""

    spec: JobSpec
    state: JobState = JobState.CREATED
    submitted: Mapping[str, str] = field(default_factory=dict)  # input name -> sha256 of the data
    approvals: frozenset[str] = frozenset()
    result_digest: str | None = None
    error: str | None = None
    cancelled_by: str | None = None
    released_to: frozenset[str] = frozenset()

    @property
    def job_id(self) -> str:
        """The job's id."""
        return self.spec.job_id

    @property
    def missing_inputs(self) -> list[str]:
        """Inputs not yet submitted."""
        return [i.name for i in self.spec.inputs if i.name not in self.submitted]

    @property
    def missing_approvals(self) -> list[str]:
        """Owners who have not approved yet."""
        return sorted(self.spec.owners - self.approvals)

    def to_json(self) -> dict[str, Any]:
        """Return the plain-JSON form that is sealed to disk."""
        return {
            "spec": self.spec.to_json(),
            "state": self.state.value,
            "submitted": dict(self.submitted),
            "approvals": sorted(self.approvals),
            "result_digest": self.result_digest,
            "error": self.error,
            "cancelled_by": self.cancelled_by,
            "released_to": sorted(self.released_to),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Job:
        """Rebuild from :meth:`to_json`."""
        return cls(
            spec=JobSpec.from_json(data["spec"]),
            state=JobState(data["state"]),
            submitted={str(k): str(v) for k, v in data["submitted"].items()},
            approvals=frozenset(str(p) for p in data["approvals"]),
            result_digest=data.get("result_digest"),
            error=data.get("error"),
            cancelled_by=data.get("cancelled_by"),
            released_to=frozenset(str(p) for p in data.get("released_to", ())),
        )


# -- events ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CreateJob:
    """A party defines a job."""

    spec: JobSpec


@dataclass(frozen=True)
class SubmitInput:
    """An owner uploads one of its inputs (``digest``: SHA-256 hex of the data)."""

    job_id: str
    party: str
    input_name: str
    digest: str


@dataclass(frozen=True)
class ApproveJob:
    """An owner consents to this exact job (``spec_digest`` of what it was shown)."""

    job_id: str
    party: str
    spec_digest: str


@dataclass(frozen=True)
class StartJob:
    """The enclave's runner starts an approved job."""

    job_id: str


@dataclass(frozen=True)
class FinishJob:
    """The runner finished; ``result_digest`` is the SHA-256 hex of the sealed result."""

    job_id: str
    result_digest: str


@dataclass(frozen=True)
class FailJob:
    """The runner failed (or the enclave restarted mid-run)."""

    job_id: str
    reason: str


@dataclass(frozen=True)
class CancelJob:
    """The creator or an owner cancels the job."""

    job_id: str
    party: str


@dataclass(frozen=True)
class FetchResult:
    """A party asks for the result."""

    job_id: str
    party: str


Event = CreateJob | SubmitInput | ApproveJob | StartJob | FinishJob | FailJob | CancelJob | FetchResult


# -- actions -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunJob:
    """Every input is in and approved: the runner may start the job."""

    job_id: str


@dataclass(frozen=True)
class StopJob:
    """A running job was cancelled: stop its executor."""

    job_id: str


@dataclass(frozen=True)
class NotifyParties:
    """Tell these parties that the job changed (``what`` is a short machine-readable reason)."""

    job_id: str
    parties: frozenset[str]
    what: str


@dataclass(frozen=True)
class ReleaseResult:
    """Send the result (``digest``) to ``party``, a receiver."""

    job_id: str
    party: str
    digest: str


@dataclass(frozen=True)
class AuditAction:
    """Write an audit entry."""

    kind: str
    party: str | None
    details: Mapping[str, Any]
    concerns: frozenset[str]


Action = RunJob | StopJob | NotifyParties | ReleaseResult | AuditAction


@dataclass(frozen=True)
class Transition:
    """The job after an event, and what the caller must do about it."""

    job: Job
    actions: tuple[Action, ...] = ()


# -- the pure core -----------------------------------------------------------------------------------------------


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _refuse(job_id: str, message: str, **details: Any) -> PolicyViolation:
    return PolicyViolation(f"job {job_id}: {message}", job_id=job_id, **details)


def validate_spec(spec: JobSpec) -> None:
    """Refuse a malformed spec with a message that says what to fix."""
    jid = spec.job_id
    if not _JOB_ID.match(jid):
        msg = f"invalid job id {jid!r}: expected 32 lower-case hex digits"
        raise EncodingError(msg)
    if not _KIND.match(spec.kind):
        msg = f"job {jid}: invalid kind {spec.kind!r} (lower-case letters, digits and ._- , e.g. 'psi' or 'gbdt.train')"
        raise EncodingError(msg)
    if not spec.inputs:
        raise _refuse(jid, "a job needs at least one input")
    names = [i.name for i in spec.inputs]
    if len(set(names)) != len(names):
        raise _refuse(jid, f"input names must be distinct, got {names}")
    for i in spec.inputs:
        if not _INPUT_NAME.match(i.name):
            msg = f"job {jid}: invalid input name {i.name!r} (a Python identifier, at most 64 characters)"
            raise EncodingError(msg)
        if not i.owner:
            raise _refuse(jid, f"input {i.name!r} has no owner")
    if not spec.receivers or not all(spec.receivers) or len(set(spec.receivers)) != len(spec.receivers):
        raise _refuse(jid, "a job needs at least one receiver, each named once")
    try:
        _canonical(dict(spec.params))
    except (TypeError, ValueError) as exc:
        msg = f"job {jid}: params must be plain JSON values: {exc}"
        raise EncodingError(msg) from exc


def _audit(kind: str, party: str | None, job: Job, **details: Any) -> AuditAction:
    return AuditAction(kind, party, {"job_id": job.job_id, "job_kind": job.spec.kind, **details}, job.spec.parties)


def _gate_state(job: Job) -> JobState:
    """State of a job that has not started: created, waiting, or approved once everything is in."""
    if not job.missing_inputs and not job.missing_approvals:
        return JobState.APPROVED
    if job.submitted or job.approvals:
        return JobState.WAITING_FOR_INPUTS
    return JobState.CREATED


def transition(job: Job | None, event: Event) -> Transition:
    """Apply ``event`` to ``job`` (``None`` only for :class:`CreateJob`); refusals raise ``PolicyViolation``."""
    if isinstance(event, CreateJob):
        if job is not None:
            raise _refuse(event.spec.job_id, "a job with this id already exists")
        validate_spec(event.spec)
        new = Job(event.spec)
        others = event.spec.parties - {event.spec.creator}
        return Transition(
            new,
            (
                _audit(
                    "job",
                    event.spec.creator,
                    new,
                    event="created",
                    spec_digest=event.spec.digest(),
                    inputs={i.name: i.owner for i in event.spec.inputs},
                    receivers=list(event.spec.receivers),
                ),
                NotifyParties(new.job_id, frozenset(others), "created"),
            ),
        )
    if job is None:
        msg = f"no job {event.job_id}"
        raise NotFound(msg, job_id=event.job_id)
    handler = _HANDLERS[type(event)]
    return handler(job, event)


def _submit(job: Job, ev: SubmitInput) -> Transition:
    jid, party = job.job_id, ev.party
    if party not in job.spec.parties:
        raise _refuse(jid, f"party {party} is not a party to this job and cannot submit inputs", party=party)
    spec_input = job.spec.input(ev.input_name)
    if spec_input is None:
        names = [i.name for i in job.spec.inputs]
        raise _refuse(jid, f"has no input named {ev.input_name!r} (inputs: {names})", party=party)
    if spec_input.owner != party:
        raise _refuse(
            jid, f"input {ev.input_name!r} belongs to another party; party {party} cannot submit it", party=party
        )
    if ev.input_name in job.submitted:
        raise _refuse(
            jid, f"party {party} already submitted input {ev.input_name!r}; an input cannot be replaced", party=party
        )
    if job.state not in (JobState.CREATED, JobState.WAITING_FOR_INPUTS):
        raise _refuse(jid, f"is {job.state.value}; inputs are closed", party=party)
    if not re.fullmatch(r"[0-9a-f]{64}", ev.digest):
        msg = f"job {jid}: input digest must be a SHA-256 hex string"
        raise EncodingError(msg)
    new = dataclasses.replace(job, submitted={**job.submitted, ev.input_name: ev.digest})
    return _after_gate(new, _audit("upload", party, new, input=ev.input_name, digest=ev.digest))


def _approve(job: Job, ev: ApproveJob) -> Transition:
    jid, party = job.job_id, ev.party
    if party not in job.spec.owners:
        raise _refuse(jid, f"party {party} owns no input of this job, so it has nothing to approve", party=party)
    if party in job.approvals:
        raise _refuse(jid, f"party {party} already approved this job", party=party)
    if job.state not in (JobState.CREATED, JobState.WAITING_FOR_INPUTS):
        raise _refuse(jid, f"is {job.state.value}; approvals are closed", party=party)
    if ev.spec_digest != job.spec.digest():
        raise _refuse(
            jid,
            "the approval is for a different job spec (digest mismatch); fetch the job again and check it",
            party=party,
        )
    new = dataclasses.replace(job, approvals=job.approvals | {party})
    return _after_gate(new, _audit("approval", party, new, spec_digest=ev.spec_digest))


def _after_gate(job: Job, audit: AuditAction) -> Transition:
    state = _gate_state(job)
    new = dataclasses.replace(job, state=state)
    actions: list[Action] = [audit]
    if state is JobState.APPROVED:
        actions.append(RunJob(job.job_id))
        actions.append(NotifyParties(job.job_id, job.spec.parties, "approved"))
    return Transition(new, tuple(actions))


def _start(job: Job, ev: StartJob) -> Transition:
    if job.state is not JobState.APPROVED:
        missing = f"; missing inputs {job.missing_inputs}, approvals from {job.missing_approvals}"
        raise _refuse(job.job_id, f"cannot start: it is {job.state.value}{missing}")
    new = dataclasses.replace(job, state=JobState.RUNNING)
    return Transition(new, (_audit("job", None, new, event="started"),))


def _finish(job: Job, ev: FinishJob) -> Transition:
    if job.state is not JobState.RUNNING:
        raise _refuse(job.job_id, f"cannot finish: it is {job.state.value}, not running")
    new = dataclasses.replace(job, state=JobState.DONE, result_digest=ev.result_digest)
    return Transition(
        new,
        (
            _audit("result", None, new, event="done", result_digest=ev.result_digest),
            NotifyParties(job.job_id, frozenset(job.spec.receivers), "result-ready"),
        ),
    )


def _fail(job: Job, ev: FailJob) -> Transition:
    if job.state is not JobState.RUNNING:
        raise _refuse(job.job_id, f"cannot fail: it is {job.state.value}, not running")
    new = dataclasses.replace(job, state=JobState.FAILED, error=ev.reason)
    return Transition(
        new,
        (
            _audit("job", None, new, event="failed", reason=ev.reason),
            NotifyParties(job.job_id, job.spec.parties, "failed"),
        ),
    )


def _cancel(job: Job, ev: CancelJob) -> Transition:
    party = ev.party
    if party != job.spec.creator and party not in job.spec.owners:
        raise _refuse(job.job_id, f"party {party} may not cancel it (only the creator or an input owner)", party=party)
    if job.state.terminal:
        raise _refuse(job.job_id, f"is already {job.state.value}", party=party)
    actions: list[Action] = []
    if job.state is JobState.RUNNING:
        actions.append(StopJob(job.job_id))
    new = dataclasses.replace(job, state=JobState.CANCELLED, cancelled_by=party)
    actions.append(_audit("cancel", party, new, previous_state=job.state.value))
    actions.append(NotifyParties(job.job_id, job.spec.parties - {party}, "cancelled"))
    return Transition(new, tuple(actions))


def _fetch(job: Job, ev: FetchResult) -> Transition:
    party = ev.party
    if party not in job.spec.receivers:
        raise _refuse(
            job.job_id,
            f"party {party} is not a receiver of this job's result; only its receivers may fetch it",
            party=party,
        )
    if job.state is not JobState.DONE or job.result_digest is None:
        raise _refuse(job.job_id, f"has no result to release: it is {job.state.value}", party=party)
    new = dataclasses.replace(job, released_to=job.released_to | {party})
    return Transition(
        new,
        (
            _audit("release", party, new, result_digest=job.result_digest),
            ReleaseResult(job.job_id, party, job.result_digest),
        ),
    )


_HANDLERS: Final[dict[type, Callable[[Job, Any], Transition]]] = {
    SubmitInput: _submit,
    ApproveJob: _approve,
    StartJob: _start,
    FinishJob: _finish,
    FailJob: _fail,
    CancelJob: _cancel,
    FetchResult: _fetch,
}


# -- persistence -------------------------------------------------------------------------------------------------


class BlobStore(Protocol):
    """What :class:`JobStore` needs of sealed storage (a ``SealedStore``, or a service's view of it)."""

    def put(self, name: str, data: bytes | bytearray | memoryview) -> None: ...
    def get(self, name: str) -> bytes: ...
    def list(self, prefix: str = "") -> list[str]: ...
    def delete(self, name: str) -> None: ...


class AuditSink(Protocol):
    """What :class:`JobStore` needs of the audit log (an ``AuditLog``, or a service's view of it)."""

    def append(
        self, kind: str, party: str | None, details: Mapping[str, Any] | None = None, *, concerns: Any = ()
    ) -> Any: ...


class JobStore:
    """Jobs sealed to disk: every accepted event is persisted before its actions are returned.

    Layout in the sealed store: ``<prefix><job id>/state``, ``.../input/<name>``, ``.../result``.

    A job whose sealed state fails to authenticate is neither used nor dropped: it is listed in :attr:`damaged`
    and every access to it raises ``TamperedData``; the other jobs keep working.
    """

    def __init__(self, store: BlobStore, audit: AuditSink | None = None, *, prefix: str = "jobs/") -> None:
        self._store = store
        self._audit = audit
        self._prefix = prefix
        self._lock = threading.RLock()
        self._jobs: dict[str, Job] = {}
        self.damaged: dict[str, str] = {}  # job id -> why its sealed state cannot be used
        self.recovered_actions: list[Action] = []
        for name in store.list(prefix):
            if not name.endswith("/state"):
                continue
            job_id = name[len(prefix) :].split("/")[0]
            try:
                job = Job.from_json(json.loads(store.get(name)))
            except TamperedData as exc:
                self.damaged[job_id] = exc.message
                continue
            if name != self._name(job.job_id, "state"):
                self.damaged[job_id] = f"sealed job record {name!r} holds job {job.job_id}"
                continue
            self._jobs[job.job_id] = job
        for job in list(self._jobs.values()):
            if job.state is JobState.RUNNING:
                self.recovered_actions.extend(self.handle(FailJob(job.job_id, RESTART_REASON)).actions)

    def _name(self, job_id: str, *parts: str) -> str:
        return "/".join((f"{self._prefix}{job_id}", *parts))

    # -- generic ---------------------------------------------------------------------------------------------
    def handle(self, event: Event) -> Transition:
        """Apply an event: refuse (audited), or persist the new state, audit, and return the actions."""
        with self._lock:
            job_id = event.spec.job_id if isinstance(event, CreateJob) else event.job_id
            if job_id in self.damaged:
                self.get(job_id)  # raises TamperedData: a damaged job is never overwritten or used
            try:
                result = transition(self._jobs.get(job_id), event)
            except PolicyViolation as exc:
                self._write_audit_refusal(event, exc)
                raise
            self._persist(result.job)
            for action in result.actions:
                if isinstance(action, AuditAction) and self._audit is not None:
                    self._audit.append(action.kind, action.party, action.details, concerns=action.concerns)
            return result

    def _write_audit_refusal(self, event: Event, exc: PolicyViolation) -> None:
        if self._audit is None:
            return
        party = getattr(event, "party", None)
        job_id = event.spec.job_id if isinstance(event, CreateJob) else event.job_id
        job = self._jobs.get(job_id)
        concerns = job.spec.parties if job is not None else frozenset()
        details = {"job_id": job_id, "event": type(event).__name__, "reason": exc.message}
        self._audit.append("refusal", party, details, concerns=concerns)

    def _persist(self, job: Job) -> None:
        self._store.put(self._name(job.job_id, "state"), _canonical(job.to_json()))
        self._jobs[job.job_id] = job

    # -- conveniences ----------------------------------------------------------------------------------------
    def create(
        self,
        *,
        creator: str,
        kind: str,
        inputs: Mapping[str, str],
        receivers: Sequence[str],
        params: Mapping[str, Any] | None = None,
        job_id: str | None = None,
    ) -> Transition:
        """Define a job: ``inputs`` maps input name -> owner party id."""
        spec = JobSpec(
            job_id=job_id or secrets.token_hex(16),
            kind=kind,
            creator=creator,
            inputs=tuple(JobInput(name, owner) for name, owner in inputs.items()),
            receivers=tuple(receivers),
            params=dict(params or {}),
        )
        return self.handle(CreateJob(spec))

    def get(self, job_id: str) -> Job:
        """Return the job (``NotFound`` if unknown, ``TamperedData`` if its sealed state was modified)."""
        with self._lock:
            if job_id in self.damaged:
                msg = f"job {job_id}: its sealed state failed to authenticate and is not used ({self.damaged[job_id]})"
                raise TamperedData(msg, job_id=job_id)
            try:
                return self._jobs[job_id]
            except KeyError:
                msg = f"no job {job_id}"
                raise NotFound(msg, job_id=job_id) from None

    def jobs(self, party: str | None = None) -> list[Job]:
        """All jobs, or those that concern ``party``."""
        with self._lock:
            return [j for j in self._jobs.values() if party is None or party in j.spec.parties]

    def submit_input(
        self, job_id: str, party: str, input_name: str, data: bytes | memoryview, sha256: str | None = None
    ) -> Transition:
        """Check, seal and record one input; refusals leave nothing on disk.

        ``sha256``: the digest of ``data`` when the caller (in this process) already computed it over these bytes.
        """
        digest = sha256 or hashlib.sha256(data).hexdigest()
        event = SubmitInput(job_id, party, input_name, digest)
        with self._lock:
            job = self.get(job_id)
            try:
                transition(job, event)  # check first: a refused upload is never written
            except PolicyViolation as exc:
                self._write_audit_refusal(event, exc)
                raise
            self._store.put(self._name(job_id, "input", input_name), data)
            return self.handle(event)

    def approve(self, job_id: str, party: str, spec_digest: str) -> Transition:
        """Record an owner's approval of the job whose spec has ``spec_digest``."""
        return self.handle(ApproveJob(job_id, party, spec_digest))

    def start(self, job_id: str) -> Transition:
        """Mark an approved job as running (the runner calls this)."""
        return self.handle(StartJob(job_id))

    def input_data(self, job_id: str, input_name: str) -> bytes:
        """Return an input's data for the runner; only while the job is running, and checked against its digest."""
        with self._lock:
            job = self.get(job_id)
            if job.state is not JobState.RUNNING:
                raise _refuse(job_id, f"inputs are only readable while running (it is {job.state.value})")
            expected = job.submitted.get(input_name)
        if expected is None:
            msg = f"job {job_id} has no submitted input {input_name!r}"
            raise NotFound(msg, job_id=job_id)
        data = self._store.get(self._name(job_id, "input", input_name))
        if hashlib.sha256(data).hexdigest() != expected:
            msg = f"job {job_id}: sealed input {input_name!r} does not match its recorded digest"
            raise TamperedData(msg, job_id=job_id, input=input_name)
        return data

    def finish(self, job_id: str, result: bytes | memoryview) -> Transition:
        """Seal the result and mark the job done."""
        digest = hashlib.sha256(result).hexdigest()
        with self._lock:
            job = self.get(job_id)
            transition(job, FinishJob(job_id, digest))
            self._store.put(self._name(job_id, "result"), result)
            return self.handle(FinishJob(job_id, digest))

    def fail(self, job_id: str, reason: str) -> Transition:
        """Mark a running job as failed."""
        return self.handle(FailJob(job_id, reason))

    def cancel(self, job_id: str, party: str) -> Transition:
        """Cancel on behalf of the creator or an owner."""
        return self.handle(CancelJob(job_id, party))

    def fetch_result(self, job_id: str, party: str) -> bytes:
        """Release the result to ``party`` if it is a receiver; anyone else gets ``PolicyViolation``."""
        with self._lock:
            result = self.handle(FetchResult(job_id, party))
            data = self._store.get(self._name(job_id, "result"))
        if hashlib.sha256(data).hexdigest() != result.job.result_digest:
            msg = f"job {job_id}: sealed result does not match its recorded digest"
            raise TamperedData(msg, job_id=job_id)
        return data

    def purge(self, job_id: str) -> None:
        """Delete a terminal job's sealed inputs and result (its state record stays for the audit trail)."""
        with self._lock:
            job = self.get(job_id)
            if not job.state.terminal:
                raise _refuse(job_id, f"is {job.state.value}; only finished, failed or cancelled jobs can be purged")
            for name in self._store.list(self._name(job_id, "")):
                if not name.endswith("/state"):
                    self._store.delete(name)


# -- an owner's steps: the one approve/submit path of every kind of job ---------------------------------------

#: ``refuse(job, reason, details)`` audits a refusal about ``job`` and returns the error to raise.
Refuse = Callable[[Job, str, dict[str, Any]], PolicyViolation]
#: ``run(job)`` runs a job that became runnable and returns it as it is afterwards.
Run = Callable[[Job], Job]
_NO_DIGEST: Final = "0" * 64


def check_event(job: Job, event: SubmitInput | ApproveJob, refuse: Refuse) -> None:
    """Check ``event`` against the state machine before any work; a refusal goes through ``refuse`` and is raised."""
    try:
        transition(job, event)
    except PolicyViolation as exc:
        raise refuse(job, exc.message.split(": ", 1)[-1], {"event": type(event).__name__}) from None


def runnable(tr: Transition) -> bool:
    """Whether the transition made its job runnable (every input in, every owner approved)."""
    return any(isinstance(a, RunJob) for a in tr.actions)


def check_submit(job: Job, party: str, input_name: str, refuse: Refuse) -> None:
    """Whether ``party`` may submit ``input_name`` now (before reading, hashing or binding anything)."""
    check_event(job, SubmitInput(job.job_id, party, input_name, _NO_DIGEST), refuse)


def submit(
    store: JobStore,
    job: Job,
    party: str,
    input_name: str,
    data: bytes | memoryview,
    *,
    refuse: Refuse,
    run: Run,
    sha256: str | None = None,
) -> Job:
    """An owner submits one input: checked, sealed, recorded; the job runs if this completed it."""
    check_submit(job, party, input_name, refuse)
    tr = store.submit_input(job.job_id, party, input_name, data, sha256)
    return run(tr.job) if runnable(tr) else tr.job


def approve(store: JobStore, job: Job, party: str, spec_digest: str, *, refuse: Refuse, run: Run) -> Job:
    """An owner approves the spec with ``spec_digest``: checked, recorded; the job runs if this completed it."""
    check_event(job, ApproveJob(job.job_id, party, spec_digest), refuse)
    tr = store.approve(job.job_id, party, spec_digest)
    return run(tr.job) if runnable(tr) else tr.job
