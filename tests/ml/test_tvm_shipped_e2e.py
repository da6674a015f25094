"""Through a real kernel: a first compile of a bench model uses the tuned database shipped in the package."""

from __future__ import annotations

from collections.abc import Iterator
from typing import cast

import numpy as np
import pytest

import mesatee_notebook as mn
from mesatee_notebook.ml import tvm_runtime
from tests.conftest import KernelProc
from tests.ml.conftest import cnn_model, ort_run


@pytest.fixture(scope="module")
def session(kernel: KernelProc, tmp_path_factory: pytest.TempPathFactory) -> Iterator[mn.Session]:
    s = mn.connect(kernel.url, policy=cast("mn.Policy", kernel.policy()), identity=tmp_path_factory.mktemp("id") / "a")
    yield s
    s.close()


@pytest.mark.slow
def test_service_compile_uses_the_shipped_database(session: mn.Session) -> None:
    """The sandboxed compile child reads the shipped database from the package; the info says so."""
    model, shape = cnn_model(), (1, 3, 16, 16)
    base = tvm_runtime._base_digest(model.SerializeToString(), {"image": shape}, "host")
    if tvm_runtime._shipped_dir(base) is None:
        pytest.skip(f"no tuned database shipped for this CPU and TVM ({tvm_runtime.host_target()})")
    mod = session.tvm.compile(model, input_shapes={"image": shape})
    assert mod.info["shipped_database"] is True and mod.info["tune_trials"] == 0
    assert mod.info["threads"] == 1  # a batch-1 module runs on one thread (docs/ml.md)
    assert mod.id == tvm_runtime.model_digest(model.SerializeToString(), {"image": shape})
    image = np.random.default_rng(4).normal(size=shape).astype(np.float32)
    got = mod.run({"image": image})
    for name, want in zip(("probs", "z"), ort_run(model, {"image": image}), strict=True):
        assert float(np.max(np.abs(got[name] - want))) <= 1e-6


def test_module_info_names_a_shipped_database_field() -> None:
    from mesatee_notebook.enclave.services import tvm as service

    class _Module:
        digest, inputs, outputs, tuned_trials, library_sha256 = "d", (), (), 0, "s"
        meta = {"shipped_database": True, "threads": "all"}

    meta = service._module_meta(cast("tvm_runtime.TVMModel", _Module()), ["p"])
    assert meta["shipped_database"] is True and meta["threads"] == "all"
    _Module.meta = {}
    assert service._module_meta(cast("tvm_runtime.TVMModel", _Module()), ["p"])["shipped_database"] is False
