"""The head: the kernel (``serve --cluster URL``) as the cluster's only Dask client.

Notebook users never talk to Dask: they call ``cluster.*`` services on the kernel, which runs them in its
supervisor through one :class:`distributed.Client` on ``atls://``. Receipts stay the kernel's; their ``info`` names
the scheduler and the workers that took part, with the measurement and platform the head itself verified on an
attested connection to each of them (not what a worker says about itself).
"""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dask
from distributed import Client

from mesatee_notebook.enclave.cluster.comm import AttestedSecurity
from mesatee_notebook.enclave.cluster.node import NodeOptions, dask_settings, make_node
from mesatee_notebook.enclave.cluster.node_identity import ClusterNode, PeerRecord
from mesatee_notebook.enclave.cluster.partitions import PartitionBook, cluster_secret
from mesatee_notebook.errors import (
    AttestationError,
    MalformedFrame,
    MesateeError,
    NotAvailableYet,
    RemoteExecutionError,
    RemoteTimeout,
)
from mesatee_notebook.wire.stream import Message

if TYPE_CHECKING:
    from mesatee_notebook.enclave.kernel import Kernel

__all__ = ["SERVICES", "ClusterHead", "attach_head", "cluster_call", "partitioned_call"]

log = logging.getLogger("mesatee.cluster")
SERVICES = ("cluster.status", "cluster.probe", "cluster.upload", "cluster.psi")
#: Seconds cluster.probe waits for every worker before it gives up with RemoteTimeout.
PROBE_TIMEOUT = 60.0


class ClusterHead:
    """One attested Dask client, and the records of the nodes it verified."""

    def __init__(self, url: str, node: ClusterNode, *, timeout: float = 30.0) -> None:
        dask.config.set(dask_settings())
        self.url = url
        self.node = node
        self.security = AttestedSecurity(node)
        # Raises the failing check's AttestationError when the scheduler is not attested under the cluster policy.
        self.client = Client(url, security=self.security, timeout=timeout, set_as_default=False)
        self._stop_refresh = node.identity.refresh_every()
        #: The head's dataset store and the cluster secret (set by attach_head; docs/cluster.md "Partition keys").
        self.partitions: PartitionBook | None = None

    def close(self) -> None:
        self._stop_refresh.set()
        self.client.close()

    def verify_workers(self, addresses: list[str]) -> list[PeerRecord]:
        """Open an attested connection to each worker now, so its record is the head's own verification."""
        from distributed.comm import connect

        args = self.security.get_connection_args("client")

        async def check(address: str) -> None:
            comm = await connect(address, timeout=10, **args)
            await comm.close()

        for address in addresses:
            try:
                self.client.sync(check, address)
            except OSError as exc:  # Dask's CommClosedError and timeouts are OSErrors; AttestationError is not
                msg = f"cannot reach cluster worker {address} over atls:// ({exc})"
                raise RemoteExecutionError(msg) from None
        return [self.node.peers[a] for a in addresses]

    def _workers(self) -> list[str]:
        return sorted(self.client.scheduler_info(n_workers=-1)["workers"])

    def _scheduler_record(self) -> dict[str, Any] | None:
        record = self.node.peers.get(self.client.scheduler.address)
        return record.to_dict() if record else None

    def status(self) -> dict[str, Any]:
        return {
            "scheduler": self._scheduler_record(),
            "workers": [r.to_dict() for r in self.verify_workers(self._workers())],
        }

    def _run_on_each(self, fn: Any, workers: list[str], timeout: float) -> list[Any]:
        """Run ``fn()`` once on each worker; a typed error if any does not answer in time or fails."""
        tag = uuid.uuid4().hex
        futures = [
            self.client.submit(fn, workers=[w], allow_other_workers=False, pure=False, key=f"probe-{tag}-{w}")
            for w in workers
        ]
        deadline = time.monotonic() + timeout
        try:
            return [f.result(timeout=max(0.0, deadline - time.monotonic())) for f in futures]
        except TimeoutError:
            self.client.cancel(futures)
            msg = f"{len(workers)} workers did not all answer within {timeout:g} s (a worker died or is stuck)"
            raise RemoteTimeout(msg) from None
        except MesateeError:
            raise
        except Exception as exc:  # a task failed on the cluster (KilledWorker, CancelledError, ...)
            self.client.cancel(futures)
            msg = f"a cluster task failed: {type(exc).__name__}: {exc}"
            raise RemoteExecutionError(msg) from None

    def probe(self, timeout: float = PROBE_TIMEOUT) -> dict[str, Any]:
        """Run :func:`node_report` on every worker; check each answer against the head's own verification."""
        from mesatee_notebook.enclave.cluster.tasks import node_report

        workers = self._workers()
        if not workers:
            msg = f"the cluster at {self.url} has no workers"
            raise RemoteExecutionError(msg)
        reports = self._run_on_each(node_report, workers, timeout)
        verified = {r.address: r for r in self.verify_workers(workers)}
        for report in reports:
            record = verified.get(report["address"])
            if record is None or report.get("measurement") != record.measurement:
                msg = (
                    f"worker {report['address']} reports measurement {report.get('measurement')!r}, "
                    "not the one the head verified"
                )
                raise AttestationError(msg)
        return {
            "scheduler": self._scheduler_record(),
            "workers": [verified[r["address"]].to_dict() | {"pid": r["pid"]} for r in reports],
        }


def attach_head(kernel: Kernel, url: str, roots: list[str], measurements: list[str]) -> ClusterHead:
    """Make ``kernel`` the head of the cluster at ``url`` (``serve --cluster``)."""
    ident = kernel.identity
    if ident.platform_key is None:
        msg = "a cluster head needs a softtee platform (an unprotected kernel has none)"
        raise NotAvailableYet(msg)
    options = NodeOptions(
        role="head",
        data_dir=Path(kernel.config.data_dir),
        platform_roots=tuple(roots),
        measurements=tuple(m.lower() for m in measurements),
        confine=False,
    )
    node = make_node("head", ident.platform_key, kernel.platform_fingerprint, options)
    head = ClusterHead(url, node)
    if kernel.sealing_secret:
        head.partitions = PartitionBook(kernel.sealed_store(), cluster_secret(kernel.sealing_secret))
    kernel.cluster_head = head  # type: ignore[attr-defined]
    log.warning("cluster head: attested scheduler %s with %d workers", url, len(head._workers()))
    return head


def _serve(kernel: Kernel, head: ClusterHead, party: str, header: dict[str, Any], payloads: Any, fds: Any) -> Any:
    service = str(header["service"])
    if service == "cluster.status":
        return {"cluster": head.status()}
    if service == "cluster.probe":
        return {"cluster": head.probe()}
    if service == "cluster.upload":
        from mesatee_notebook.enclave.cluster.datasets import cluster_upload

        return cluster_upload(kernel, head, party, header, payloads, fds)
    from mesatee_notebook.enclave.cluster.cluster_psi import psi_call

    return psi_call(kernel, head, party, header)


def cluster_call(kernel: Kernel, party: str, header: dict[str, Any], payloads: Any = (), fds: Any = ()) -> Message:
    """Serve a ``cluster.*`` service call in the supervisor; the kernel signs the receipt as for any call."""
    import os

    try:
        head: ClusterHead | None = getattr(kernel, "cluster_head", None)
        service = str(header["service"])
        if head is None:
            what = "upload(..., partitions=N)" if service == "cluster.upload" else service
            msg = (
                f"{what} needs a cluster: this kernel is not a cluster head (serve it with --cluster atls://HOST:PORT)"
            )
            raise NotAvailableYet(msg)
        if service not in SERVICES:
            msg = f"unknown cluster service {service!r} (known: {', '.join(SERVICES)}; not built yet: docs/cluster.md)"
            raise MalformedFrame(msg)
        started = time.time()
        info = _serve(kernel, head, party, header, payloads, fds)
        log.info("cluster call %s for %s… in %.2f s", service, party[:16], time.time() - started)
        return Message({"t": "result", "values": [], "info": info})
    finally:
        for fd in fds:
            os.close(fd)


def partitioned_call(kernel: Kernel, party: str, header: dict[str, Any]) -> Message | None:
    """``frame.*``, ``dataset.delete``, ``gbdt.train`` on a partitioned dataset, served by the head; None: not one."""
    from mesatee_notebook.enclave.cluster.cluster_frames import frame_call, plan_datasets
    from mesatee_notebook.enclave.cluster.partitions import is_partitioned

    head: ClusterHead | None = getattr(kernel, "cluster_head", None)
    service = str(header["service"])
    args = header.get("args") or {}
    if head is None or head.partitions is None or not isinstance(args, dict):
        return None
    if service == "gbdt.train":  # xgboost's collective over the partitions (cluster/gbdt_service.py)
        from mesatee_notebook.enclave.cluster.gbdt_service import partitioned_dataset, train_call

        name = partitioned_dataset(head, args)
        return None if name is None else train_call(kernel, head, party, name, args)
    if service == "frame.collect":
        names = plan_datasets(args.get("plan"))
    elif service in ("frame.info", "frame.budget", "dataset.delete"):
        names = [str(args.get("name", ""))]
    else:
        return None
    if not any(is_partitioned(head, n) for n in names):
        return None
    if service == "dataset.delete":
        from mesatee_notebook.enclave.cluster.datasets import cluster_delete

        return Message({"t": "result", "values": [], "info": cluster_delete(kernel, head, party, names[0])})
    return frame_call(kernel, head, party, service, args)
