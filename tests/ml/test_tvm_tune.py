"""Where a MetaSchedule budget goes: the tasks that carry the model's FLOPs (ml/tvm_tune.py)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from mesatee_notebook.ml import tvm_runtime, tvm_tune
from tests.ml.conftest import cnn_model, mlp_model, ort_run


def _tasks(model: onnx.ModelProto, name: str, shape: tuple[int, ...]) -> list[Any]:
    """The tasks MetaSchedule extracts from ``model``, after the compile path's own passes."""
    import tvm
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    target = tvm.target.Target(tvm_runtime.resolve_target("host"))
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "model.onnx").write_bytes(model.SerializeToString())
        request = {"inputs": [{"name": name, "shape": list(shape), "dtype": "float32"}]}
        mod = tvm_runtime._import_model(request, Path(d), lambda _e: None)
    passes = [
        relax.transform.DecomposeOpsForInference(),
        relax.transform.CanonicalizeBindings(),
        relax.pipeline.zero_pipeline(),
        relax.transform.AttachAttrLayoutFreeBuffers(),
    ]
    with target:
        mod = tvm.transform.Sequential(passes)(mod)
    return list(ms.relax_integration.extract_tasks(mod, target))


def test_cnn_budget_goes_to_the_convolutions() -> None:
    """Session 4's 24 trials went to softmax, reshape and mean; the two convs (95% of the time) got none."""
    choices = tvm_tune.choose_tasks(_tasks(cnn_model(), "image", (1, 3, 16, 16)))
    tuned = sorted(c.name for c in choices if c.tuned)
    assert tuned == ["fused_conv2d1_add1_relu11", "fused_conv2d_add_relu1"]
    skipped = {c.name for c in choices if not c.tuned}
    assert {"softmax1", "reshape21", "mean1", "max_pool2d1", "fused_matmul_add21"} == skipped
    assert all(c.flops > 100_000 for c in choices if c.tuned)


def test_mlp_budget_skips_the_small_output_layer() -> None:
    choices = {c.name: c for c in tvm_tune.choose_tasks(_tasks(mlp_model(), "x", (1024, 64)))}
    assert {n for n, c in choices.items() if c.tuned} == {"fused_matmul1_add_relu1", "fused_matmul_add_relu1"}
    small = choices["fused_matmul2_add11"]
    total = sum(c.flops * c.weight for c in choices.values())
    assert not small.tuned and 0 < small.flops < tvm_tune.MIN_FLOP_SHARE * total


class _Task:
    def __init__(self, name: str, weight: int = 1) -> None:
        self.task_name, self.weight = name, weight


@pytest.mark.parametrize(
    ("flops", "weights", "tuned"),
    [
        ([1.0, 100.0], [1, 1], [False, True]),  # under 5%: left to the default lowering
        ([1.0, 100.0], [10, 1], [True, True]),  # called ten times: 9% of the work
        ([0.0, 0.0], [1, 1], [False, False]),  # nothing computes (tune_chosen then tunes all)
        ([1.0] * 30, [1] * 30, [True] * 30),  # each 3%, but each is (one of) the largest
    ],
)
def test_share_and_weight_decide(
    monkeypatch: pytest.MonkeyPatch, flops: list[float], weights: list[int], tuned: list[bool]
) -> None:
    tasks = [_Task(f"t{i}", w) for i, w in enumerate(weights)]
    monkeypatch.setattr(tvm_tune, "_flops", lambda t: flops[tasks.index(t)])
    assert [c.tuned for c in tvm_tune.choose_tasks(tasks)] == tuned


def test_tuned_cache_key_names_the_task_policy() -> None:
    blob = mlp_model().SerializeToString()
    base = tvm_runtime._base_digest(blob, {"x": (1024, 64)}, "host")
    key = tvm_runtime.model_digest(blob, {"x": (1024, 64)}, tune_trials=8)
    assert key == tvm_runtime._digest(base, tvm_runtime._PIPELINE, "trials=8", "per_task=None", tvm_tune.TASK_POLICY)


_BENCH_CASES = {
    "mlp1": (mlp_model, "x", (1, 64)),
    "mlp1024": (mlp_model, "x", (1024, 64)),
    "cnn1": (cnn_model, "image", (1, 3, 16, 16)),
    "cnn1024": (cnn_model, "image", (1024, 3, 16, 16)),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(_BENCH_CASES))
def test_bench_models_use_their_shipped_database(tmp_path: Path, case: str) -> None:
    """A first compile of a benchmark model on the benchmark CPU uses the database shipped in the package.

    The databases are keyed by (model, shapes, exact target, TVM version): on another CPU or TVM there is
    none to use, and the compile is TVM's default lowering (skipped here, saying so).
    """
    factory, name, shape = _BENCH_CASES[case]
    model = factory()
    base = tvm_runtime._base_digest(model.SerializeToString(), {name: shape}, "host")
    if tvm_runtime._shipped_dir(base) is None:
        pytest.skip(f"no tuned database shipped for this CPU and TVM ({tvm_runtime.host_target()})")
    # A tuning cache seeded from an older package (here: an empty database) must not shadow the shipped one.
    stale = tmp_path / f"tvm-tune-{base}"
    stale.mkdir()
    for file in ("database_workload.json", "database_tuning_record.json"):
        (stale / file).write_text("")
    (stale / "done.json").write_text('{"trials": 8, "per_task": null}')
    events: list[dict[str, Any]] = []
    module = tvm_runtime.compile_onnx(model, {name: shape}, tmp_path, progress=events.append)
    phases = [e["phase"] for e in events if e["event"] == "phase"]
    assert phases == ["import", "tune-shipped", "build", "export", "done"]
    assert module.meta["shipped_database"] is True and module.tuned_trials == 0
    # The shipped schedules packed the weights: a kernel of the module runs on pre-packed constants.
    assert any(symbol.endswith("_prepacked") for symbol in _kernel_symbols(module))
    x = np.random.default_rng(3).normal(size=shape).astype(np.float32)
    got = module.run(x)
    for spec, want in zip(module.outputs, ort_run(model, {name: x}), strict=True):
        assert float(np.max(np.abs(got[spec.name] - want))) <= 1e-6


def _kernel_symbols(module: tvm_runtime.TVMModel) -> list[str]:
    """The kernels one call of the module's VM ``main`` launches (the VM's instrument hook)."""
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(tvm.runtime.load_module(str(module.path)), tvm.cpu())
    seen: list[str] = []

    def instrument(_func: Any, symbol: str, before: bool, _ret: Any, *_args: Any) -> int:
        if before and not symbol.startswith("vm.builtin"):
            seen.append(symbol)
        return 0

    vm.set_instrument(instrument)
    vm["main"](*module._args)
    return seen
