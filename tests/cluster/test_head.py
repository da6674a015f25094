"""The head end to end: `serve --cluster URL`, a notebook client calls cluster.* services and gets receipts."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pandas as pd
import pytest

import mesatee_notebook as mn
from mesatee_notebook.attestation.measurement import canonical_json
from mesatee_notebook.enclave.cluster.node_identity import cluster_measurement
from mesatee_notebook.errors import MalformedFrame, NotAvailableYet
from mesatee_notebook.wire.digest import payload_digest
from tests.conftest import KernelProc, start_kernel, stop_kernel

from .conftest import Cluster


@pytest.fixture(scope="module")
def head(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KernelProc]:
    data_dir = tmp_path_factory.mktemp("head")
    # One platform for the whole cluster: the head's kernel uses the nodes' platform key (docs/cluster.md).
    shutil.copytree(cluster.data_dir / "platform", data_dir / "platform")
    k = start_kernel(data_dir, "--cluster", cluster.url)
    yield k
    stop_kernel(k)


@pytest.mark.slow
def test_probe_through_the_head_names_the_workers_in_the_receipt(cluster: Cluster, head: KernelProc) -> None:
    with mn.connect(head.url, policy=head.policy()) as s:
        res = s.call("cluster.probe")
    info = res.info["cluster"]
    # The receipt (verified by connect's policy before call() returned) covers the info naming the workers.
    assert res.verified.predicate["service"] == "cluster.probe"
    assert res.verified.subjects["info"] == payload_digest(canonical_json(res.info))
    workers = {w["address"]: w for w in info["workers"]}
    assert set(workers) == {w.address for w in cluster.workers}
    for w in cluster.workers:
        assert workers[w.address]["measurement"] == cluster_measurement()
        assert workers[w.address]["pid"] == w.proc.pid
    assert info["scheduler"]["address"] == cluster.url
    assert "admitted incoming head" in cluster.scheduler.text()


@pytest.mark.slow
def test_unknown_cluster_service_and_partitions_without_a_cluster_are_typed(
    head: KernelProc, kernel: KernelProc
) -> None:
    with mn.connect(head.url, policy=head.policy()) as s:
        with pytest.raises(MalformedFrame, match=r"cluster\.train"):
            s.call("cluster.train")
    with mn.connect(kernel.url, policy=kernel.policy()) as s:  # a kernel served without --cluster
        with pytest.raises(NotAvailableYet, match=r"partitions=N\) needs a cluster"):
            s.upload(pd.DataFrame({"a": [1]}), "parted", partitions=3)
