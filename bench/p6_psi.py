"""PSI engine benchmark: canonicalise + hash + intersect, 2 parties, against openmined-psi (ECDH) at small sizes.

Run: python bench/p6_psi.py [--quick] [--baseline-python PATH]      engine only (no upload, no kernel)
     python bench/p6_psi.py --e2e [--full]                           end to end over a real kernel

``--e2e`` starts a real ``mesatee-enclave serve`` (softtee) and plays two parties, each on its own attested
connection with its own identity: alice creates the job, both submit over TLS, bob approves (the job runs in that
call), alice fetches the verified result. Sizes 2^16 and 2^18 per side (``--full`` adds 10^7 and 2^24); results in
``bench/results/p6_psi_e2e.json``.

The openmined-psi baseline is benchmark-only and pins an old protobuf, so it lives in its own venv:
    python -m venv /tmp/psi-baseline-venv && /tmp/psi-baseline-venv/bin/pip install openmined-psi
and is found through --baseline-python or $MESATEE_PSI_BASELINE_PYTHON (skipped with a note otherwise).
The engine figures are engine time only (no upload); ``--e2e`` measures the whole path.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from mesatee_notebook.ml import psi as engine
from mesatee_notebook.ml.psi import PsiInput, PsiKey, run_psi

RESULTS = Path(__file__).resolve().parent / "results" / "p6_psi.json"
SIZES = [1 << 16, 1 << 18, 10_000_000, 1 << 24]
BASELINE_SIZES = {1 << 16, 1 << 18}


def best_of(fn: Any, repeats: int) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def make_sets(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Two sets of n distinct-ish int64 ids sharing half their items; returns the exact intersection size."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2**62, n, dtype=np.int64)
    b = rng.integers(0, 2**62, n, dtype=np.int64)
    b[: n // 2] = a[rng.permutation(n)[: n // 2]]
    b = b[rng.permutation(n)]
    exact = len(np.intersect1d(a, b))  # exact, on the raw ints
    return a, b, exact


def emails(ids: np.ndarray) -> pa.Array:
    as_text = pc.cast(pa.array(ids), pa.string())
    return pc.binary_join_element_wise("user", as_text, "@example.com", "")


def engine_run(a: Any, b: Any, repeats: int) -> dict[str, Any]:
    key = PsiKey.generate()

    def hash_both() -> tuple[PsiInput, PsiInput]:
        left, right = PsiInput("alice", key), PsiInput("bob", key)
        left.add_chunk(a)
        right.add_chunk(b)
        return left, right

    t_hash, (left, right) = best_of(hash_both, repeats)
    t_card, card = best_of(lambda: run_psi([left, right], "cardinality"), repeats)
    t_int, inter = best_of(lambda: run_psi([left, right], "intersection"), repeats)
    return {
        "hash_s": t_hash,
        "cardinality_s": t_card,
        "intersection_s": t_int,
        "end_to_end_cardinality_s": t_hash + t_card,
        "end_to_end_intersection_s": t_hash + t_int,
        "cardinality": card.cardinality,
        "intersection_items": len(inter.items),
    }


_BASELINE = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np
    import private_set_intersection.python as psi
    n, seed = int(sys.argv[1]), int(sys.argv[2])
    data = np.load(sys.argv[3])
    a = [str(x) for x in data["a"]]
    b = [str(x) for x in data["b"]]
    t0 = time.perf_counter()
    server = psi.server.CreateWithNewKey(True)
    client = psi.client.CreateWithNewKey(True)
    setup = server.CreateSetupMessage(0.0, len(b), a, psi.DataStructure.RAW)
    request = client.CreateRequest(b)
    response = server.ProcessRequest(request)
    t1 = time.perf_counter()
    size = client.GetIntersectionSize(setup, response)
    t2 = time.perf_counter()
    print(json.dumps({"seconds": t2 - t0, "protocol_s": t1 - t0, "cardinality": size}))
    """
)


def baseline_python(arg: str | None) -> str | None:
    for candidate in (arg, os.environ.get("MESATEE_PSI_BASELINE_PYTHON"), "/tmp/psi-baseline-venv/bin/python"):
        if candidate and Path(candidate).exists():
            probe = subprocess.run(
                [candidate, "-c", "import private_set_intersection.python, numpy"], capture_output=True, check=False
            )
            if probe.returncode == 0:
                return candidate
    return None


def run_baseline(python: str, a: np.ndarray, b: np.ndarray, seed: int, tmp: Path) -> dict[str, Any]:
    path = tmp / f"psi_baseline_{len(a)}.npz"
    np.savez(path, a=a, b=b)
    out = subprocess.run(
        [python, "-c", _BASELINE, str(len(a)), str(seed), str(path)], capture_output=True, text=True, check=True
    )
    path.unlink()
    return dict(json.loads(out.stdout))


def _packed_sort_locate(keys: list[np.ndarray], row_bits: int) -> list[np.ndarray]:
    """The sort-based variant the engine used before: one packed SIMD sort per party, sorted searches, scatter."""
    shift = np.uint64(row_bits)
    prefixes, orders = [], []
    for h in keys:
        packed = (h >> shift) << shift
        packed |= np.arange(len(h), dtype=np.uint64)
        packed.sort()
        orders.append((packed & np.uint64((1 << row_bits) - 1)).astype(np.intp))
        packed >>= shift
        prefixes.append(packed)
    common = np.unique(prefixes[0])
    for p in prefixes[1:]:
        pos = np.minimum(np.searchsorted(p, common), len(p) - 1)
        common = common[p[pos] == common]
    masks = []
    for p, order in zip(prefixes, orders, strict=True):
        pos = np.minimum(np.searchsorted(common, p), max(len(common) - 1, 0))
        mask = np.empty(len(p), dtype=bool)
        mask[order] = common[pos] == p
        masks.append(mask)
    return masks


def intersect_strategies(n: int, repeats: int) -> dict[str, float]:
    """Compare ways to intersect two sets of n random 64-bit keys and mark every row that matches."""
    rng = np.random.default_rng(3)
    h1 = rng.integers(0, 2**64, n, dtype=np.uint64)
    h2 = rng.integers(0, 2**64, n, dtype=np.uint64)
    h2[: n // 2] = h1[: n // 2]
    lows = rng.integers(0, 2**64, n, dtype=np.uint64)
    row_bits = max(1, (n - 1).bit_length())

    def intersect1d() -> Any:
        common = np.intersect1d(h1, h2)
        return np.isin(h1, common), np.isin(h2, common)

    def hash_join() -> Any:
        return pd.Index(h2).get_indexer(pd.Index(h1)) >= 0, pd.Index(h1).get_indexer(pd.Index(h2)) >= 0

    out = {}
    for label, fn in (
        ("np.intersect1d + np.isin", intersect1d),
        ("packed sort + searchsorted (prefix only)", lambda: _packed_sort_locate([h1, h2], row_bits)),
        ("pandas Index.get_indexer (64-bit only)", hash_join),
        ("pandas.factorize of both (the previous engine's pass)", lambda: pd.factorize(np.concatenate([h1, h2]))),
        (
            "engine: packed sort, 128-bit checked, cardinality",
            lambda: engine._intersect_keys([(h1, lows), (h2, lows)], rows=False),
        ),
        ("engine: packed sort, 128-bit checked, rows+groups", lambda: engine._intersect_keys([(h1, lows), (h2, lows)])),
    ):
        out[label] = best_of(fn, repeats)[0]
    return out


def hash_alternatives(n: int) -> dict[str, float]:
    """Per-item cost of keyed hashing: a hashlib.blake2b loop against the engine's vectorised AES constructions."""
    rng = np.random.default_rng(4)
    ints = rng.integers(0, 2**62, n, dtype=np.int64)
    texts = emails(ints)
    key = os.urandom(32)
    py_texts = texts.to_pylist()
    raw = ints.tobytes()
    t0 = time.perf_counter()
    for i in range(n):
        hashlib.blake2b(raw[8 * i : 8 * i + 8], key=key, digest_size=16).digest()
    t_blake_int = time.perf_counter() - t0
    t0 = time.perf_counter()
    for s in py_texts:
        hashlib.blake2b(s.encode(), key=key, digest_size=16).digest()
    t_blake_str = time.perf_counter() - t0
    k = PsiKey.generate()
    t_aes_int = best_of(lambda: engine.hash_items(ints, k), 3)[0]
    t_aes_str = best_of(lambda: engine.hash_items(texts, k), 3)[0]
    return {
        "blake2b loop, int (ns/item)": t_blake_int / n * 1e9,
        "blake2b loop, str (ns/item)": t_blake_str / n * 1e9,
        "engine AES-PRP, int (ns/item)": t_aes_int / n * 1e9,
        "engine AES-CBC-MAC, str incl. NFC (ns/item)": t_aes_str / n * 1e9,
    }


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:8.3f}"


E2E_RESULTS = Path(__file__).resolve().parent / "results" / "p6_psi_e2e.json"


def _start_kernel(data_dir: Path) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    enclave = [sys.executable, "-m", "mesatee_notebook.cli", "enclave"]
    subprocess.run([*enclave, "init-platform", "--data-dir", str(data_dir)], check=True, capture_output=True)
    log = (data_dir / "serve.log").open("ab")
    proc = subprocess.Popen(
        [*enclave, "serve", "--port", "0", "--level", "softtee", "--data-dir", str(data_dir)],
        stdout=log,
        stderr=log,
        stdin=subprocess.DEVNULL,
    )
    log.close()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        info_path = data_dir / "kernel.json"
        if info_path.exists():
            info = json.loads(info_path.read_text())
            if info["pid"] == proc.pid:
                return proc, info
        if proc.poll() is not None:
            raise RuntimeError((data_dir / "serve.log").read_text())
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("kernel did not start")


def e2e_run(alice: Any, bob: Any, a: Any, b: Any, mode: str, tag: str) -> dict[str, Any]:
    """One PSI job over the real kernel; seconds per step as each party's client sees them."""
    name = f"bench-{tag}-{mode}-{len(a)}"
    t0 = time.perf_counter()
    alice.psi.create(name, [alice.party_id, bob.party_id], mode=mode, receivers=[alice.party_id])
    t1 = time.perf_counter()
    alice.psi.submit(name, a)
    t2 = time.perf_counter()
    bob.psi.submit(name, b)
    t3 = time.perf_counter()
    state = bob.psi.approve(name).state  # the job runs in this call
    t4 = time.perf_counter()
    res = alice.psi.result(name)
    t5 = time.perf_counter()
    assert state == "done", state
    return {
        "create_s": t1 - t0,
        "upload_alice_s": t2 - t1,
        "upload_bob_s": t3 - t2,
        "approve_and_run_s": t4 - t3,
        "result_s": t5 - t4,
        "total_s": t5 - t0,
        "kernel_psi_s": res.info.get("psi_s"),
        "cardinality": res.cardinality,
        "items_returned": None if res.items is None else len(res.items),
    }


def e2e_main(full: bool) -> None:
    import tempfile

    import mesatee_notebook as mn

    sizes = [1 << 16, 1 << 18] + ([10_000_000, 1 << 24] if full else [])
    prior = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"rows": []}
    baseline = {r["n_per_party"]: r.get("openmined-psi (ECDH, RAW)") for r in prior["rows"]}
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="p6e2e-") as tmp:
        proc, info = _start_kernel(Path(tmp) / "kernel")
        try:
            pol = mn.Policy(platform_roots=[info["platform"]], measurements=[info["measurement"]])
            url = f"mesatee://127.0.0.1:{info['port']}"
            alice = mn.connect(url, policy=pol, identity=Path(tmp) / "alice")
            bob = mn.connect(url, policy=pol, identity=Path(tmp) / "bob")
            e2e_run(alice, bob, [1, 2, 3], [2, 3, 4], "intersection", "warmup")  # starts the service worker
            for n in sizes:
                a, b, exact = make_sets(n, seed=n)
                row: dict[str, Any] = {"n_per_party": n, "expected_cardinality": exact}
                for mode in ("cardinality", "intersection"):
                    r = e2e_run(alice, bob, a, b, mode, "int")
                    assert r["cardinality"] == exact
                    row[f"int64 {mode}"] = r
                if n <= 1 << 18 or full:
                    sa, sb = emails(a), emails(b)
                    r = e2e_run(alice, bob, sa, sb, "intersection", "str")
                    assert r["cardinality"] == exact
                    row["email str intersection"] = r
                    del sa, sb
                base = baseline.get(n)
                if base:
                    row["openmined-psi (ECDH, RAW) s, from p6_psi.json"] = base["seconds"]
                rows.append(row)
                print(f"done n={n}", file=sys.stderr, flush=True)
            alice.close()
            bob.close()
        finally:
            proc.send_signal(2)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    load = os.getloadavg()
    # A quick run updates its sizes and keeps the big ones from an earlier --full run.
    old = json.loads(E2E_RESULTS.read_text()) if E2E_RESULTS.exists() else {}
    kept = [r for r in old.get("rows", []) if r["n_per_party"] not in sizes]
    machine = {"cpu_count": os.cpu_count(), "load_average_at_end": load, "full": full}
    merged = {**old, "machine": machine, "rows": sorted(kept + rows, key=lambda r: int(r["n_per_party"]))}
    E2E_RESULTS.write_text(json.dumps(merged, indent=2) + "\n")
    print("\nPSI end to end over a real softtee kernel, 2 parties, half shared; seconds")
    head = f"{'n/party':>10} {'input / mode':<26} {'upload A':>9} {'upload B':>9} {'run':>8} {'result':>8} {'total':>8}"
    print(head)
    print("-" * len(head))
    for row in rows:
        for label in ("int64 cardinality", "int64 intersection", "email str intersection"):
            step: dict[str, Any] | None = row.get(label)
            if step:
                print(
                    f"{row['n_per_party']:>10} {label:<26} {step['upload_alice_s']:9.3f} {step['upload_bob_s']:9.3f} "
                    f"{step['approve_and_run_s']:8.3f} {step['result_s']:8.3f} {step['total_s']:8.3f}"
                )
        base = row.get("openmined-psi (ECDH, RAW) s, from p6_psi.json")
        if base:
            ours = row["int64 cardinality"]["total_s"]
            print(f"{'':>10} openmined-psi (ECDH) {base:.1f} s: {base / ours:,.0f}x our end to end cardinality")
    print(f"\nload average at end: {load[0]:.2f} on {os.cpu_count()} CPUs; wrote {E2E_RESULTS}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="only the two small sizes")
    ap.add_argument("--baseline-python", default=None)
    ap.add_argument("--no-strings", action="store_true")
    ap.add_argument("--e2e", action="store_true", help="end to end over a real kernel (upload, intersect, result)")
    ap.add_argument("--full", action="store_true", help="with --e2e: also 10^7 and 2^24 items per side")
    args = ap.parse_args()
    if args.e2e:
        e2e_main(args.full)
        return
    sizes = SIZES[:2] if args.quick else SIZES
    python = baseline_python(args.baseline_python)
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    rows: list[dict[str, Any]] = []
    for n in sizes:
        repeats = 3 if n <= 1 << 18 else 1
        a, b, exact = make_sets(n, seed=n)
        row: dict[str, Any] = {"n_per_party": n, "parties": 2, "expected_cardinality": exact}
        row["int64 (numpy)"] = engine_run(a, b, repeats)
        assert row["int64 (numpy)"]["cardinality"] == exact, "engine disagrees with np.intersect1d"
        if not args.no_strings:
            sa, sb = emails(a), emails(b)
            row["email str (Arrow)"] = engine_run(sa, sb, repeats)
            assert row["email str (Arrow)"]["cardinality"] == exact
            del sa, sb
        if n in BASELINE_SIZES:
            if python is not None:
                base = run_baseline(python, a, b, n, tmp)
                assert base["cardinality"] == exact, "openmined-psi disagrees"
                row["openmined-psi (ECDH, RAW)"] = base
            else:
                row["openmined-psi (ECDH, RAW)"] = None
        rows.append(row)
        print(f"done n={n}", file=sys.stderr, flush=True)
    strategies = {str(n): intersect_strategies(n, 3 if n <= 1 << 18 else 1) for n in (1 << 18, 1 << 24)}
    hashing = hash_alternatives(1 << 18)
    load = os.getloadavg()
    result = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "pyarrow": pa.__version__,
            "pandas": pd.__version__,
            "load_average_at_end": load,
        },
        "rows": rows,
        "intersection_strategies_s": strategies,
        "hashing_ns_per_item": hashing,
        "baseline_python": python,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")

    print("\nPSI engine, 2 parties, half of the items shared; seconds (best of 3 below 1M items, else one run)")
    head = f"{'n/party':>10} {'input':<26} {'hash':>8} {'card.':>8} {'inter.':>8} {'e2e card':>9} {'e2e int':>9}"
    print(head)
    print("-" * len(head))
    for row in rows:
        for label in ("int64 (numpy)", "email str (Arrow)"):
            r = row.get(label)
            if r:
                print(
                    f"{row['n_per_party']:>10} {label:<26} {fmt(r['hash_s'])} {fmt(r['cardinality_s'])} "
                    f"{fmt(r['intersection_s'])} {fmt(r['end_to_end_cardinality_s'])} "
                    f"{fmt(r['end_to_end_intersection_s'])}"
                )
        if "openmined-psi (ECDH, RAW)" in row:
            base = row["openmined-psi (ECDH, RAW)"]
            if base is None:
                print(f"{row['n_per_party']:>10} openmined-psi: skipped (no baseline interpreter, see docstring)")
            else:
                ours = row["int64 (numpy)"]["end_to_end_cardinality_s"]
                print(
                    f"{row['n_per_party']:>10} {'openmined-psi (ECDH)':<26} {'':>8} {'':>8} {'':>8} "
                    f"{fmt(base['seconds'])}  ({base['seconds'] / ours:,.0f}x the engine on int64)"
                )
    print("\nIntersect + locate every row, two sets of random uint64 keys (seconds):")
    for size, table in strategies.items():
        for label, secs in table.items():
            print(f"  n={size:>9}  {label:<40} {secs:8.3f}")
    print("\nKeyed hashing, 2^18 items (ns/item):")
    for label, ns in hashing.items():
        print(f"  {label:<46} {ns:8.1f}")
    print(f"\nload average at end: {load[0]:.2f} on {os.cpu_count()} CPUs; wrote {RESULTS}")


if __name__ == "__main__":
    main()
