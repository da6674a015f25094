"""Sealed state across measurements: what an upgrade finds, the owners' migration grants, and the atomic re-seal.

Every sealed object is bound to the measurement (``HKDF(sealing secret, measurement)``), so a kernel with other code
cannot read it. This module makes that visible and gives the owners a way to move their state. Layout in
``DATA_DIR`` (see ``docs/sealing.md``)::

    sealed/                       the live store of the running measurement; sealed/MEASUREMENT names it (plain text)
    sealed-parked/<M>/            stores of other measurements, moved aside by one rename at start; contents untouched
    sealed-platform/              the platform store: keyed HKDF(sealing secret, "platform-state v1"), so every kernel
                                  version on this platform reads it (the host does not). It holds only:
        index/<M>/datasets/<N>    {name, owner, rows, bytes, sha256, readers}: written when a dataset is sealed
        grants/<A>/<B>/<party>/<d> the owners' signed grants
        versions                  the monotonic version counter (ordinal of every measurement seen here)
        journal/<txn>             the commit record of one migration
    sealed-staging/<txn>/         objects re-sealed for the target, before their commit record exists

A migration from A to B: verify the grants → only then derive A's key → copy each approved object, chunk by chunk
(each chunk authenticated under A), into ``sealed-staging/<txn>/`` sealed under B → check every digest → write the
commit record (one atomic rename: the commit point) → move the staged files into B's store, delete A's copies, move
the index entries → remove the record. After a kill -9 the next start rolls a committed migration forward and
discards an uncommitted one, so each migration is either complete or never happened; A's files are only deleted after
the commit.

Why this module is over ~500 lines: the sealed-state migration (plan, grants, re-seal, verify, commit): one state
machine whose steps must be read together to see that nothing is lost.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from mesatee_notebook.attestation.measurement import canonical_json
from mesatee_notebook.attestation.party_proof import verify_migration_grant
from mesatee_notebook.enclave.sealing import SealedStore
from mesatee_notebook.errors import MalformedFrame, NotFound, PolicyViolation, SealingError, TamperedData
from mesatee_notebook.wire.messages import sealed_state_summary

__all__ = ["MigrationGrantRecord", "SealedState", "VersionCounter", "live_store"]

log = logging.getLogger("mesatee.enclave.migration")

PLATFORM_LABEL: Final = "platform-state v1"
MARKER: Final = "MEASUREMENT"
LIVE: Final = "sealed"
PARKED: Final = "sealed-parked"
PLATFORM_DIR: Final = "sealed-platform"
STAGING: Final = "sealed-staging"
ALL: Final = "*"
_HEX64: Final = re.compile(r"^[0-9a-f]{64}$")
_DATASET_META: Final = re.compile(r"^svc/datasets/([^/]+)/meta$")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_marker(directory: Path, measurement: str) -> None:
    tmp = directory / f".{MARKER}.{os.getpid()}"
    tmp.write_text(measurement + "\n")
    tmp.chmod(0o600)
    tmp.replace(directory / MARKER)
    _fsync_dir(directory)


def _sealed_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.name.endswith(".seal")) if directory.is_dir() else []


def platform_store(data_dir: Path, sealing_secret: bytes) -> SealedStore:
    """The measurement-independent platform store (index, grants, counter, journal)."""
    return SealedStore(Path(data_dir) / PLATFORM_DIR, sealing_secret, PLATFORM_LABEL)


class VersionCounter:
    """A monotonic counter of the measurements this platform has run, kept in the platform store.

    Each new measurement gets the next ordinal when it first starts; a migration from a higher ordinal to a lower one
    is a rollback. This is a *software* counter: a host that restores an older copy of ``sealed-platform/`` (or all of
    ``DATA_DIR``) resets it, and nothing here can notice. The TPM level replaces :meth:`_load`/:meth:`_store` with a
    TPM NV counter (another helper's level); the rest of this module only calls :meth:`register` and :meth:`ordinal`.
    """

    NAME: Final = "versions"

    def __init__(self, store: SealedStore) -> None:
        self._store = store

    def _load(self) -> dict[str, Any]:
        try:
            state = json.loads(self._store.get(self.NAME))
        except NotFound:
            return {"counter": 0, "measurements": {}}
        if not isinstance(state, dict) or not isinstance(state.get("measurements"), dict):
            msg = "the sealed version counter is malformed"
            raise TamperedData(msg, name=self.NAME)
        return state

    def _store_state(self, state: dict[str, Any]) -> None:
        self._store.put(self.NAME, canonical_json(state))

    def register(self, measurement: str) -> int:
        """Return the ordinal of ``measurement``, giving it the next one if it is new."""
        state = self._load()
        known = state["measurements"].get(measurement)
        if known is not None:
            return int(known)
        state["counter"] = int(state["counter"]) + 1
        state["measurements"][measurement] = state["counter"]
        self._store_state(state)
        return int(state["counter"])

    def register_legacy(self, measurement: str) -> int:
        """Give a measurement found in a store from before this counter ordinal 0: older than every one counted."""
        state = self._load()
        if measurement not in state["measurements"]:
            state["measurements"][measurement] = 0
            self._store_state(state)
        return int(state["measurements"][measurement])

    def ordinal(self, measurement: str) -> int | None:
        """The ordinal of ``measurement``, or None if this platform never ran it (or the counter was reset)."""
        value = self._load()["measurements"].get(measurement)
        return None if value is None else int(value)


class IndexedStore(SealedStore):
    """The live store: a SealedStore that also keeps the dataset index entries in the platform store."""

    def __init__(self, root: Path, sealing_secret: bytes, measurement: str, platform: SealedStore) -> None:
        super().__init__(root, sealing_secret, measurement)
        self._platform = platform

    def put(self, name: str, data: bytes | bytearray | memoryview) -> None:
        """Seal ``data``; a dataset's metadata also updates its index entry (owner, rows, size)."""
        super().put(name, data)
        m = _DATASET_META.match(name)
        if m is None:
            return
        try:
            meta = json.loads(bytes(data))
            data_file = self.path_for(f"svc/datasets/{m.group(1)}/data")
            entry = {
                "name": str(meta["name"]),
                "owner": str(meta["owner"]),
                "rows": int(meta.get("rows", 0)),
                "sha256": str(meta.get("sha256", "")),
                "bytes": data_file.stat().st_size if data_file.exists() else 0,
                "readers": meta.get("readers"),
            }
        except (ValueError, KeyError, TypeError):
            log.warning("dataset metadata %s is not an index-able map; no index entry written", name)
            return
        self._platform.put(f"index/{self.measurement}/datasets/{m.group(1)}", canonical_json(entry))

    def delete(self, name: str) -> None:
        """Remove ``name``; a dataset's metadata also removes its index entry."""
        super().delete(name)
        m = _DATASET_META.match(name)
        if m is not None:
            index = f"index/{self.measurement}/datasets/{m.group(1)}"
            if self._platform.exists(index):
                self._platform.delete(index)


def live_store(data_dir: Path, sealing_secret: bytes, measurement: str) -> IndexedStore:
    """The running measurement's sealed store (``DATA_DIR/sealed``), with its dataset index."""
    return IndexedStore(Path(data_dir) / LIVE, sealing_secret, measurement, platform_store(data_dir, sealing_secret))


@dataclass(frozen=True)
class MigrationGrantRecord:
    """A verified grant as kept in the platform store."""

    grant: dict[str, Any]
    public_key: bytes
    signature: bytes

    @property
    def digest(self) -> str:
        """SHA-256 of the signed grant bytes and signature: names this grant in the audit log."""
        return hashlib.sha256(canonical_json(self.grant) + self.signature).hexdigest()

    def to_json(self) -> bytes:
        return canonical_json(
            {"grant": self.grant, "public_key": self.public_key.hex(), "signature": self.signature.hex()}
        )

    @classmethod
    def from_json(cls, raw: bytes) -> MigrationGrantRecord:
        obj = json.loads(raw)
        return cls(obj["grant"], bytes.fromhex(obj["public_key"]), bytes.fromhex(obj["signature"]))


@dataclass
class _Unit:
    """Objects that move together (a dataset with its guard histories, a job, a model, one party's cell files)."""

    kind: str
    key: str
    owners: frozenset[str]
    names: list[str] = field(default_factory=list)


@dataclass
class _Plan:
    units: list[_Unit]
    held: list[dict[str, Any]]
    dropped: list[str]


class SealedState:
    """The sealed state of one data directory, seen from the kernel running ``measurement``."""

    def __init__(self, data_dir: Path, sealing_secret: bytes, measurement: str) -> None:
        self.data_dir = Path(data_dir)
        self._secret = sealing_secret
        self.measurement = measurement
        self.platform = platform_store(self.data_dir, sealing_secret)
        self.versions = VersionCounter(self.platform)
        self._lock = threading.Lock()
        self.notes: list[str] = []
        self.version: int | None = None
        self.recovered: list[dict[str, Any]] = []

    # -- start ---------------------------------------------------------------------------------------------------
    @classmethod
    def at_start(cls, data_dir: Path, sealing_secret: bytes | None, measurement: str) -> SealedState | None:
        """Arrange the stores for ``measurement`` and finish or discard interrupted migrations (before any use)."""
        if sealing_secret is None:
            return None
        state = cls(data_dir, sealing_secret, measurement)
        state.version = state.versions.register(measurement)
        state._arrange_live()
        state._recover()
        for line in state.summary_lines():
            log.warning("%s", line)
        return state

    def _arrange_live(self) -> None:
        live, parked = self.data_dir / LIVE, self.data_dir / PARKED
        if live.is_dir():
            owner = self._live_owner(live)
            if owner != self.measurement:
                parked.mkdir(mode=0o700, exist_ok=True)
                label = owner or f"unknown-{int(time.time())}"
                target = parked / label
                if target.exists():
                    msg = f"cannot park the store sealed for {label[:16]}…: {target} already exists"
                    raise SealingError(msg)
                live.rename(target)
                _fsync_dir(parked)
                _fsync_dir(self.data_dir)
                note = (
                    f"the store sealed for measurement {label} was moved aside to {target} (untouched): "
                    f"this kernel runs {self.measurement}"
                )
                self.notes.append(note)
                log.warning("%s", note)
        if not live.is_dir():
            own = parked / self.measurement
            if own.is_dir():
                own.rename(live)
                _fsync_dir(self.data_dir)
                self.notes.append(f"the store sealed for this measurement was moved back from {own}")
            else:
                live.mkdir(mode=0o700)
            _write_marker(live, self.measurement)

    def _live_owner(self, live: Path) -> str | None:
        marker = live / MARKER
        if marker.is_file():
            text = marker.read_text().strip()
            return text if _HEX64.match(text) else None
        files = _sealed_files(live)
        if not files:
            _write_marker(live, self.measurement)
            return self.measurement
        # A store from before the marker: ours if its files authenticate under our own key.
        names, _ = SealedStore(live, self._secret, self.measurement).scan()
        if not names:
            return None
        _write_marker(live, self.measurement)
        return self.measurement

    def store_dir(self, measurement: str) -> Path:
        """Where the store sealed for ``measurement`` lives now."""
        live = self.data_dir / LIVE
        marker = live / MARKER
        if marker.is_file() and marker.read_text().strip() == measurement:
            return live
        return self.data_dir / PARKED / measurement

    # -- what is pending -----------------------------------------------------------------------------------------
    def _index(self, measurement: str) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        prefix = f"index/{measurement}/datasets/"
        for name in self.platform.list(prefix):
            out[name[len(prefix) :]] = json.loads(self.platform.get(name))
        return out

    def status(self, party: str | None = None) -> dict[str, Any]:
        """Stores sealed for other measurements: their datasets (owner, size), file counts, rollback flag.

        Dataset names and owners are shown to proven parties only (as ``dataset.list`` shows them), and datasets a
        job made only to their readers; anyone sees the counts.
        """
        parked = self.data_dir / PARKED
        stores: list[dict[str, Any]] = []
        ours = self.versions.ordinal(self.measurement)
        for directory in sorted(parked.iterdir()) if parked.is_dir() else []:
            files = _sealed_files(directory)
            if not files:
                continue
            m = directory.name
            known = bool(_HEX64.match(m))
            index = self._index(m) if known else {}
            ordinal = self.versions.ordinal(m) if known else None
            datasets = list(index.values())
            owners = sorted({d["owner"] for d in datasets})
            visible = [
                {
                    "name": d["name"],
                    "owner": d["owner"],
                    "rows": d["rows"],
                    "bytes": d["bytes"],
                    "sha256": d["sha256"],
                    "measurement": m,
                }
                for d in datasets
                if party is not None and (d.get("readers") is None or party in d["readers"])
            ]
            stores.append(
                {
                    "measurement": m,
                    "known": known,
                    "version": ordinal,
                    "rollback": ordinal is None or (ours is not None and ordinal > ours),
                    "files": len(files),
                    "datasets": len(datasets),
                    "owners": len(owners),
                    "bytes": sum(int(d["bytes"]) for d in datasets),
                    "visible": visible,
                }
            )
        return {"measurement": self.measurement, "version": ours, "stores": stores}

    def summary_lines(self) -> list[str]:
        """One sentence per store sealed for another measurement (the start log, ``mesatee attest``, the card)."""
        return sealed_state_summary(self.status())

    # -- grants --------------------------------------------------------------------------------------------------
    def approve(self, grant: Any, public_key: bytes, signature: bytes, audit: Any) -> dict[str, Any]:
        """Check a signed grant, keep it sealed, audit it, and migrate what all grants so far approve."""
        party = verify_migration_grant(grant, public_key, signature)
        src, dst, dataset = str(grant["from"]), str(grant["to"]), str(grant["dataset"])
        with self._lock:
            try:
                self._check_grant(grant, party)
            except (PolicyViolation, NotFound) as exc:
                audit.append(
                    "refusal",
                    party,
                    {"migration_grant": {"from": src, "to": dst, "dataset": dataset}, "reason": exc.message},
                )
                raise
            record = MigrationGrantRecord(dict(grant), bytes(public_key), bytes(signature))
            self.platform.put(f"grants/{src}/{dst}/{party}/{record.digest[:32]}", record.to_json())
            audit.append(
                "grant",
                party,
                {
                    "from": src,
                    "to": dst,
                    "dataset": dataset,
                    "rollback": grant["rollback"],
                    "grant_sha256": record.digest,
                },
            )
            if dst != self.measurement:  # approved ahead of the upgrade, on the old code
                return {
                    "migrated": [],
                    "held": [],
                    "dropped": 0,
                    "recorded": True,
                    "next": f"stop this kernel and run `mesatee-enclave migrate --to {dst}` with this version",
                }
            return self.migrate(src, dst, audit)

    def _check_grant(self, grant: dict[str, Any], party: str) -> None:
        src, dst, dataset = grant["from"], grant["to"], grant["dataset"]
        if self.measurement not in (src, dst):
            msg = (
                f"this kernel runs measurement {self.measurement[:16]}…; a grant from {src[:16]}… to {dst[:16]}… "
                "is for another pair of measurements and cannot be applied here"
            )
            raise PolicyViolation(msg, check="grant-pair")
        if not _sealed_files(self.store_dir(src)):
            self._adopt_unknown(src)
        if not _sealed_files(self.store_dir(src)):
            msg = f"no state sealed for measurement {src[:16]}… waits on this platform"
            raise NotFound(msg, measurement=src)
        mine, theirs = self.versions.ordinal(src), self.versions.ordinal(dst)
        # a measurement this platform never ran is newer than every one it did (it gets the next ordinal)
        if (mine is None or (theirs is not None and mine > theirs)) and grant["rollback"] is not True:
            msg = (
                f"moving state from {src[:16]}… (version {mine}) to {dst[:16]}… (version {theirs}) is a rollback "
                "to older code, which may hold bugs fixed since; the owner must approve it explicitly "
                "(rollback=True)"
            )
            raise PolicyViolation(msg, check="rollback")
        if dataset != ALL:
            entry = self._index(src).get(dataset)
            if entry is None:
                msg = f"no dataset {dataset!r} is sealed for measurement {src[:16]}…"
                raise NotFound(msg, dataset=dataset)
            if entry["owner"] != party:
                msg = f"dataset {dataset!r} belongs to another party; only its owner can approve its migration"
                raise PolicyViolation(msg, dataset=dataset, check="grant-owner")

    def _adopt_unknown(self, src: str) -> None:
        """A signed grant names ``src``: find it among stores from before the marker, and index it.

        Runs after the grant's signature and pair were checked, so the old key is derived for a named measurement only.
        """
        parked = self.data_dir / PARKED
        for directory in sorted(parked.iterdir()) if parked.is_dir() else []:
            if _HEX64.match(directory.name) or not _sealed_files(directory):
                continue
            store = SealedStore(directory, self._secret, src)
            names, _ = store.scan()
            if not names:
                continue  # sealed for some other measurement
            target = parked / src
            directory.rename(target)
            _fsync_dir(parked)
            _write_marker(target, src)
            store = SealedStore(target, self._secret, src)
            for name in names:
                m = _DATASET_META.match(name)
                if m is None:
                    continue
                meta = json.loads(store.get(name))
                data_file = store.path_for(f"svc/datasets/{m.group(1)}/data")
                entry = {
                    "name": str(meta["name"]),
                    "owner": str(meta["owner"]),
                    "rows": int(meta.get("rows", 0)),
                    "sha256": str(meta.get("sha256", "")),
                    "readers": meta.get("readers"),
                    "bytes": data_file.stat().st_size if data_file.exists() else 0,
                }
                self.platform.put(f"index/{src}/datasets/{m.group(1)}", canonical_json(entry))
            self.versions.register_legacy(src)
            log.warning(
                "the store %s, from before the migration index, is sealed for %s…: indexed it", directory.name, src[:16]
            )
            return

    def _grants(self, src: str, dst: str) -> dict[str, set[str]]:
        """Per party, the datasets (or ``*``) its verified grants for (src, dst) approve."""
        approved: dict[str, set[str]] = {}
        prefix = f"grants/{src}/{dst}/"
        for name in self.platform.list(prefix):
            rec = MigrationGrantRecord.from_json(self.platform.get(name))
            try:
                party = verify_migration_grant(rec.grant, rec.public_key, rec.signature)
            except (PolicyViolation, MalformedFrame):
                log.warning("ignoring sealed grant %s: it no longer verifies", name)
                continue
            if rec.grant["from"] != src or rec.grant["to"] != dst or name.split("/")[3] != party:
                log.warning("ignoring sealed grant %s: it is filed under another pair or party", name)
                continue
            approved.setdefault(party, set()).add(str(rec.grant["dataset"]))
        return approved

    # -- the migration ---------------------------------------------------------------------------------------------
    def _plan(
        self, source: SealedStore, names: Iterable[str], index: dict[str, dict[str, Any]], grants: dict[str, set[str]]
    ) -> _Plan:
        units: dict[tuple[str, str], _Unit] = {}
        dropped: list[str] = []

        def unit(kind: str, key: str, owners: Iterable[str]) -> _Unit:
            u = units.get((kind, key))
            if u is None:
                u = units[(kind, key)] = _Unit(kind, key, frozenset(owners))
            return u

        owners_seen: dict[str, str] = {}

        def dataset_owner(ds: str) -> str:
            """The owner in the dataset's own (old-key) metadata: the authority; the index only has to agree."""
            if ds not in owners_seen:
                try:
                    owner = str(json.loads(source.get(f"svc/datasets/{ds}/meta"))["owner"])
                except (NotFound, ValueError, KeyError):
                    owner = ""
                if ds in index and str(index[ds]["owner"]) != owner:
                    log.warning("dataset %r: the index names another owner than its sealed metadata; not moved", ds)
                    owner = ""  # no grant can approve it
                owners_seen[ds] = owner
            return owners_seen[ds]

        for name in names:
            where = _unit_of(name)
            if where is None:
                dropped.append(name)
                continue
            kind, key, owners_from = where
            if owners_from == "dataset":
                owners: Iterable[str] = [dataset_owner(key)]
            elif owners_from == "cells":
                owners = [key]
            elif owners_from:
                owners = _owners_of(source, owners_from, name if kind == "tvm" else key)
            else:
                owners = []
            unit(kind, key, owners).names.append(name)

        chosen: list[_Unit] = []
        held: list[dict[str, Any]] = []
        for u in units.values():

            def approves(owner: str, u: _Unit = u) -> bool:
                given = grants.get(owner, set())
                return ALL in given or (u.kind == "dataset" and u.key in given)

            if u.owners and all(o and approves(o) for o in u.owners):
                chosen.append(u)
            else:
                waiting = sorted(o for o in u.owners if o and not approves(o))
                entry: dict[str, Any] = {"kind": u.kind, "key": u.key, "objects": len(u.names), "waiting_for": waiting}
                if not u.owners or "" in u.owners:
                    entry["reason"] = "no known owner can approve it (none recorded, or the index disagrees)"
                held.append(entry)
        return _Plan(chosen, held, dropped)

    def migrate(self, src: str, dst: str, audit: Any) -> dict[str, Any]:
        """Re-seal what the verified grants for (src, dst) approve; returns the units moved and those held."""
        grants = self._grants(src, dst)
        if not grants:
            return {"migrated": [], "held": [], "dropped": 0}
        src_dir, dst_dir = self.store_dir(src), self.store_dir(dst)
        # The old key is derived here, only after at least one verified grant for exactly this pair.
        source = SealedStore(src_dir, self._secret, src)
        target = SealedStore(dst_dir, self._secret, dst)
        index = self._index(src)
        plan = self._plan(source, source.list(), index, grants)
        if plan.dropped:
            log.info(
                "migration %s… → %s…: %d cache/bookkeeping objects are not moved (caches are rebuilt on use)",
                src[:16],
                dst[:16],
                len(plan.dropped),
            )
        ready: list[_Unit] = []
        for u in plan.units:
            clash = [n for n in u.names if target.exists(n)]
            if clash:
                plan.held.append(
                    {
                        "kind": u.kind,
                        "key": u.key,
                        "objects": len(u.names),
                        "waiting_for": [],
                        "reason": f"{clash[0]!r} already exists under the new measurement",
                    }
                )
            else:
                ready.append(u)
        if not ready:
            return {"migrated": [], "held": plan.held, "dropped": len(plan.dropped)}
        record = self._stage(source, target, src, dst, ready, index)
        late = [f["name"] for f in record["files"] if target.exists(f["name"])]
        if late:  # written under the new measurement while this migration was staging: keep that, move nothing
            shutil.rmtree(self.data_dir / STAGING / record["txn"], ignore_errors=True)
            msg = f"{late[0]!r} was written under the new measurement during the migration; approve it again"
            raise SealingError(msg, name=late[0])
        self.platform.put(f"journal/{record['txn']}", canonical_json(record))  # the commit point
        self._audit_migration(record, audit)
        self._roll_forward(record)
        log.warning(
            "migrated %d objects (%s) from %s… to %s…",
            len(record["files"]),
            ", ".join(f"{u['kind']} {u['key']}" for u in record["units"]),
            src[:16],
            dst[:16],
        )
        return {"migrated": record["units"], "held": plan.held, "dropped": len(plan.dropped), "txn": record["txn"]}

    def _stage(
        self,
        source: SealedStore,
        target: SealedStore,
        src: str,
        dst: str,
        units: list[_Unit],
        index: dict[str, dict[str, Any]],
    ) -> dict[str, Any]:
        txn = secrets.token_hex(8)
        staging_root = self.data_dir / STAGING
        staging_root.mkdir(mode=0o700, exist_ok=True)
        staged = SealedStore(staging_root / txn, self._secret, dst, chunk_size=target.chunk_size)
        files: list[dict[str, str]] = []
        for u in units:
            for name in u.names:
                h = hashlib.sha256()
                with staged.open_writer(name) as writer:
                    for chunk in source.iter_chunks(name):  # each chunk is authenticated under the old key
                        h.update(chunk)
                        writer.write(chunk)
                files.append(
                    {
                        "name": name,
                        "src": source.path_for(name).name,
                        "dst": staged.path_for(name).name,
                        "sha256": h.hexdigest(),
                    }
                )
        for f in files:  # read back under the new key, streaming: what is committed is what was read
            check = hashlib.sha256()
            for chunk in staged.iter_chunks(f["name"]):
                check.update(chunk)
            if check.hexdigest() != f["sha256"]:
                shutil.rmtree(staged.root, ignore_errors=True)
                msg = f"re-sealed copy of {f['name']!r} does not match the original digest; migration aborted"
                raise SealingError(msg, name=f["name"])
        datasets = [u.key for u in units if u.kind == "dataset"]
        return {
            "txn": txn,
            "from": src,
            "to": dst,
            "files": files,
            "units": [
                {"kind": u.kind, "key": u.key, "owners": sorted(u.owners), "objects": len(u.names)} for u in units
            ],
            "index": {ds: index[ds] for ds in datasets if ds in index},
            "datasets": {
                ds: next((f["sha256"] for f in files if f["name"] == f"svc/datasets/{ds}/data"), None)
                for ds in datasets
            },
            "time": time.time(),
        }

    def _audit_migration(self, record: dict[str, Any], audit: Any, *, recovered: bool = False) -> None:
        owners = sorted({o for u in record["units"] for o in u["owners"]})
        details = {
            "txn": record["txn"],
            "from": record["from"],
            "to": record["to"],
            "units": record["units"],
            "datasets": record["datasets"],
            "objects": len(record["files"]),
        }
        if recovered:
            details["recovered"] = True
        audit.append("migration", None, details, concerns=owners)

    def _roll_forward(self, record: dict[str, Any]) -> None:
        """Finish a committed migration (idempotent: a restart may run it again after a crash)."""
        staged_dir = self.data_dir / STAGING / record["txn"]
        src_dir, dst_dir = self.store_dir(record["from"]), self.store_dir(record["to"])
        dst_dir.mkdir(mode=0o700, exist_ok=True)
        for f in record["files"]:
            staged = staged_dir / f["dst"]
            if staged.exists():
                staged.replace(dst_dir / f["dst"])
            elif not (dst_dir / f["dst"]).exists():
                msg = f"committed migration {record['txn']}: {f['name']!r} is neither staged nor in place"
                raise TamperedData(msg, name=f["name"])
        _fsync_dir(dst_dir)
        for f in record["files"]:
            (src_dir / f["src"]).unlink(missing_ok=True)
        if src_dir.is_dir():
            _fsync_dir(src_dir)
        for ds, entry in record["index"].items():
            self.platform.put(f"index/{record['to']}/datasets/{ds}", canonical_json(entry))
            old = f"index/{record['from']}/datasets/{ds}"
            if self.platform.exists(old):
                self.platform.delete(old)
        shutil.rmtree(staged_dir, ignore_errors=True)
        self.platform.delete(f"journal/{record['txn']}")

    def _recover(self) -> None:
        committed = set()
        for name in self.platform.list("journal/"):
            record = json.loads(self.platform.get(name))
            committed.add(record["txn"])
            self._roll_forward(record)
            self.recovered.append(record)
            self.notes.append(
                f"finished migration {record['txn']} ({len(record['files'])} objects) interrupted by a "
                "crash after its commit"
            )
        staging = self.data_dir / STAGING
        for entry in sorted(staging.iterdir()) if staging.is_dir() else []:
            if entry.name not in committed:
                shutil.rmtree(entry, ignore_errors=True)
                self.notes.append(
                    f"discarded migration {entry.name}, interrupted before its commit (the old copy is untouched)"
                )

    def announce(self, audit: Any) -> None:
        """Audit recovered migrations whose entry the crash may have prevented (each txn is entered once)."""
        seen = {e["details"].get("txn") for e in audit.entries() if e["kind"] == "migration"}
        for record in self.recovered:
            if record["txn"] not in seen:
                self._audit_migration(record, audit, recovered=True)
        for note in self.notes:
            log.warning("%s", note)


def _unit_of(name: str) -> tuple[str, str, str] | None:
    """(unit kind, unit key, where its owners come from) for one sealed name; None for what is dropped.

    Dropped: the worker caches (rebuilt on demand) and the audit head (the log continues under the new
    measurement). The differencing guard's history protects the dataset's owner, so it moves with the dataset.
    """
    parts = name.split("/")
    if parts[0] == "audit" or parts[:2] == ["svc", "cache"]:
        return None
    if parts[0] == "cells" and len(parts) >= 3 and not parts[1].startswith("anon"):
        return "cells", parts[1], "cells"
    if parts[0] == "svc" and len(parts) >= 3:
        return _service_unit(parts)
    return "other", parts[0] if parts[0] != "svc" else "/".join(parts[:2]), ""


def _service_unit(parts: list[str]) -> tuple[str, str, str]:
    """The unit of a service object ``svc/<service>/...`` (at least three parts)."""
    if parts[1] == "datasets":
        return "dataset", parts[2], "dataset"
    if parts[1] == "guard" and len(parts) >= 5:
        return "dataset", parts[3], "dataset"
    if parts[1] in ("models", "jobs"):
        return parts[1][:-1], parts[2], parts[1]
    if len(parts) == 4 and parts[1:3] == ["tvm", "modules"]:
        return "tvm", parts[3], "tvm"
    return "other", "/".join(parts[:2]), ""


def _owners_of(source: SealedStore, kind: str, key: str) -> list[str]:
    """Parties a model, job or compiled module belongs to, read from its (old-key) metadata after a grant."""
    try:
        if kind == "models":
            meta = json.loads(source.get(f"svc/models/{key}/meta"))
            return sorted({str(meta.get("trainer", ""))} | {str(o) for o in meta.get("data_owners", [])})
        if kind == "jobs":
            state = json.loads(source.get(f"svc/jobs/{key}/state"))
            spec = state["spec"]
            parties = {str(spec["creator"])} | {str(i["owner"]) for i in spec["inputs"]}
            return sorted(parties | {str(r) for r in spec["receivers"]})
        meta = json.loads(source.get(key))
        return sorted(str(o) for o in meta.get("owners", []))
    except (NotFound, ValueError, KeyError, TypeError, AttributeError):
        return []
