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
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dask
from distributed import Client

from mesatee_notebook.enclave.cluster.admission import admitted
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
    from mesatee_notebook.enclave.service_pool import ServicePool

__all__ = ["SERVICES", "ClusterHead", "attach_head", "cluster_call", "detach_head", "partitioned_call"]

log = logging.getLogger("mesatee.cluster")
SERVICES = ("cluster.status", "cluster.probe", "cluster.upload", "cluster.psi")
#: Seconds cluster.probe waits for every worker before it gives up with RemoteTimeout.
PROBE_TIMEOUT = 60.0
#: Times the head asks the scheduler for its workers when the answer is empty or fails, and the pause unit (s).
WORKER_LIST_TRIES = 4
WORKER_LIST_PAUSE = 0.15


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
        #: A plain upload of at least this many bytes is partitioned across the workers (0: never).
        self.auto_partition_bytes = 0
        #: The sandboxed workers that decode and split uploads (cluster/split.py), started on first use.
        self.split_pool: ServicePool | None = None

    def close(self) -> None:
        from mesatee_notebook.enclave.cluster.split import close_split_pool

        self._stop_refresh.set()
        close_split_pool(self)
        try:
            self.client.close(timeout=10)
        finally:
            self.node.identity.close()

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
        """The workers the scheduler knows now, sorted by address.

        Asked of the scheduler on each call (its ``identity``), not read from ``Client.scheduler_info()``: that
        returns the client's cached identity, which Dask's periodic refresh overwrites with one that has no
        per-worker entries, and which a failed fetch (an ``OSError`` under load) silently leaves in place. An
        empty answer or a failed fetch is asked again a few times over about a second, so placement does not
        see an empty cluster by accident; a scheduler that cannot be reached raises ``RemoteExecutionError``.
        """
        last: Exception | None = None
        for attempt in range(WORKER_LIST_TRIES):
            if attempt:
                time.sleep(WORKER_LIST_PAUSE * attempt)
            try:
                identity = self.client.sync(self.client.scheduler.identity, n_workers=-1)
            except OSError as exc:  # CommClosedError, timeouts
                last = exc
                continue
            workers = sorted((identity or {}).get("workers") or {})
            if workers:
                return workers
            last = None
        if last is not None:
            msg = f"cannot ask the scheduler at {self.url} for its workers ({type(last).__name__}: {last})"
            raise RemoteExecutionError(msg)
        return []

    def _scheduler_record(self) -> dict[str, Any] | None:
        record = self.node.peers.get(self.client.scheduler.address)
        return record.to_dict() if record else None

    def status(self) -> dict[str, Any]:
        return {
            "scheduler": self._scheduler_record(),
            "workers": [r.to_dict() for r in self.verify_workers(self._workers())],
        }

    def submit_to(self, worker: str, fn: Any, *args: Any, **options: Any) -> Any:
        """``fn(*args)`` as a task on ``worker`` only (a future), never taken from Dask's cache.

        It is never moved to another worker: it reads what only that worker holds (a sealed partition, its key, a
        bucket of hashed items). Every cluster task the head submits goes through here.
        """
        return self.client.submit(fn, *args, workers=[worker], allow_other_workers=False, pure=False, **options)

    def _run_on_each(self, fn: Any, workers: list[str], timeout: float) -> list[Any]:
        """Run ``fn()`` once on each worker; a typed error if any does not answer in time or fails."""
        tag = uuid.uuid4().hex
        futures = [self.submit_to(w, fn, key=f"probe-{tag}-{w}") for w in workers]
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


def attach_head(
    kernel: Kernel,
    url: str,
    roots: list[str],
    measurements: list[str],
    *,
    level: str = "softtee",
    tcti: str | None = None,
    require_confinement: str | None = None,
    auto_partition_bytes: int | None = None,
) -> ClusterHead:
    """Make ``kernel`` the head of the cluster at ``url`` (``serve --cluster``).

    At ``level`` tpm the head's cluster identity quotes with the TPM at ``tcti`` (its own, not the kernel's).
    ``auto_partition_bytes``: a plain upload at least this big is partitioned across the workers (default
    :data:`~.datasets.AUTO_PARTITION_BYTES`; 0 turns it off).
    """
    from mesatee_notebook.attestation.levels import Level
    from mesatee_notebook.enclave.cluster.datasets import AUTO_PARTITION_BYTES

    ident = kernel.identity
    if ident.platform_key is None:
        msg = "a cluster head needs a softtee platform (an unprotected kernel has none)"
        raise NotAvailableYet(msg)
    options = NodeOptions(
        role="head",
        data_dir=Path(kernel.config.data_dir),
        level=Level.parse(level),
        platform_roots=tuple(roots),
        measurements=tuple(m.lower() for m in measurements),
        confine=False,
        tcti=tcti,
        require_confinement=require_confinement,
    )
    node = make_node("head", ident.platform_key, kernel.platform_fingerprint, options)
    try:
        head = ClusterHead(url, node)
    except BaseException:
        node.identity.close()
        raise
    head.auto_partition_bytes = AUTO_PARTITION_BYTES if auto_partition_bytes is None else max(0, auto_partition_bytes)
    if kernel.sealing_secret:
        head.partitions = PartitionBook(kernel.sealed_store(), cluster_secret(kernel.sealing_secret))
    kernel.cluster_head = head  # type: ignore[attr-defined]
    log.warning("cluster head: attested scheduler %s with %d workers", url, len(head._workers()))
    return head


def detach_head(kernel: Kernel) -> None:
    """At kernel shutdown: release the calls waiting on the cluster lane (typed error), then close the client."""
    from mesatee_notebook.enclave.cluster.admission import close_lane

    close_lane(kernel)
    head: ClusterHead | None = getattr(kernel, "cluster_head", None)
    if head is not None:
        kernel.cluster_head = None  # type: ignore[attr-defined]
        try:
            head.close()
        except (OSError, RuntimeError, TimeoutError) as exc:  # the scheduler is gone already: nothing to close
            log.info("cluster head: the Dask client did not close cleanly: %s", exc)


def _serve(
    kernel: Kernel, head: ClusterHead, party: str, header: dict[str, Any], payloads: Any, fds: list[int], timeout: float
) -> Any:
    service = str(header["service"])
    if service == "cluster.status":
        return {"cluster": head.status()}
    if service == "cluster.probe":
        return {"cluster": head.probe()}
    if service == "cluster.upload":
        from mesatee_notebook.enclave.cluster.datasets import cluster_upload

        return cluster_upload(kernel, head, party, header, payloads, fds, timeout)  # takes over the fds
    from mesatee_notebook.enclave.cluster.cluster_psi import psi_call

    return psi_call(kernel, head, party, header)


def cluster_call(
    kernel: Kernel, party: str, header: dict[str, Any], payloads: Any = (), fds: Any = (), *, timeout: float = 600.0
) -> Message:
    """Serve a ``cluster.*`` service call in the supervisor; the kernel signs the receipt as for any call.

    ``timeout``: the call's (clamped) timeout, for the sandboxed split of an upload (cluster/split.py).
    """
    import os

    owned = list(fds)  # closed at the end unless a step takes them over (and empties the list)
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
        with admitted(kernel, party):  # the service gate and a fair turn, as a service call on one node
            info = _serve(kernel, head, party, header, payloads, owned, timeout)
        log.info("cluster call %s for %s… in %.2f s", service, party[:16], time.time() - started)
        return Message({"t": "result", "values": [], "info": info})
    finally:
        for fd in owned:
            os.close(fd)


def partitioned_call(kernel: Kernel, party: str, header: dict[str, Any], *, timeout: float = 600.0) -> Message | None:
    """``frame.*``, ``dataset.delete``/``upload``, ``gbdt.train`` on a partitioned dataset, via the head; None: not one.

    A routed call passes the same gate and fair turn as every cluster call (:mod:`.admission`). ``timeout``: the
    call's, for a gathered plan's sandboxed evaluation (cluster/split.py).
    """
    head: ClusterHead | None = getattr(kernel, "cluster_head", None)
    args = header.get("args") or {}
    if head is None or head.partitions is None or not isinstance(args, dict):
        return None
    serve = _route(kernel, head, party, str(header["service"]), args, timeout)
    if serve is None:
        return None
    with admitted(kernel, party):
        return serve()


def _route(
    kernel: Kernel, head: ClusterHead, party: str, service: str, args: dict[str, Any], timeout: float
) -> Callable[[], Message] | None:
    """A callable serving the call on the cluster, or None when it is not about a partitioned dataset."""
    from mesatee_notebook.enclave.cluster.cluster_frames import frame_call, plan_datasets
    from mesatee_notebook.enclave.cluster.partitions import is_partitioned

    if service == "gbdt.train":  # xgboost's collective over the partitions (cluster/gbdt_service.py)
        from mesatee_notebook.enclave.cluster.gbdt_service import partitioned_dataset, train_call

        name = partitioned_dataset(head, args)
        return None if name is None else lambda: train_call(kernel, head, party, name, args)
    if service == "frame.collect":
        names = plan_datasets(args.get("plan"))
    elif service in ("frame.info", "frame.budget", "dataset.delete", "dataset.upload"):
        names = [str(args.get("name", ""))]
    else:
        return None
    if not any(is_partitioned(head, n) for n in names):
        return None
    if service == "dataset.upload":
        from mesatee_notebook.enclave.cluster.datasets import refuse_plain_upload

        return lambda: refuse_plain_upload(kernel, head, party, names[0])
    if service == "dataset.delete":
        from mesatee_notebook.enclave.cluster.datasets import cluster_delete

        return lambda: Message({"t": "result", "values": [], "info": cluster_delete(kernel, head, party, names[0])})
    return lambda: frame_call(kernel, head, party, service, args, timeout)
