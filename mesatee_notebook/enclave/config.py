"""How a kernel serves: :class:`KernelConfig` (what ``mesatee-enclave serve`` flags set) and the frame limits."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mesatee_notebook.attestation.levels import Level
from mesatee_notebook.enclave.quotas import ANONYMOUS_QUOTA, PARTY_QUOTA, Quota
from mesatee_notebook.enclave.sandbox import SandboxLimits
from mesatee_notebook.enclave.service_pool import default_pool_size
from mesatee_notebook.wire.framing import Limits

__all__ = ["ANONYMOUS_LIMITS", "AVAILABLE_LEVELS", "HELLO_LIMITS", "KernelConfig"]

AVAILABLE_LEVELS = frozenset({Level.UNPROTECTED, Level.SOFTTEE})
HELLO_LIMITS = Limits(max_header=32 << 10, max_payload=32 << 10, max_payloads=4, scope="before 'hello'")
ANONYMOUS_LIMITS = Limits(
    max_header=1 << 20,
    max_payload=64 << 20,
    max_payloads=256,
    scope="until the client proves a party identity (connect with an identity for the full limit)",
)


@dataclass
class KernelConfig:
    """How a kernel serves."""

    data_dir: Path
    level: Level = Level.SOFTTEE
    host: str = "127.0.0.1"
    port: int = 7443
    limits: Limits = field(default_factory=Limits)
    executor_memory: int = 0
    max_cell_timeout: float = 24 * 3600.0
    idle_timeout: float | None = None
    cert_lifetime: float = 7 * 24 * 3600.0
    refresh_interval: float = 3600.0
    max_connections: int = 256
    #: Connections that have not said hello yet; beyond this the oldest is closed (enclave/conn_slots.py).
    max_pending_connections: int = 64
    #: Connections one proven party may hold at once.
    max_party_connections: int = 64
    body_timeout: float = 120.0
    handshake_timeout: float = 20.0
    tcti: str | None = None
    tpm_app_pcr: int = 23
    tpm_boot_pcrs: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 7)
    tpm_ek: str = "auto"  # the certified EK to activate with: rsa, ecc, or auto (RSA if certified, else ECC)
    hw_tee: str = "sev"  # at level sev: the TEE asked for (sev: either, tdx, sev-snp); sgx ignores it
    hw_root: Path | None = None  # TESTS ONLY: a mimic configfs-tsm/Gramine tree (needs MESATEE_TEST_MIMIC_HARDWARE=1)
    sandbox: bool = True
    untrusted_dir: Path | None = None
    sandbox_limits: SandboxLimits = field(default_factory=SandboxLimits)
    #: Frames before ``hello``: small, so an unauthenticated peer cannot make the kernel hold memory.
    hello_limits: Limits = field(default_factory=lambda: HELLO_LIMITS)
    #: Frames after ``hello`` until a party is proven (anonymous cells): moderate.
    anonymous_limits: Limits = field(default_factory=lambda: ANONYMOUS_LIMITS)
    #: Seconds a connection may take to say ``hello`` once TLS is up (the client verifies evidence first).
    hello_timeout: float = 60.0
    #: Close a connection that sends no frame for this long (None: never); clients send keepalive pings.
    idle_connection_timeout: float | None = 300.0
    #: Cut a client off that takes longer than this to take one chunk (8 MiB) of a streamed result (None: never):
    #: the relay holds a service worker while it waits (enclave/result_stream.py deadline_sender).
    result_send_timeout: float | None = 30.0
    #: Per proven party, and one shared quota for all anonymous clients (see enclave/quotas.py).
    party_quota: Quota = PARTY_QUOTA
    anonymous_quota: Quota = ANONYMOUS_QUOTA
    #: Payload bytes all unauthenticated connections together may hold in flight.
    anonymous_inflight_bytes: int = 256 << 20
    #: Service workers in the general pool (job.*/psi.* services have their own single worker); 0: one serial worker.
    service_workers: int = field(default_factory=default_pool_size)
