"""Client side of multi-party jobs: ``Session.jobs`` (create, submit, approve, result), and the job status.

Every call goes over the session's attested channel as the session's proven party and comes back with a verified
receipt. Any engine's jobs use this one approval path (PSI's own calls are in ``remote/psi.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mesatee_notebook.errors import EncodingError
from mesatee_notebook.remote._public import public_methods

if TYPE_CHECKING:
    from mesatee_notebook.remote.ml import RemoteModel
    from mesatee_notebook.remote.session import CallResult, Session

__all__ = ["JobStatus", "JobsClient"]


@dataclass(frozen=True)
class JobStatus:
    """A job as its parties see it (spec, state, who submitted and approved)."""

    name: str | None
    job_id: str
    kind: str
    state: str
    creator: str
    receivers: list[str]
    missing_inputs: list[str]
    missing_approvals: list[str]
    spec_digest: str
    error: str | None
    info: dict[str, Any] = field(repr=False)

    @classmethod
    def from_info(cls, info: Mapping[str, Any]) -> JobStatus:
        """Build from a ``job.*``/``psi.*`` service reply."""
        return cls(
            name=info.get("name"),
            job_id=str(info["job_id"]),
            kind=str(info["kind"]),
            state=str(info["state"]),
            creator=str(info["creator"]),
            receivers=list(info["receivers"]),
            missing_inputs=list(info["missing_inputs"]),
            missing_approvals=list(info["missing_approvals"]),
            spec_digest=str(info["spec_digest"]),
            error=info.get("error"),
            info=dict(info),
        )

    @property
    def owners(self) -> dict[str, str]:
        """Input name (the party's label) -> owner party id."""
        return {str(i["name"]): str(i["owner"]) for i in self.info["inputs"]}


def _split_inputs(inputs: Mapping[str, str | Mapping[str, Any]]) -> tuple[dict[str, str], dict[str, Any]]:
    """(input -> owner, input -> dataset reference) from ``JobsClient.create``'s ``inputs``."""
    owners: dict[str, str] = {}
    datasets: dict[str, Any] = {}
    for name, value in inputs.items():
        if isinstance(value, Mapping):
            if not isinstance(value.get("owner"), str) or not isinstance(value.get("dataset"), str):
                msg = f"input {name!r}: give a party id, or {{'dataset': name, 'owner': party id}}"
                raise EncodingError(msg)
            owners[name] = str(value["owner"])
            datasets[name] = {k: v for k, v in value.items() if k != "owner"}
        else:
            owners[name] = value
    return owners, datasets


def _datasets_to_fill(status: JobStatus, party: str | None) -> bool:
    """Whether ``party`` owns an input the spec fills from a dataset that is not submitted yet."""
    refs = status.info.get("params", {}).get("datasets") or {}
    return any(i["owner"] == party and i["name"] in refs and not i["submitted"] for i in status.info["inputs"])


@public_methods
class JobsClient:
    """Multi-party jobs (``job.*`` services): the approval path any engine can use."""

    def __init__(self, session: Session) -> None:
        self._session = session

    def _status(self, service: str, args: Mapping[str, Any], inputs: Mapping[str, Any] | None = None) -> JobStatus:
        return JobStatus.from_info(self._session.call(service, args, inputs).info)

    def create(
        self,
        name: str,
        *,
        kind: str,
        inputs: Mapping[str, str | Mapping[str, Any]],
        receivers: Sequence[str] | None = None,
        params: Mapping[str, Any] | None = None,
        approve: bool = True,
    ) -> JobStatus:
        """Define job ``name``: ``inputs`` maps input name -> owner party id. The creator approves if it owns one.

        An input can also be a stored dataset, ``{"dataset": name, "owner": party id}``: it goes into the spec as
        ``params["datasets"]`` and its owner fills it by approving (``approve``).
        """
        owners, datasets = _split_inputs(inputs)
        job_params = dict(params or {})
        if datasets:
            job_params["datasets"] = {**dict(job_params.get("datasets") or {}), **datasets}
        args = {
            "name": name,
            "kind": kind,
            "inputs": owners,
            "receivers": list(receivers or []),
            "params": job_params,
            "approve": approve,
        }
        status = self._status("job.create", args)
        if approve and _datasets_to_fill(status, self._session.party_id):
            return self.approve(name, spec_digest=status.spec_digest)
        return status

    def submit(self, name: str, input_name: str, data: Any) -> JobStatus:
        """Upload this party's input ``input_name`` (any value the wire can carry)."""
        return self._status("job.submit", {"job": name, "input": input_name}, {"data": data})

    def status(self, name: str) -> JobStatus:
        """The job as a party to it sees it."""
        return self._status("job.status", {"job": name})

    def approve(self, name: str, *, spec_digest: str | None = None) -> JobStatus:
        """Approve the job as it is now (or, with ``spec_digest``, only if it is still that exact spec).

        Inputs of yours that the spec fills from your datasets are submitted in the same call (bound to the
        datasets' digests).
        """
        status = self.status(name)
        digest = spec_digest or status.spec_digest
        if _datasets_to_fill(status, self._session.party_id):
            return self._status("job.submit_dataset", {"job": name, "spec_digest": digest})
        return self._status("job.approve", {"job": name, "spec_digest": digest})

    def cancel(self, name: str) -> JobStatus:
        """Cancel (creator or an input owner); the enclave deletes the sealed inputs."""
        return self._status("job.cancel", {"job": name})

    def result(self, name: str) -> CallResult | RemoteModel:
        """A receiver's result (verified receipt); anyone else gets ``PolicyViolation``.

        A ``gbdt.train`` job's result is the model handle (a ``RemoteModel``; the model stays in the enclave).
        """
        res = self._session.call("job.result", {"job": name})
        model = (res.info.get("result") or {}).get("model")
        if res.info.get("kind") == "gbdt.train" and isinstance(model, Mapping):
            from mesatee_notebook.remote.ml import RemoteModel

            handle = RemoteModel(self._session, model)
            handle.last_receipt = res.receipt
            return handle
        return res

    def list(self) -> list[JobStatus]:
        """Jobs that concern this party."""
        info = self._session.call("job.list").info
        return [JobStatus.from_info(j) for j in info.get("jobs", [])]
