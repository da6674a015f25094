"""Fixtures for functions-as-a-service tests: three parties on one real kernel (the session's ``kernel``)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import numpy as np
import pandas as pd
import pytest

import mesatee_notebook as mn
from tests.conftest import KernelProc


class Parties:
    """A (developer, receiver), B and C (data owners), each with its own identity and TLS connection."""

    def __init__(self, kernel: KernelProc, root: Path) -> None:
        policy = cast("mn.Policy", kernel.policy())
        self.kernel = kernel
        self.a = mn.connect(kernel.url, policy=policy, identity=root / "a")
        self.b = mn.connect(kernel.url, policy=policy, identity=root / "b")
        self.c_identity = root / "c"
        self.c = mn.connect(kernel.url, policy=policy, identity=self.c_identity)
        rng = np.random.default_rng(3)
        self.sales_b = pd.DataFrame(
            {"x": rng.normal(size=200), "y": rng.integers(0, 100, 200), "ssn": rng.integers(0, 10**9, 200)}
        )
        self.sales_c = pd.DataFrame({"x": rng.normal(size=150), "y": rng.integers(0, 100, 150)})
        self.ds_b = f"sales_b_{uuid.uuid4().hex[:6]}"
        self.ds_c = f"sales_c_{uuid.uuid4().hex[:6]}"
        self.b.upload(self.sales_b, self.ds_b, policy=mn.DataPolicy(hidden_columns=("ssn",)))
        self.c.upload(self.sales_c, self.ds_c)

    def close(self) -> None:
        for s in (self.a, self.b, self.c):
            s.close()


@pytest.fixture(scope="module")
def parties(kernel: KernelProc, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Parties]:
    p = Parties(kernel, tmp_path_factory.mktemp("faas"))
    yield p
    p.close()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"
