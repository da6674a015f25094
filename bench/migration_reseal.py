"""M1: migrating one sealed dataset to a new measurement vs the bare re-seal and a plain file copy.

All three move the same S-byte dataset, in the same run, on the same disk, alternating: a plain ``copyfile`` of the
sealed file (no crypto), the bare re-seal (stream-decrypt under A, encrypt under B, atomic rename), and the full
migration (grant check, staging, read-back digest check, commit record, roll forward, index move, audit entry).
The ratio full / bare is the price of the atomicity and the digest check. Medians of R repeats.
Prints a table and writes bench/results/migration_reseal.json. Usage: python bench/migration_reseal.py [MB] [REPEATS]
"""

from __future__ import annotations

import hashlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mesatee_notebook.attestation.party_proof import migration_grant
from mesatee_notebook.enclave.audit import AuditLog
from mesatee_notebook.enclave.migration import SealedState, live_store
from mesatee_notebook.enclave.sealing import SealedStore
from mesatee_notebook.remote.party_key import PartyIdentity

SECRET, A, B = bytes(range(32)), "aa" * 32, "bb" * 32


def _setup(root: Path, payload: bytes, owner: PartyIdentity) -> None:
    SealedState.at_start(root, SECRET, A)
    store = live_store(root, SECRET, A)
    store.put("svc/datasets/d/data", payload)
    meta = {"name": "d", "owner": owner.party_id, "rows": 1, "sha256": hashlib.sha256(payload).hexdigest()}
    store.put("svc/datasets/d/meta", json.dumps(meta).encode())


def _copy(root: Path) -> float:
    src = live_store(root, SECRET, A).path_for("svc/datasets/d/data")
    t0 = time.perf_counter()
    shutil.copyfile(src, root / "copy.seal")
    return time.perf_counter() - t0


def _bare(root: Path) -> float:
    source = SealedStore(root / "sealed", SECRET, A)
    target = SealedStore(root / "bare", SECRET, B)
    t0 = time.perf_counter()
    with target.open_writer("svc/datasets/d/data") as writer:
        for chunk in source.iter_chunks("svc/datasets/d/data"):
            writer.write(chunk)
    return time.perf_counter() - t0


def _full(root: Path, owner: PartyIdentity) -> float:
    state = SealedState.at_start(root, SECRET, B)
    assert state is not None
    grant = migration_grant(owner.party_id, "*", A, B, rollback=False, time=time.time())
    with AuditLog(root / "audit.log", Ed25519PrivateKey.generate()) as audit:
        t0 = time.perf_counter()
        result = state.approve(grant, owner.public_key_raw, owner.sign_migration_grant(grant), audit)
        took = time.perf_counter() - t0
    assert [u["key"] for u in result["migrated"]] == ["d"], result
    return took


def main() -> None:
    mb = int(sys.argv[1]) if len(sys.argv) > 1 else 256
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    payload = bytes(mb << 20)
    owner = PartyIdentity.generate()
    times: dict[str, list[float]] = {"copyfile": [], "bare re-seal": [], "full migration": []}
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parent) as tmp:
            root = Path(tmp)
            _setup(root, payload, owner)
            times["copyfile"].append(_copy(root))
            times["bare re-seal"].append(_bare(root))
            times["full migration"].append(_full(root, owner))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"M1: migrating a {mb} MB sealed dataset, median of {repeats}")
    print(f"  {'path':<16} {'seconds':>8} {'MB/s':>8} {'vs bare':>8}")
    for name, sec in med.items():
        print(f"  {name:<16} {sec:8.3f} {mb / sec:8.0f} {sec / med['bare re-seal']:7.2f}x")
    out = Path(__file__).resolve().parent / "results" / "migration_reseal.json"
    out.write_text(json.dumps({"mb": mb, "repeats": repeats, "seconds": times, "median_s": med}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
