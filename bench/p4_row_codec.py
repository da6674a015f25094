"""P4, in process: the CPU a 1-row predict spends outside the channel, DataFrame row against numpy row.

What ``gbdt.predict`` of one row does on top of the channel, each step timed alone in CPU seconds
(``time.process_time``, so a loaded machine slows it less than wall time): the client's encode of the input
(``encode_value``), the worker's decode (``decode_value`` with the party as scope) and ``GBDTModel.to_matrix``
(names, dtypes, the float32 matrix). The frame is the P4 bench's (28 float32 features of ``higgs_like``), and
the baseline is the same row as a numpy array, in the same run. ``--tree PATH`` runs the same in another source
tree (e.g. a ``git worktree`` of main) in a subprocess, alternately with this one.

    python bench/p4_row_codec.py [--repeat N] [--samples S] [--tree PATH]

Prints a table (microseconds of CPU per call, median of the samples) and writes bench/results/p4_row_codec.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._timing import alternate_trees

HERE = Path(__file__).resolve().parents[1]

CHILD = r"""
import inspect, json, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np
from bench.p3_gbdt import PARAMS, higgs_like
from mesatee_notebook.ml.gbdt import train
from mesatee_notebook.wire import codecs
repeat = int(sys.argv[2])
df = higgs_like(2000)
model = train(df, "label", params=PARAMS, num_boost_round=5)
one = df.drop(columns=["label"]).iloc[:1]
row = one.to_numpy(dtype=np.float32)
scoped = "scope" in inspect.signature(codecs.decode_value).parameters
def wire(v):
    return b"".join(bytes(memoryview(p).cast("B")) for p in codecs.encode_value(v).parts)
def decode(kind, raw):
    return codecs.decode_value(kind, raw, scope="party") if scoped else codecs.decode_value(kind, raw)
def cpu(fn):
    for _ in range(3):
        fn()
    t0 = time.process_time()
    for _ in range(repeat):
        fn()
    return (time.process_time() - t0) / repeat * 1e6
out = {}
for name, value, kind in (("DataFrame row", one, "arrow.frame"), ("numpy row", row, "npy")):
    raw = wire(value)
    got = decode(kind, raw)
    out[name] = {
        "encode_us": cpu(lambda: codecs.encode_value(value)),
        "decode_us": cpu(lambda: decode(kind, raw)),
        "to_matrix_us": cpu(lambda: model.to_matrix(got)),
        "bytes": len(raw),
    }
    out[name]["total_us"] = out[name]["encode_us"] + out[name]["decode_us"] + out[name]["to_matrix_us"]
print(json.dumps(out))
"""


def sample(tree: Path, repeat: int) -> dict[str, dict[str, float]]:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(tree), str(repeat)],
        capture_output=True,
        text=True,
        check=True,
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
    )
    result: dict[str, dict[str, float]] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2000)
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--tree", type=Path, help="another source tree to compare with, run alternately")
    args = parser.parse_args()
    trees, runs, loads = alternate_trees(HERE, args.tree, args.samples, lambda tree: sample(tree, args.repeat))
    print(f"P4 row codec, CPU us per call (median of {args.samples}); load before each: {loads}")
    print(f"{'tree':<12} {'input':<14} {'encode':>8} {'decode':>8} {'to_matrix':>10} {'total':>8} {'x numpy':>8}")
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for name, samples in runs.items():
        summary[name] = {}
        for kind in samples[0]:
            summary[name][kind] = {k: statistics.median(s[kind][k] for s in samples) for k in samples[0][kind]}
        base = summary[name]["numpy row"]["total_us"]
        for kind, med in summary[name].items():
            print(
                f"{name:<12} {kind:<14} {med['encode_us']:>8.1f} {med['decode_us']:>8.1f} {med['to_matrix_us']:>10.1f}"
                f" {med['total_us']:>8.1f} {med['total_us'] / base:>7.1f}x"
            )
    out = {
        "bench": "p4_row_codec",
        "when": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "loadavg_per_sample": loads},
        "trees": {name: str(tree) for name, tree in trees.items()},
        "summary": summary,
        "samples": runs,
    }
    path = HERE / "bench" / "results" / "p4_row_codec.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
