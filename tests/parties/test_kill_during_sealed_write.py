"""kill -9 of the kernel in the middle of a sealed write, then a restart: earlier data intact, nothing half-written."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

import numpy as np
import pandas as pd
import pytest

import mesatee_notebook as mn
from tests.conftest import start_kernel, stop_kernel


@pytest.mark.slow
def test_kill_9_mid_sealed_write_keeps_earlier_data(tmp_path):
    data_dir = tmp_path / "k"
    small = pd.DataFrame({"g": ["a", "b"] * 50, "x": np.arange(100.0)})
    k = start_kernel(data_dir)
    killed = False
    try:
        owner = mn.connect(k.url, policy=k.policy(), identity=tmp_path / "owner")
        before = owner.upload(small, "kept", policy=mn.DataPolicy(min_group_size=10))
        digest = owner.call("dataset.info", {"name": "kept"}).info["sha256"]
        sealed = data_dir / "sealed"
        big = pd.DataFrame(np.random.default_rng(1).random((6_000_000, 4)), columns=list("abcd"))
        errors: list[BaseException] = []

        def upload() -> None:
            try:
                owner.upload(big, "half_written")
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=upload)
        t.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            if any(p.name.endswith(".part") for p in sealed.iterdir()):
                os.kill(k.proc.pid, signal.SIGKILL)
                killed = True
            time.sleep(0.002)
        t.join(60)
        assert killed, "never saw the sealed write in progress"
        assert errors and isinstance(errors[0], mn.MesateeError)
        del before
        with contextlib.suppress(mn.MesateeError):
            owner.close()
    finally:
        if not killed:
            stop_kernel(k)
        else:
            k.proc.wait(10)
    k2 = start_kernel(data_dir)
    try:
        owner = mn.connect(k2.url, policy=k2.policy(), identity=tmp_path / "owner")
        names = [d["name"] for d in owner.datasets()]
        assert "kept" in names and "half_written" not in names
        assert owner.call("dataset.info", {"name": "kept"}).info["sha256"] == digest
        got = owner.dataframe("kept").groupby("g").agg(s=("x", "sum")).collect()
        assert got["s"].tolist() == [small[small.g == "a"].x.sum(), small[small.g == "b"].x.sum()]
        assert not any(p.name.endswith(".part") for p in (data_dir / "sealed").iterdir())
        owner.close()
    finally:
        stop_kernel(k2)
