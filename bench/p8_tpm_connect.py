"""P8: attested connect at level tpm (swtpm) vs softtee, same run.

Connect = TCP + TLS 1.3 handshake + evidence verification + hello (for tpm: a fresh quote, and with an
EK CA pinned, TPM2_MakeCredential by the client and TPM2_ActivateCredential by the kernel's TPM, once
per policy: the AK-EK binding is permanent, so later connects under that policy only need the quote).
Prints a table and writes bench/results/p8_tpm_connect.json. Usage: python bench/p8_tpm_connect.py [N]
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
from tests.conftest import start_kernel, stop_kernel
from tests.tpm.conftest import start_swtpm, stop_swtpm, tpm_info


def stats(samples: list[float]) -> dict[str, float]:
    a = np.asarray(samples) * 1e3
    return {"median_ms": float(np.median(a)), "p90_ms": float(np.percentile(a, 90)), "n": len(a)}


def connects(url: str, policy: Callable[[], mn.Policy], n: int) -> dict[str, float]:
    """``policy()`` is called before each connect, outside the timing (a new policy has no activation cache)."""
    for _ in range(10):
        open_channel(url, policy()).close()
    out = []
    for _ in range(n):
        pol = policy()
        t = time.perf_counter()
        ch = open_channel(url, pol)
        out.append(time.perf_counter() - t)
        ch.close()
    return stats(out)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    os.environ.setdefault("MESATEE_HOME", tempfile.mkdtemp())
    rows: list[tuple[str, Callable[[], dict[str, float]]]] = []
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        tpm = start_swtpm(root / "swtpm")
        soft = start_kernel(root / "soft")
        ak = tpm_info(tpm.tcti)
        tk = start_kernel(root / "tpm", "--tcti", tpm.tcti, "--tpm-app-pcr", "16", level="tpm")
        try:
            soft_pol = mn.Policy(platform_roots=[soft.fingerprint], measurements=[soft.measurement])
            ak_pol = mn.Policy(platform_roots=[ak], measurements=[tk.measurement], min_level="tpm")

            def new_ek_pol() -> mn.Policy:
                return mn.Policy(tpm_ek_roots=tpm.ek_roots, measurements=[tk.measurement], min_level="tpm")

            ek_pol = new_ek_pol()
            rows = [
                ("softtee (Ed25519 statement)", lambda: connects(soft.url, lambda: soft_pol, n)),
                ("tpm, AK pinned (quote + fresh quote)", lambda: connects(tk.url, lambda: ak_pol, n)),
                ("tpm, EK CA pinned, AK activated earlier", lambda: connects(tk.url, lambda: ek_pol, n)),
                ("tpm, EK CA pinned, first connect (activation)", lambda: connects(tk.url, new_ek_pol, n)),
            ]
            results = {name: run() for name, run in rows}
        finally:
            stop_kernel(tk)
            stop_kernel(soft)
            stop_swtpm(tpm)
    base = results[rows[0][0]]["median_ms"]
    print(f"P8 attested connect, n={n} (swtpm on loopback)")
    print(f"{'path':<50} {'median ms':>10} {'p90 ms':>10} {'x softtee':>10}")
    for name, r in results.items():
        print(f"{name:<50} {r['median_ms']:>10.2f} {r['p90_ms']:>10.2f} {r['median_ms'] / base:>9.2f}x")
    print("target: tpm connect <= 3x softtee")
    out = {"benchmark": "P8", "n": n, "results": results,
           "ratios": {k: v["median_ms"] / base for k, v in results.items()}}  # fmt: skip
    path = Path(__file__).parent / "results" / "p8_tpm_connect.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
