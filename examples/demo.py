"""Headless demo: start the embedded enclave kernel, attest it, run a cell over a DataFrame, verify the receipt."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

import mesatee_notebook as mn


def main() -> None:
    """Run the demo."""
    t0 = time.perf_counter()
    s = mn.connect()  # starts (or reuses) the local softtee kernel and verifies its evidence
    print(f"connected and attested in {time.perf_counter() - t0:.2f} s\n")
    print(s.attestation)
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"region": rng.choice(["north", "south", "east"], 1000), "spend": rng.gamma(2.0, 30.0, 1000)})
    r = s.run(
        "summary = df.groupby('region').spend.agg(['count', 'mean']).round(2)\n"
        "print('rows seen in the enclave:', len(df))\n"
        "summary",
        inputs={"df": df},
        outputs=["summary"],
        stream=True,
    )
    print("\nresult (came back with a verified receipt):")
    print(r.value)
    path = Path(tempfile.gettempdir()) / "mesatee-demo-receipt.json"
    r.receipt.save(path)
    v = mn.verify_receipt(path)  # offline: from the file alone, pinning the local platform
    print(
        f"\nreceipt saved to {path} and verified offline: session {v.predicate['session']}, "
        f"measurement {v.predicate['measurement'][:16]}…, outputs {sorted(v.subjects)}"
    )
    print(f"also from a shell: mesatee verify-receipt {path}")
    s.close()


if __name__ == "__main__":
    main()
