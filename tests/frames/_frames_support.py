"""Test support: an in-process FrameBackend over the real plan JSON and the enclave evaluator."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from mesatee_notebook.enclave.frames import FrameEvaluator
from mesatee_notebook.remote.frame import DPResult, FrameBackend, SecureDataFrame
from mesatee_notebook.wire.datapolicy import DataPolicy

OWNER = "party-owner"
ANALYST = "party-analyst"


class InProcessBackend:
    """A FrameBackend that sends the plan as JSON text to an in-process evaluator."""

    def __init__(self, evaluator: FrameEvaluator, party: str) -> None:
        self.evaluator = evaluator
        self.party = party
        self.plans: list[str] = []

    def collect(self, plan_json: str, **options: Any) -> tuple[Any, Any]:
        assert isinstance(plan_json, str)
        self.plans.append(plan_json)
        result = self.evaluator.evaluate(plan_json, self.party, **options)
        receipt = {"plan_sha256": result.plan_sha256, "suppressed": result.suppressed}
        if result.dp is not None:
            return DPResult(result.value, result.accuracy, result.dp, receipt), receipt
        return result.value, receipt

    def privacy_budget(self, name: str) -> dict[str, Any] | None:
        return self.evaluator.privacy_budget(name, self.party)

    def dataframe(self, name: str) -> SecureDataFrame:
        return SecureDataFrame.from_dataset_info(self.evaluator.dataset_info(name, self.party), self)


class World:
    """Datasets, an evaluator with a recording audit hook, and one backend per party."""

    def __init__(self, datasets: dict[str, tuple[pd.DataFrame, DataPolicy, str]], history_limit: int = 256) -> None:
        self.datasets = datasets
        self.events: list[dict[str, Any]] = []
        self.evaluator = FrameEvaluator(datasets, self.events.append, history_limit=history_limit)

    def backend(self, party: str) -> InProcessBackend:
        backend = InProcessBackend(self.evaluator, party)
        assert isinstance(backend, FrameBackend)
        return backend

    def frame(self, name: str, party: str) -> SecureDataFrame:
        return self.backend(party).dataframe(name)


def patients(n: int = 400, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "id": np.arange(n, dtype=np.int64),
            "ssn": [f"{100000000 + i}" for i in range(n)],
            "age": rng.integers(18, 90, n),
            "weight": rng.normal(75, 12, n).round(1),
            "height": rng.normal(1.72, 0.1, n).round(2),
            "region": rng.choice(["north", "south", "east", "west"], n),
            "smoker": rng.random(n) < 0.3,
            "income": rng.lognormal(10, 0.5, n).round(0),
        }
    )


POLICY = DataPolicy(min_group_size=10, hidden_columns=("ssn",), allow_rows=False)
