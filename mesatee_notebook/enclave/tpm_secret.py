"""At ``--level tpm`` the platform sealing secret lives in the TPM, sealed to the quoted PCRs.

Every sealed store's key is ``HKDF(sealing secret, measurement)`` (``enclave/sealing.py``). At softtee the secret is a
file, ``DATA_DIR/platform/sealing.key``. At ``tpm`` it is a TPM data object (``Tpm.seal``) under the owner hierarchy's
storage key, whose policy is ``TPM2_PolicyPCR`` over the boot PCRs named at serve time *and* the application PCR:

    DATA_DIR/platform/tpm-sealed/<measurement>.json   {"v": 1, "measurement", "pcrs": {index: hex}, "policy",
                                                        "public", "private", "tpm_vendor", "tpm_kind"}

So the TPM gives the secret back only to a kernel whose measurement is in the application PCR, on a machine whose
boot PCRs are the ones at sealing time, and only that TPM can load the object (it is sealed under that TPM's SRK).

* **From the file** (a data directory served before, at softtee or at tpm): the first ``--level tpm`` start seals
  the file's secret, checks that it unseals, writes the blob, then overwrites and deletes ``sealing.key``. The secret
  is the same, so every store stays readable; the log and ``status()`` say it moved.
* **An upgrade** (new measurement B): B cannot unseal A's blob (the application PCR differs). The version that serves
  A reseals the secret for B: ``mesatee-enclave tpm-reseal --for B`` (:func:`reseal_for`) relaunches A's measurement
  into the application PCR, unseals, and seals the same secret for B's application PCR value. B then starts, shows
  A's parked state, and owners' grants move it (``enclave/migration.py``), as at softtee.

What this does not do: with swtpm (a software TPM) the blob's protection is swtpm's state file, which whoever runs
swtpm holds; and a root user can reset the (resettable) application PCR and extend any measurement into it. A boot
PCR change (a firmware or kernel update on a chip) locks the secret: reseal before such an update.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from mesatee_notebook.attestation.tpm import app_pcr_value
from mesatee_notebook.enclave.tpm import Tpm
from mesatee_notebook.errors import SealingError

__all__ = ["SEALED_DIR", "reseal_for", "secret_in_tpm", "tpm_sealing_secret"]

log = logging.getLogger("mesatee.enclave")

SEALED_DIR = "tpm-sealed"
_FORMAT = 1


def _pdir(data_dir: Path) -> Path:
    return Path(data_dir).expanduser() / "platform"


def _blob_path(data_dir: Path, measurement: str) -> Path:
    return _pdir(data_dir) / SEALED_DIR / f"{measurement}.json"


def secret_in_tpm(data_dir: Path) -> bool:
    """Whether the sealing secret of ``data_dir`` has been moved into a TPM (some blob exists)."""
    return any((_pdir(data_dir) / SEALED_DIR).glob("*.json"))


def _sealed_for(data_dir: Path) -> list[str]:
    return sorted(p.stem for p in (_pdir(data_dir) / SEALED_DIR).glob("*.json"))


def _write_blob(tpm: Tpm, data_dir: Path, measurement: str, secret: bytes, pcrs: dict[int, str]) -> Path:
    """Seal ``secret`` for ``pcrs`` and write the blob atomically (0600)."""
    policy = tpm.pcr_policy(pcrs)
    public, private = tpm.seal(secret, policy)
    blob = {
        "v": _FORMAT,
        "measurement": measurement,
        "pcrs": {str(i): v for i, v in sorted(pcrs.items())},
        "policy": policy.hex(),
        "public": public.hex(),
        "private": private.hex(),
        "tpm_vendor": tpm.vendor,
        "tpm_kind": tpm.kind,
    }
    path = _blob_path(data_dir, measurement)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    tmp = path.with_suffix(".part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(blob, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)
    _fsync_dir(path.parent)
    return path


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_blob(path: Path) -> dict[str, Any]:
    try:
        blob = json.loads(path.read_text())
        bytes.fromhex(blob["public"]), bytes.fromhex(blob["private"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        msg = f"the TPM-sealed sealing secret {path} cannot be read ({exc})"
        raise SealingError(msg) from exc
    if blob.get("v") != _FORMAT:
        msg = f"the TPM-sealed sealing secret {path} has format {blob.get('v')!r}; this version reads {_FORMAT}"
        raise SealingError(msg)
    return dict(blob)


def _unseal(tpm: Tpm, path: Path) -> bytes:
    blob = _read_blob(path)
    try:
        secret = tpm.unseal(bytes.fromhex(blob["public"]), bytes.fromhex(blob["private"]))
    except tpm.errors as exc:
        now = tpm.read_pcrs()
        changed = sorted(int(i) for i, v in blob["pcrs"].items() if now.get(int(i)) != v)
        why = (
            f"PCRs {changed} differ from when it was sealed"
            if changed
            else "the PCRs match, so this is another TPM (or its owner hierarchy was cleared)"
        )
        msg = (
            f"the TPM at {tpm.tcti!r} refuses to unseal the sealing secret ({path.name}): {why}. "
            f"TPM said: {exc}. Sealed data stays unreadable until the PCRs are as they were (a boot PCR change "
            "means this machine booted other firmware or another OS; reseal before such an update)"
        )
        raise SealingError(msg, changed_pcrs=changed) from exc
    if len(secret) < 32:
        msg = f"the TPM unsealed a {len(secret)}-byte sealing secret from {path.name}; expected 32"
        raise SealingError(msg)
    return secret


def _retire_file(path: Path) -> None:
    """Overwrite the file-sealed secret with zeros, then delete it (the TPM holds it now)."""
    size = path.stat().st_size
    with path.open("r+b") as fh:
        fh.write(bytes(size))
        fh.flush()
        os.fsync(fh.fileno())
    path.unlink()
    _fsync_dir(path.parent)


def tpm_sealing_secret(tpm: Tpm, data_dir: Path, measurement: str) -> bytes:
    """The sealing secret for a kernel with ``measurement``, after its measured launch into ``tpm``'s app PCR.

    Unseals this measurement's blob; or moves ``sealing.key`` into the TPM (first start at ``tpm``); or refuses
    with a :class:`SealingError` that says how to reseal when only other measurements' blobs exist.
    """
    path = _blob_path(data_dir, measurement)
    if path.exists():
        secret = _unseal(tpm, path)
        log.info("sealing secret unsealed by the TPM (%s, %s) from %s", tpm.vendor, tpm.kind, path.name[:16])
        return secret
    key_file = _pdir(data_dir) / "sealing.key"
    if key_file.exists():
        secret = key_file.read_bytes()
        _write_blob(tpm, data_dir, measurement, secret, tpm.read_pcrs())
        if _unseal(tpm, path) != secret:
            path.unlink()
            msg = "the TPM unsealed something other than the secret just sealed; the file-sealed secret is kept"
            raise SealingError(msg)
        _retire_file(key_file)
        log.warning(
            "sealing secret moved from %s into the TPM (%s, %s), sealed to PCRs %s; the file is deleted. "
            "Sealed data stays readable (same secret)%s",
            key_file,
            tpm.vendor,
            tpm.kind,
            ",".join(map(str, tpm.pcrs)),
            ": a software TPM is software trust, its state file holds the seal" if tpm.kind == "software" else "",
        )
        return secret
    others = _sealed_for(data_dir)
    if others:
        msg = (
            f"the sealing secret of {data_dir} is sealed in the TPM for measurement(s) "
            f"{', '.join(m[:16] + '…' for m in others)}, not for this kernel's {measurement[:16]}…: the TPM gives it "
            "only to a kernel whose measurement is in the application PCR. With the version that serves the old "
            f"measurement, stopped, run `mesatee-enclave tpm-reseal --for {measurement} --tcti {tpm.tcti} "
            f"--data-dir {data_dir}`, then start this version; owners' grants then move their data"
        )
        raise SealingError(msg, sealed_for=others, measurement=measurement)
    msg = f"{data_dir} has no sealing secret (no platform/sealing.key, no TPM-sealed blob): run init-platform"
    raise SealingError(msg)


def reseal_for(tpm: Tpm, data_dir: Path, here: str, target: str) -> Path:
    """As the version with measurement ``here``: launch it, unseal, and seal the same secret for ``target``.

    ``target``'s policy names the current boot PCRs and the application PCR value a launch of ``target`` gives.
    """
    target = target.strip().lower()
    if len(target) != 64 or any(c not in "0123456789abcdef" for c in target):
        msg = f"--for takes a measurement (64 hex digits), not {target!r}"
        raise SealingError(msg)
    tpm.measured_launch(here)
    secret = tpm_sealing_secret(tpm, data_dir, here)  # also moves a file-sealed secret in first
    pcrs = {**tpm.read_pcrs(), tpm.app_pcr: app_pcr_value(target)}
    path = _write_blob(tpm, data_dir, target, secret, pcrs)
    log.info("sealing secret resealed for measurement %s (application PCR %d)", target[:16], tpm.app_pcr)
    return path
