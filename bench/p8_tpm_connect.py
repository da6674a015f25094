"""P8: attested connect at level tpm (swtpm) vs softtee, same run, interleaved.

Connect = TCP + TLS 1.3 handshake + evidence verification + hello (for tpm: a fresh quote, and with an
EK CA pinned, TPM2_MakeCredential by the client and TPM2_ActivateCredential by the kernel's TPM, once
per policy: the AK-EK binding is permanent, so later connects under that policy only need the quote).
The paths take turns (one connect each per round), so load from other jobs falls on all of them alike.
Prints a table and writes bench/results/p8_tpm_connect.json.

Usage: python bench/p8_tpm_connect.py [N] [--no-ecc] [--no-mimic]   (--no-ecc: skip the ECC P-256 EK path, e.g. on
a version without --tpm-ek; --no-mimic: skip the sev-snp path on the MIMIC configfs-tsm tree, whose firmware is a test
chain in this process: it measures the client's checks and the kernel's evidence path, NOT hardware, and a real guest's
report latency is not in it)
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import mesatee_notebook as mn
from mesatee_notebook.remote.channel import open_channel
from tests.conftest import KernelProc, start_kernel, stop_kernel
from tests.tpm.conftest import Swtpm, start_swtpm, stop_swtpm, tpm_info


def stats(samples: list[float]) -> dict[str, float]:
    a = np.asarray(samples) * 1e3
    return {"median_ms": float(np.median(a)), "p90_ms": float(np.percentile(a, 90)), "n": len(a)}


def interleaved(paths: dict[str, tuple[str, Callable[[], mn.Policy]]], n: int) -> dict[str, dict[str, float]]:
    """``policy()`` is called before each connect, outside the timing (a new policy has no activation cache)."""
    for url, policy in paths.values():
        for _ in range(5):
            open_channel(url, policy()).close()
    samples: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(n):
        for name, (url, policy) in paths.items():
            pol = policy()
            t = time.perf_counter()
            ch = open_channel(url, pol)
            samples[name].append(time.perf_counter() - t)
            ch.close()
    return {name: stats(s) for name, s in samples.items()}


def _ek_policy(tpm: Swtpm, k: KernelProc) -> Callable[[], mn.Policy]:
    return lambda: mn.Policy(tpm_ek_roots=tpm.ek_roots, measurements=[k.measurement], min_level="tpm")


def _mimic_sev(root: Path) -> tuple[KernelProc, Callable[[], mn.Policy], object]:
    """A kernel at --level sev-snp on a mimic tree (TEST chain, NOT hardware), and the policy trusting that chain."""
    from mesatee_notebook.attestation.hardware import HardwarePolicy
    from mesatee_notebook.enclave.hw_providers import MIMIC_ENV
    from tests.hardware.mimic import MimicFirmware

    firmware = MimicFirmware(root / "tree", "sev-snp")
    os.environ[MIMIC_ENV] = "1"
    try:
        k = start_kernel(root / "kernel", "--hw-root", str(firmware.root), level="sev-snp")
    finally:
        os.environ.pop(MIMIC_ENV, None)
    pol = mn.Policy(
        measurements=[k.measurement], min_level="sev", hardware=HardwarePolicy(extra_trusted_roots=(firmware.root_pem,))
    )
    return k, lambda: pol, firmware


def main() -> None:
    n = int(next((a for a in sys.argv[1:] if a.isdigit()), "200"))
    with_ecc = "--no-ecc" not in sys.argv
    with_mimic = "--no-mimic" not in sys.argv
    firmware = None
    os.environ.setdefault("MESATEE_HOME", tempfile.mkdtemp())
    os.environ.setdefault("TSS2_LOG", "all+none")  # provisioning probes absent NV indices; tpm2-tss logs each
    kernels: list[KernelProc] = []
    tpms: list[Swtpm] = []
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        try:
            tpms.append(start_swtpm(root / "swtpm"))
            kernels.append(start_kernel(root / "soft"))
            soft = kernels[0]
            ak = tpm_info(tpms[0].tcti)
            kernels.append(start_kernel(root / "tpm", "--tcti", tpms[0].tcti, "--tpm-app-pcr", "16", level="tpm"))
            tk = kernels[1]
            soft_pol = mn.Policy(platform_roots=[soft.fingerprint], measurements=[soft.measurement])
            ak_pol = mn.Policy(platform_roots=[ak], measurements=[tk.measurement], min_level="tpm")
            ek_pol = _ek_policy(tpms[0], tk)()
            paths = {
                "softtee (Ed25519 statement)": (soft.url, lambda: soft_pol),
                "tpm, AK pinned (quote + fresh quote)": (tk.url, lambda: ak_pol),
                "tpm, EK CA pinned, AK activated earlier": (tk.url, lambda: ek_pol),
                "tpm, EK CA pinned, first connect (activation, RSA 2048 EK)": (tk.url, _ek_policy(tpms[0], tk)),
            }
            if with_ecc:
                from tests.tpm.conftest import provision_ecc_ek

                tpms.append(start_swtpm(root / "swtpm-ecc"))
                provision_ecc_ek(tpms[1])
                ek = ("--tcti", tpms[1].tcti, "--tpm-app-pcr", "16", "--tpm-ek", "ecc")
                kernels.append(start_kernel(root / "tpm-ecc", *ek, level="tpm"))
                paths["tpm, EK CA pinned, first connect (activation, ECC P-256 EK)"] = (
                    kernels[2].url,
                    _ek_policy(tpms[1], kernels[2]),
                )
            if with_mimic:
                mk, mpol, firmware = _mimic_sev(root / "mimic")
                kernels.append(mk)
                paths["sev-snp on the MIMIC tree (test chain, NOT hardware)"] = (mk.url, mpol)
            results = interleaved(paths, n)
        finally:
            for k in kernels:
                stop_kernel(k)
            for t in tpms:
                stop_swtpm(t)
            if firmware is not None:
                firmware.close()  # type: ignore[attr-defined]
    base = results["softtee (Ed25519 statement)"]["median_ms"]
    load = os.getloadavg()[0]
    print(f"P8 attested connect, n={n} per path, interleaved (swtpm on loopback, load average {load:.1f})")
    print(f"{'path':<62} {'median ms':>10} {'p90 ms':>10} {'x softtee':>10}")
    for name, r in results.items():
        print(f"{name:<62} {r['median_ms']:>10.2f} {r['p90_ms']:>10.2f} {r['median_ms'] / base:>9.2f}x")
    print("target: tpm connect <= 3x softtee (the MIMIC row is the client's checks + evidence path, not hardware)")
    out = {"benchmark": "P8", "n": n, "load_average": load, "results": results,
           "ratios": {k: v["median_ms"] / base for k, v in results.items()}}  # fmt: skip
    path = Path(__file__).parent / "results" / "p8_tpm_connect.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
