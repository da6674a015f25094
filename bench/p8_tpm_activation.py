"""P8b: the kernel's side of a first connect, in process: fresh quote + ActivateCredential on one swtpm.

"before": the policy session is started, satisfied (PolicySecret) and flushed inside the connection (5 TPM
commands: Quote, StartAuthSession, PolicySecret, ActivateCredential, FlushContext), as before issue 14's
second round. "after": ``Tpm.activate_credential`` as it is now (Quote, ActivateCredential; the session was
started ahead of time and the TPM ends it). Interleaved, same TPM, same run; RSA 2048 and ECC P-256 EKs.
Prints a table and writes bench/results/p8_tpm_activation.json. Usage: python bench/p8_tpm_activation.py [N]
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from cryptography import x509

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mesatee_notebook.attestation.tpm import AkPublic, make_credential
from mesatee_notebook.enclave.tpm import Tpm, open_tpm
from tests.tpm.conftest import provision_ecc_ek, start_swtpm, stop_swtpm


def _before(tpm: Tpm, blob: bytes, secret: bytes) -> bytes:
    """The activation as it was: session set up and flushed on the connection's path."""
    from tpm2_pytss import ESYS_TR, TPM2_ALG, TPM2_SE, TPM2B_ENCRYPTED_SECRET, TPM2B_ID_OBJECT, TPMT_SYM_DEF

    esapi: Any = tpm._esapi
    with tpm._lock:
        session = esapi.start_auth_session(
            ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.POLICY, TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL), TPM2_ALG.SHA256
        )
        try:
            esapi.policy_secret(ESYS_TR.ENDORSEMENT, session)
            out = esapi.activate_credential(
                tpm._ak,
                tpm._ek,
                TPM2B_ID_OBJECT(credential=blob),
                TPM2B_ENCRYPTED_SECRET(secret=secret),
                session1=ESYS_TR.PASSWORD,
                session2=session,
            )
        finally:
            esapi.flush_context(session)
    return bytes(out)


def run(tpm: Tpm, n: int) -> dict[str, dict[str, float]]:
    key = x509.load_der_x509_certificate(tpm.ek_cert).public_key()
    name = AkPublic.parse(tpm.ak_public).name
    variants = {"before": lambda b, s: _before(tpm, b, s), "after": tpm.activate_credential}
    samples: dict[str, list[float]] = {k: [] for k in variants}
    for i in range(n + 5):
        for label, activate in variants.items():
            credential = secrets.token_bytes(32)
            blob, secret = make_credential(key, credential, name)  # type: ignore[arg-type]
            time.sleep(0.01)  # the background session start of the previous "after" finishes first
            t = time.perf_counter()
            tpm.quote(secrets.token_bytes(32))
            assert activate(blob, secret) == credential
            if i >= 5:
                samples[label].append(time.perf_counter() - t)
    return {k: {"median_ms": float(np.median(v) * 1e3), "p90_ms": float(np.percentile(v, 90) * 1e3)} for k, v in
            samples.items()}  # fmt: skip


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 60
    os.environ.setdefault("TSS2_LOG", "all+none")
    results: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as d:
        sw = start_swtpm(Path(d) / "swtpm")
        try:
            provision_ecc_ek(sw)
            for ek in ("rsa", "ecc"):
                with open_tpm(sw.tcti, app_pcr=16, ek=ek) as tpm:
                    results[ek] = run(tpm, n)
        finally:
            stop_swtpm(sw)
    load = os.getloadavg()[0]
    print(f"P8b kernel side of a first connect (Quote + ActivateCredential), n={n}, load average {load:.1f}")
    print(f"{'EK':<6} {'before median ms':>17} {'after median ms':>16} {'after/before':>13}")
    for ek, r in results.items():
        b, a = r["before"]["median_ms"], r["after"]["median_ms"]
        print(f"{ek:<6} {b:>17.2f} {a:>16.2f} {a / b:>12.2f}x")
    path = Path(__file__).parent / "results" / "p8_tpm_activation.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"benchmark": "P8b", "n": n, "load_average": load, "results": results}, indent=2))


if __name__ == "__main__":
    main()
