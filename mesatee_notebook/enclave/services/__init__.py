"""Services: trusted functions the kernel runs for parties in its *service worker*.

The service worker is an executor process that never runs user code, so a data owner's
policy checks cannot be patched by an analyst's cell. It holds no keys: sealed storage and
the audit log go through the supervisor. Each service is a function::

    @service("frame.collect")
    def collect(ctx: ServiceContext, args: dict, inputs: dict) -> ServiceResult: ...

``ctx.party`` is the proven party id of the caller. A service returns ``info`` (a small
msgpack-able dict) and named ``values`` (encoded like cell outputs); the supervisor signs a
receipt over both. Refusals are typed errors (PolicyViolation, NotFound, ...).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mesatee_notebook.errors import NotFound

if TYPE_CHECKING:
    from mesatee_notebook.enclave.supervisor_client import SupervisorClient

__all__ = ["INTERNAL", "SERVICE_MODULES", "ServiceContext", "ServiceResult", "dispatch", "service"]

ServiceFn = Callable[["ServiceContext", dict[str, Any], dict[str, Any]], "ServiceResult"]
_REGISTRY: dict[str, ServiceFn] = {}

#: Modules that register services; imported once, on the first call.
SERVICE_MODULES = (
    "mesatee_notebook.enclave.services.datasets",
    "mesatee_notebook.enclave.services.frames",
    "mesatee_notebook.enclave.services.jobs",
    "mesatee_notebook.enclave.services.psi",
    "mesatee_notebook.enclave.services.gbdt",
    "mesatee_notebook.enclave.services.gbdt_jobs",
    "mesatee_notebook.enclave.services.tvm",
    "mesatee_notebook.enclave.services.faas",
    "mesatee_notebook.enclave.services.keys",
    "mesatee_notebook.enclave.services.partition",
)
#: Services only the kernel itself orders (the cluster head's upload split): refused from the wire.
INTERNAL = frozenset({"partition.split", "partition.join", "partition.frames"})


def service(name: str) -> Callable[[ServiceFn], ServiceFn]:
    """Register a service function under ``name``."""

    def deco(fn: ServiceFn) -> ServiceFn:
        if name in _REGISTRY:
            msg = f"service {name!r} registered twice"
            raise RuntimeError(msg)
        _REGISTRY[name] = fn
        return fn

    return deco


@dataclass
class ServiceResult:
    """What a service returns: public ``info`` and named values to send back."""

    info: dict[str, Any] = field(default_factory=dict)
    values: dict[str, Any] = field(default_factory=dict)


class ServiceContext:
    """The caller and the kernel facilities a service may use."""

    def __init__(self, ex: SupervisorClient, party: str, state: dict[str, Any], *, fresh: bool = False) -> None:
        self._ex = ex
        self.party = party
        self.state = state
        #: True when this party's previous call ran in another worker: state this worker cached for the
        #: party (the differencing guard's history) may be stale and must be re-read from sealed storage.
        self.fresh = fresh

    def progress(self, **data: Any) -> None:
        """Stream a progress update (e.g. a training round's metrics) to the caller."""
        self._ex.send({"t": "progress", "data": data})

    def audit(self, kind: str, details: dict[str, Any] | None = None, *, concerns: list[str] | None = None) -> None:
        """Append an entry to the kernel's signed audit log (as this caller)."""
        self._ex.request({"t": "audit", "kind": kind, "details": details or {}, "concerns": concerns or []})

    def seal_put(self, name: str, data: Any) -> None:
        """Store ``data`` (bytes-like) sealed under ``svc/<name>``."""
        self._ex.request({"t": "seal.put", "name": name}, [data])

    def seal_get(self, name: str) -> bytes:
        """Read the sealed object ``svc/<name>``; NotFound if absent."""
        return self._ex.request({"t": "seal.get", "name": name})

    def seal_list(self, prefix: str) -> list[str]:
        """Names under ``svc/<prefix>`` (without the ``svc/`` part)."""
        import json

        return list(json.loads(self._ex.request({"t": "seal.list", "name": prefix}) or b"[]"))

    def run_function(self, blob: bytes, timeout: float | None = None, **grant: Any) -> bytes:
        """Run a packed registered function in a never-used sandboxed executor (the supervisor's function pool).

        ``grant`` (``keys``, ``act_as``, ``task``, ``parties``) names the keys the function may use and as whom.
        """
        return self._ex.request({"t": "faas.run", "timeout": timeout, **grant}, [blob])

    def cluster_psi(self, mode: str, inputs: list[bytes]) -> bytes:
        """Issue 18: intersect ``inputs`` (Arrow streams of items) sharded on the cluster; JSON of the result."""
        return self._ex.request({"t": "cluster.psi", "name": mode}, inputs)

    def seal_delete(self, name: str) -> None:
        """Delete the sealed object ``svc/<name>``."""
        self._ex.request({"t": "seal.delete", "name": name})


_loaded = False


def _load_modules() -> None:
    global _loaded
    if _loaded:
        return
    for mod in SERVICE_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:
                raise
    _loaded = True


def dispatch(name: str, ctx: ServiceContext, args: dict[str, Any], inputs: dict[str, Any]) -> ServiceResult:
    """Run the service ``name``; NotFound names the services that exist."""
    _load_modules()
    fn = _REGISTRY.get(name)
    if fn is None:
        known = ", ".join(sorted(set(_REGISTRY) - INTERNAL)) or "none"
        msg = f"no service {name!r} in this kernel (available: {known})"
        raise NotFound(msg)
    from mesatee_notebook.wire.arrow_fast import caller_scope

    with caller_scope(ctx.party):  # the codecs' caches in this worker are the caller's (wire/arrow_fast.py)
        return fn(ctx, args, inputs)


def registered() -> list[str]:
    """Names of the registered services."""
    _load_modules()
    return sorted(_REGISTRY)
