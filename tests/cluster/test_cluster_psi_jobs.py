"""PSI between parties under approvals, intersected sharded on the cluster (``psi.create(..., cluster=True)``).

The job flow is the single-node one (create, each party submits, approvals, result for the receivers only, a
receipt on every call); only the intersection runs on the workers. The result equals the set intersection.
"""

from __future__ import annotations

import shutil
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import pytest

import mesatee_notebook as mn
from mesatee_notebook.enclave.cluster.node_identity import cluster_measurement
from mesatee_notebook.errors import NotAvailableYet
from tests.conftest import KernelProc, start_kernel, stop_kernel

from .conftest import Cluster

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def head(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KernelProc]:
    data_dir = tmp_path_factory.mktemp("psihead")
    shutil.copytree(cluster.data_dir / "platform", data_dir / "platform")
    k = start_kernel(data_dir, "--cluster", cluster.url)
    yield k
    stop_kernel(k)


def test_three_parties_psi_job_on_the_cluster_equals_set_intersection(
    cluster: Cluster, head: KernelProc, tmp_path: Path
) -> None:
    policy = head.policy()
    a_items = [f"id-{i}" for i in range(0, 3000, 1)] + ["id-5", "Cafe\u0301"]  # a duplicate, a non-NFC string
    b_items = [f"id-{i}" for i in range(0, 3000, 2)] + ["Caf\u00e9"]
    c_items = [f"id-{i}" for i in range(0, 3000, 3)] + ["Caf\u00e9", "only-c"]
    with (
        mn.connect(head.url, policy=policy, identity=tmp_path / "a") as a,
        mn.connect(head.url, policy=policy, identity=tmp_path / "b") as b,
        mn.connect(head.url, policy=policy, identity=tmp_path / "c") as c,
    ):
        ids = [a.party_id, b.party_id, c.party_id]
        st = a.psi.create("cj", ids, mode="intersection", receivers=[a.party_id, b.party_id], cluster=True)
        assert st.state != "done"
        a.psi.submit("cj", a_items)
        b.psi.submit("cj", b_items)
        c.psi.submit("cj", c_items)
        with pytest.raises(mn.PolicyViolation, match="no result yet"):  # b and c have not approved
            a.psi.result("cj")
        b.psi.approve("cj")
        c.psi.approve("cj")
        res = a.psi.result("cj")
        expected = {f"id-{i}" for i in range(0, 3000, 6)} | {"Caf\u00e9"}
        assert res.items is not None
        got = [unicodedata.normalize("NFC", x) for x in res.items]
        assert set(got) == expected and len(got) == len(expected) == res.cardinality
        # ordered by first row in the first input, as single-node PSI orders them
        assert got == [x for x in dict.fromkeys(unicodedata.normalize("NFC", y) for y in a_items) if x in expected]
        workers = res.info["cluster"]["workers"]
        assert {w["address"] for w in workers} <= {w.address for w in cluster.workers}
        assert workers and all(w["measurement"] == cluster_measurement() for w in workers)
        assert res.receipt.predicate["service"] == "psi.result"
        b_items_got = b.psi.result("cj").items
        assert b_items_got is not None
        assert {unicodedata.normalize("NFC", x) for x in b_items_got} == expected
        with pytest.raises(mn.PolicyViolation, match="not a receiver"):  # the release rule is the single-node one
            c.psi.result("cj")


def test_two_party_cardinality_job_on_the_cluster(head: KernelProc, tmp_path: Path) -> None:
    policy = head.policy()
    with (
        mn.connect(head.url, policy=policy, identity=tmp_path / "a") as a,
        mn.connect(head.url, policy=policy, identity=tmp_path / "b") as b,
    ):
        a.psi.create("cc", [a.party_id, b.party_id], mode="cardinality", cluster=True)
        a.psi.submit("cc", list(range(10_000)))
        b.psi.submit("cc", list(range(5_000, 20_000)))
        b.psi.approve("cc")
        res = a.psi.result("cc")
        assert res.cardinality == 5_000 and res.items is None
        with pytest.raises(NotAvailableYet, match="join on the cluster"):
            a.psi.create("cjoin", [a.party_id, b.party_id], mode="join", cluster=True)


def test_a_cluster_job_on_a_kernel_without_a_cluster_is_a_typed_refusal(kernel: KernelProc, tmp_path: Path) -> None:
    policy = kernel.policy()
    with (
        mn.connect(kernel.url, policy=policy, identity=tmp_path / "a") as a,
        mn.connect(kernel.url, policy=policy, identity=tmp_path / "b") as b,
    ):
        a.psi.create("nc", [a.party_id, b.party_id], mode="cardinality", cluster=True)
        a.psi.submit("nc", [1, 2, 3])
        b.psi.submit("nc", [2, 3, 4])
        st = b.psi.approve("nc")  # the last approval runs the job: it fails, saying why, and releases nothing
        assert st.state == "failed"
        with pytest.raises(mn.PolicyViolation, match="NotAvailableYet"):  # the jobs path withholds details
            a.psi.result("nc")
