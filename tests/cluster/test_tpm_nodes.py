"""Cluster nodes at ``--level tpm``: one swtpm (a SOFTWARE TPM) per node, quotes verified on every connection.

A real ``cluster up --level tpm`` (scheduler, 2 workers, head; in bubblewrap when it is installed, so the
confinement profile is measured into PCR 16 and required), and in-process nodes on a TPM of their own for the
refusals: an unpinned TPM, a level below the policy's minimum, an unconfined node where the policy requires
confinement, and a confinement claim the quoted PCR does not hold.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import mesatee_notebook as mn
from mesatee_notebook.attestation.levels import Level
from mesatee_notebook.enclave.cluster import local
from mesatee_notebook.enclave.cluster.node_bwrap import BWRAP_PROFILE
from mesatee_notebook.enclave.cluster.node_identity import ClusterNode, NodeIdentity, cluster_policy
from mesatee_notebook.enclave.cluster.node_tpm import SwtpmProc, open_node_tpm, prepare, start_swtpm
from mesatee_notebook.enclave.platform import load_platform
from mesatee_notebook.errors import (
    ClusterSetupError,
    EventLogMismatch,
    LevelNotAvailableError,
    LevelTooLow,
    SandboxRequired,
    UntrustedAttestationKey,
)

from .conftest import enclave, try_connect, wait_for
from .setup_helpers import expected_groups, visits

_MISSING = [t for t in ("swtpm",) if shutil.which(t) is None]
if importlib.util.find_spec("tpm2_pytss") is None:
    _MISSING.append("tpm2-pytss")
pytestmark = pytest.mark.skipif(bool(_MISSING), reason=f"tpm nodes need {', '.join(_MISSING)}")
BWRAP = shutil.which("bwrap") is not None


@pytest.fixture(scope="module")
def tpm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[local.LocalCluster]:
    data_dir = tmp_path_factory.mktemp("tpm-cluster")
    c = local.up(workers=2, data_dir=data_dir, level="tpm", bwrap=BWRAP)
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def own_swtpm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SwtpmProc]:
    """A TPM the cluster does not pin (started by the launcher's own code)."""
    root = tmp_path_factory.mktemp("own-swtpm")
    tpm = start_swtpm(root / "state", root / "swtpm.log", [], None, in_netns=False)
    yield tpm
    tpm.stop()


def _identity(tcti: str, role: str = "worker", profile: dict[str, Any] | None = None) -> NodeIdentity:
    confinement = {"applied": [], **({"profile": dict(profile)} if profile else {})}
    return NodeIdentity.create(role, None, level=Level.TPM, tpm=open_node_tpm(tcti), confinement=confinement)


def _log(c: local.LocalCluster, name: str) -> str:
    return (c.data_dir / "cluster" / "logs" / f"{name}.log").read_text(errors="replace")


def _aks(c: local.LocalCluster) -> tuple[str, ...]:
    return tuple(n["tpm"]["ak"] for n in (c.state["scheduler"], *c.workers, c.state["head"]))


@pytest.mark.slow
def test_a_tpm_cluster_admits_its_nodes_and_runs_a_partitioned_group_by(
    tpm_cluster: local.LocalCluster, tmp_path: Path
) -> None:
    c = tpm_cluster
    assert c.state["level"] == "tpm" and len(set(_aks(c))) == 4, "one swtpm, one AK, per node"
    assert "SOFTWARE TPM" in str(c)
    for name in ("sched", "w0", "w1"):
        assert "a SOFTWARE TPM (swtpm)" in _log(c, name)
    df = visits()
    with mn.connect(c.head_url, policy=c.policy(), identity=tmp_path / "owner") as s:
        status = s.call("cluster.status").info["cluster"]
        sdf = s.upload(df, "visits", partitions=2)
        got = sdf.groupby("site").agg(n=("cost", "size"), total=("cost", "sum"), mean=("cost", "mean")).collect()
    assert got.sort_index().equals(expected_groups(df).sort_index())
    records = [status["scheduler"], *status["workers"]]
    by_address = {n["address"]: n for n in (c.state["scheduler"], *c.workers)}
    for rec in records:
        # what the head verified on its own connection: a quote by the AK the launcher read from that node's TPM
        assert rec["level"] == "tpm" and rec["tpm_kind"] == "software"
        assert rec["platform"] == by_address[rec["address"]]["tpm"]["ak"]
        assert rec["confinement"] == ("bwrap" if BWRAP else "none")


@pytest.mark.slow
def test_a_node_quoting_with_an_unpinned_tpm_is_refused(tpm_cluster: local.LocalCluster, own_swtpm: SwtpmProc) -> None:
    c = tpm_cluster
    ident = _identity(own_swtpm.tcti, profile=None)
    try:
        node = ClusterNode(ident, cluster_policy(_aks(c), min_level=Level.TPM))
        for name, address in (("sched", c.scheduler), ("w0", c.workers[0]["address"])):
            with pytest.raises(OSError):  # the peer closes the stream before any Dask byte
                try_connect(node, address)
            wait_for(lambda n=name: "UntrustedAttestationKey" in _log(c, n), what=f"{name} logs the refusal")
        assert ident.platform_fingerprint not in _aks(c)
        with pytest.raises(UntrustedAttestationKey, match="does not pin"):  # the same check, offline
            node.admit(ident.certificate_der, "atls://unpinned:1", "incoming")
    finally:
        ident.close()


@pytest.mark.slow
def test_a_softtee_node_is_below_the_clusters_minimum_level(tpm_cluster: local.LocalCluster) -> None:
    c = tpm_cluster
    key = load_platform(c.data_dir).key  # the cluster's own softtee platform: pinned nowhere at tpm, and too low
    ident = NodeIdentity.create("worker", key)
    node = ClusterNode(ident, cluster_policy((*_aks(c), ident.platform_fingerprint)))
    with pytest.raises(OSError):
        try_connect(node, c.scheduler)
    wait_for(lambda: "LevelTooLow" in _log(c, "sched"), what="the scheduler logs the refusal")
    tpm_policy = ClusterNode(ident, cluster_policy((ident.platform_fingerprint,), min_level=Level.TPM))
    with pytest.raises(LevelTooLow, match="below the policy's minimum tpm"):
        tpm_policy.admit(ident.certificate_der, "atls://softtee:1", "incoming")


@pytest.mark.slow
def test_confinement_at_tpm_is_what_the_quoted_pcr_holds(own_swtpm: SwtpmProc) -> None:
    """Accept and refuse on a real TPM quote: unconfined, a false claim, then the launcher's measured profile."""
    prepare(own_swtpm.tcti, None)
    plain = _identity(own_swtpm.tcti)
    try:
        ak = plain.platform_fingerprint
        lax = ClusterNode(plain, cluster_policy((ak,), min_level=Level.TPM))
        strict = ClusterNode(plain, cluster_policy((ak,), min_level=Level.TPM), require_confinement="bwrap")
        assert lax.admit(plain.certificate_der, "atls://w:1", "incoming").level is Level.TPM
        assert lax.peers["atls://w:1"].confinement == "none"
        with pytest.raises(SandboxRequired, match="requires 'bwrap'"):
            strict.admit(plain.certificate_der, "atls://w:1", "incoming")
        head = _identity_reuse(plain, "head")
        assert strict.admit(head, "atls://h:1", "incoming")  # the head runs its own sandboxes: not held to it
    finally:
        plain.close()
    prepare(own_swtpm.tcti, {"format": 1, "name": "another"})  # PCR 16 holds some other profile
    liar = _identity(own_swtpm.tcti, profile=BWRAP_PROFILE)  # states bwrap; nobody measured it into PCR 16
    try:
        with pytest.raises(EventLogMismatch, match="PCR 16"):
            lax.admit(liar.certificate_der, "atls://w:2", "incoming")
    finally:
        liar.close()
    prepare(own_swtpm.tcti, BWRAP_PROFILE)  # what the launcher does before it starts a wrapped node
    wrapped = _identity(own_swtpm.tcti, profile=BWRAP_PROFILE)
    try:
        strict.admit(wrapped.certificate_der, "atls://w:3", "incoming")
        assert strict.peers["atls://w:3"].confinement == "bwrap"
    finally:
        wrapped.close()


def _identity_reuse(ident: NodeIdentity, role: str) -> bytes:
    """A certificate of the same TPM under another role (a fresh identity's quote)."""
    other = NodeIdentity.create(role, None, level=Level.TPM, tpm=ident.tpm, confinement={"applied": []})
    return other.certificate_der


def test_confinement_at_softtee_is_the_nodes_word_and_required_of_workers(tmp_path: Path) -> None:
    from mesatee_notebook.enclave.platform import init_platform

    init_platform(tmp_path)
    key = load_platform(tmp_path).key
    plain = NodeIdentity.create("worker", key)
    wrapped = NodeIdentity.create("worker", key, confinement={"applied": [], "profile": dict(BWRAP_PROFILE)})
    strict = ClusterNode(plain, cluster_policy((plain.platform_fingerprint,)), require_confinement="bwrap")
    with pytest.raises(SandboxRequired, match="not confined"):
        strict.admit(plain.certificate_der, "atls://w:1", "incoming")
    strict.admit(wrapped.certificate_der, "atls://w:2", "incoming")
    assert strict.peers["atls://w:2"].confinement == "bwrap"


def test_a_tpm_node_needs_its_tpm_and_bad_levels_are_refused(tmp_path: Path) -> None:
    with pytest.raises(LevelNotAvailableError, match="needs its TPM"):
        NodeIdentity.create("worker", None, level=Level.TPM)
    with pytest.raises(ClusterSetupError, match="softtee or tpm"):
        local.check_spec(local.ClusterSpec(tmp_path, level="sev"))
    from mesatee_notebook.enclave.platform import init_platform

    init_platform(tmp_path)
    for extra in (["--level", "tpm"], ["--confinement", "bwrap"]):
        run = subprocess.run(
            enclave("scheduler", "--data-dir", str(tmp_path), "--port", "0", *extra),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
        assert ("--tcti" in run.stderr) if "tpm" in extra else ("not in bubblewrap" in run.stderr)
