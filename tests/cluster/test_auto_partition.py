"""A plain ``upload`` above the head's size threshold is partitioned across the workers (issue 18, "Data")."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import mesatee_notebook as mn
from mesatee_notebook.wire.codecs import encode_value
from tests.conftest import KernelProc, start_kernel, stop_kernel

from .conftest import Cluster, enclave

pytestmark = pytest.mark.slow

#: The head's threshold in this module: 64 KiB, so a 4,000-row frame is partitioned and a 40-row one is not.
THRESHOLD_MB = 1 / 16


@pytest.fixture(scope="module")
def head(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KernelProc]:
    data_dir = tmp_path_factory.mktemp("autohead")
    shutil.copytree(cluster.data_dir / "platform", data_dir / "platform")
    k = start_kernel(data_dir, "--cluster", cluster.url, "--auto-partition-mb", str(THRESHOLD_MB))
    yield k
    stop_kernel(k)


def frame(n: int) -> pd.DataFrame:
    rng = np.random.default_rng(3)
    return pd.DataFrame({"k": rng.choice(["a", "b", "c"], n), "x": rng.integers(0, 1000, n), "y": rng.normal(size=n)})


def _upload(s: mn.Session, df: pd.DataFrame, name: str, **args: object) -> dict[str, object]:
    res = s.call("dataset.upload", {"name": name, "policy": {}, "replace": False, **args}, {"data": df})
    return dict(res.info)


def test_a_big_plain_upload_is_partitioned_and_queries_equal_pandas(head: KernelProc, tmp_path: Path) -> None:
    big, small = frame(4000), frame(40)
    size = len(b"".join(encode_value(big).parts))
    assert size > THRESHOLD_MB * (1 << 20) > len(b"".join(encode_value(small).parts))
    with mn.connect(head.url, policy=head.policy(), identity=tmp_path / "owner") as s:
        info = _upload(s, big, "auto_big")
        small_info = _upload(s, small, "auto_small")
        sdf = s.upload(big, "auto_big2")  # the client API, same path
        got = s.dataframe("auto_big").groupby("k").agg(n=("x", "size"), t=("x", "sum"), m=("y", "mean")).collect()
        names = {d["name"]: d for d in s.datasets()}
    parts = info["partitions"]
    assert isinstance(parts, list)
    # every worker holds a share, and no partition is over the threshold: max(2 workers, ceil(size / threshold))
    assert len(parts) == max(2, -(-size // int(THRESHOLD_MB * (1 << 20))))
    assert {p["worker"] for p in parts} == set(info["workers"][i]["address"] for i in range(2))  # type: ignore[index]
    assert sum(int(p["rows"]) for p in parts) == len(big)
    assert "partitions" not in small_info  # under the threshold: one node, as without a cluster
    assert list(sdf.columns) == list(big.columns)
    want = big.groupby("k").agg(n=("x", "size"), t=("x", "sum"), m=("y", "mean"))
    pd.testing.assert_frame_equal(got, want, check_dtype=False)
    assert {"auto_big", "auto_small", "auto_big2"} <= set(names)


def test_an_explicit_partition_count_wins_and_replace_keeps_the_rules(head: KernelProc, tmp_path: Path) -> None:
    big = frame(4000)
    with mn.connect(head.url, policy=head.policy(), identity=tmp_path / "owner") as s:
        one = s.call(
            "cluster.upload", {"name": "auto_exp", "policy": {}, "replace": False, "partitions": 1}, {"data": big}
        ).info
        with pytest.raises(mn.PolicyViolation, match="already exists"):
            _upload(s, big, "auto_exp")  # a big plain upload over an existing name still needs replace=True
        again = _upload(s, big, "auto_exp", replace=True)
        with pytest.raises(mn.PolicyViolation, match="partitioned on the cluster"):
            _upload(s, frame(40), "auto_exp", replace=True)  # a small one cannot replace partitions it cannot see
        rows = s.dataframe("auto_exp").x.sum().collect()
    with mn.connect(head.url, policy=head.policy(), identity=tmp_path / "other") as other:
        with pytest.raises(mn.PolicyViolation, match="another party"):
            _upload(other, big, "auto_exp", replace=True)  # another party's name, partitioned or not
    assert len(one["partitions"]) == 1
    assert len(again["partitions"]) >= 2
    assert rows == big.x.sum()


def test_a_bad_threshold_is_refused_before_the_kernel_starts(tmp_path: Path) -> None:
    for bad in ("-1", "nan", "inf", "lots"):
        proc = subprocess.run(
            enclave(
                "serve", "--data-dir", str(tmp_path), "--cluster", "atls://127.0.0.1:1", "--auto-partition-mb", bad
            ),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 2, proc.stderr
        assert "megabytes" in proc.stderr
        assert "Traceback" not in proc.stderr
