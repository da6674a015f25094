"""What a cluster node states about its confinement, and what a peer checks of it (``ClusterNode.admit``).

A node's evidence carries ``sandbox.cluster_node.profile``: the confinement profile its launcher put it in
(``node_bwrap.BWRAP_PROFILE`` for ``cluster up --bwrap``), or none. How much that statement proves depends on the
level: at softtee it is the word of the node software the operator runs (softtee trusts the operator anyway); at
tpm the launcher extended PCR 16 of the node's TPM with the profile's digest before the node started, and the
quote covers PCR 16, so a peer checks the statement against the quoted value (with swtpm, a SOFTWARE TPM, whoever
runs the host can still set any PCR). A cluster policy can require a profile of every scheduler and worker.
"""

from __future__ import annotations

from typing import Any, Final

from mesatee_notebook.attestation.evidence import parse_evidence
from mesatee_notebook.attestation.levels import Level
from mesatee_notebook.attestation.policy import AttestationReport
from mesatee_notebook.attestation.tpm import TpmEvidence
from mesatee_notebook.enclave.cluster.node_tpm import CONFINEMENT_PCR, confinement_pcr_value
from mesatee_notebook.errors import EventLogMismatch, MalformedEvidence, SandboxRequired

__all__ = ["CONFINED_ROLES", "NO_CONFINEMENT", "check_confinement", "peer_role"]

#: The confinement profile of a node that no launcher wrapped: it claims nothing, so there is nothing to check.
NO_CONFINEMENT: Final = {"format": 1, "name": "none"}
#: Roles that a policy requiring confinement holds to it (the head runs its own sandboxes; docs/cluster.md).
CONFINED_ROLES: Final = ("scheduler", "worker")
_CONFINEMENT_PCR: Final = CONFINEMENT_PCR


def peer_role(report: AttestationReport) -> str:
    """The role the peer's verified evidence names (``?`` when it names none)."""
    return _profile_of(report)[0]


def _profile_of(report: AttestationReport) -> tuple[str, dict[str, Any]]:
    """The peer's role and the confinement profile its evidence states (NO_CONFINEMENT when it states none)."""
    node = report.sandbox.get("cluster_node") if isinstance(report.sandbox, dict) else None
    node = node if isinstance(node, dict) else {}
    profile = node.get("profile")
    if profile is None:
        profile = NO_CONFINEMENT
    if not isinstance(profile, dict) or not isinstance(profile.get("name"), str):
        msg = "the node's evidence states a confinement profile that is not a {name, ...} object"
        raise MalformedEvidence(msg)
    return str(node.get("role", "?")), profile


def check_confinement(report: AttestationReport, required: str | None) -> str:
    """Check the peer's stated confinement profile; return its name.

    At tpm a stated profile (other than ``none``, which claims nothing) must be what the quoted PCR 16 holds:
    SHA-256(0³² ‖ SHA-256(profile)), measured by the launcher before the node started. At softtee the statement is
    the node software's own word (softtee trusts the operator who runs it). ``required`` (a profile name) refuses a
    scheduler or worker that does not state it, with :class:`SandboxRequired`.
    """
    role, profile = _profile_of(report)
    name = str(profile["name"])
    if report.level is Level.TPM and name != NO_CONFINEMENT["name"]:
        evidence = parse_evidence(report.evidence)
        quoted = evidence.pcrs.get(_CONFINEMENT_PCR) if isinstance(evidence, TpmEvidence) else None
        if quoted != confinement_pcr_value(profile):
            msg = (
                f"the node states confinement profile {name!r}, but its TPM's quoted PCR {_CONFINEMENT_PCR} "
                f"({str(quoted)[:16]}…) is not that profile measured from a reset PCR: no launcher measured it "
                "before the node started"
            )
            raise EventLogMismatch(msg, pcr=_CONFINEMENT_PCR)
    if required and role in CONFINED_ROLES and name != required:
        msg = (
            f"the cluster {role} is not confined as this cluster's policy requires: it shows confinement "
            f"{name!r}, the policy requires {required!r} (start it with `cluster up --bwrap`)"
        )
        raise SandboxRequired(msg)
    return name
