"""TVM (relax) inference: parity with onnxruntime, the digest cache, timeouts, typed errors."""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from mesatee_notebook.ml import tvm_runtime
from mesatee_notebook.ml._errors import (
    CompileError,
    CompileTimeout,
    InputShapeError,
    MLInputError,
    ModelFormatError,
    UnsupportedOperator,
)
from tests.ml.conftest import cnn_model, mlp_model, ort_run, single_op_model


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tvm-cache")


@pytest.fixture(scope="module")
def mlp_1024(cache: Path) -> tvm_runtime.TVMModel:
    return tvm_runtime.compile_onnx(mlp_model(), {"x": (1024, 64)}, cache)


@pytest.mark.parametrize("batch", [1, 1024])
def test_mlp_matches_onnxruntime(cache: Path, batch: int) -> None:
    model = mlp_model()
    compiled = tvm_runtime.compile_onnx(model, {"x": (batch, 64)}, cache)
    x = np.random.default_rng(batch).normal(size=(batch, 64)).astype(np.float32)
    (want,) = ort_run(model, {"x": x})
    got = compiled.run({"x": x})
    assert list(got) == ["logits"]
    assert compiled.outputs == (tvm_runtime.TensorSpec("logits", (batch, 10), "float32"),)
    np.testing.assert_allclose(got["logits"], want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("batch", [1, 8])
def test_cnn_matches_onnxruntime(cache: Path, batch: int) -> None:
    model = cnn_model()
    compiled = tvm_runtime.compile_onnx(model.SerializeToString(), {"image": (batch, 3, 16, 16)}, cache)
    image = np.random.default_rng(batch).normal(size=(batch, 3, 16, 16)).astype(np.float32)
    want_probs, want_logits = ort_run(model, {"image": image})
    got = compiled.run(image)
    assert [(s.name, s.shape) for s in compiled.outputs] == [("probs", (batch, 10)), ("z", (batch, 10))]
    np.testing.assert_allclose(got["probs"], want_probs, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got["z"], want_logits, rtol=1e-4, atol=1e-4)


def _compiling_fails(*args: object) -> None:
    raise AssertionError("a cached model was compiled again")


def test_second_compile_is_a_cache_hit(
    cache: Path, mlp_1024: tvm_runtime.TVMModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[dict[str, Any]] = []
    # no compiler runs (this replaced "took under 1 s", which a loaded machine could fail)
    monkeypatch.setattr(tvm_runtime, "_run_child", _compiling_fails)
    again = tvm_runtime.compile_onnx(mlp_model(), {"x": (1024, 64)}, cache, progress=events.append)
    assert again.from_cache
    assert again.digest == mlp_1024.digest
    assert events == [{"event": "phase", "phase": "cache-hit", "elapsed_s": events[0]["elapsed_s"]}]
    x = np.ones((1024, 64), dtype=np.float32)
    np.testing.assert_array_equal(again.run(x)["logits"], mlp_1024.run(x)["logits"])


def test_digest_covers_model_shapes_and_budget() -> None:
    blob = mlp_model().SerializeToString()
    base = tvm_runtime.model_digest(blob, {"x": (1024, 64)})
    assert base == tvm_runtime.model_digest(blob, {"x": [1024, 64]}, "llvm")
    assert base != tvm_runtime.model_digest(blob, {"x": (512, 64)})
    assert base != tvm_runtime.model_digest(mlp_model(seed=1).SerializeToString(), {"x": (1024, 64)})
    assert base != tvm_runtime.model_digest(blob, {"x": (1024, 64)}, {"kind": "llvm", "mcpu": "skylake"})
    assert base != tvm_runtime.model_digest(blob, {"x": (1024, 64)}, tune_trials=8)
    with pytest.raises(MLInputError, match="invalid TVM target"):
        tvm_runtime.model_digest(blob, {"x": (1024, 64)}, "no-such-target")


def test_bare_llvm_means_this_cpu_exactly() -> None:
    import psutil
    import tvm

    host = tvm_runtime.host_target()
    assert host["kind"] == "llvm" and host["mcpu"] == tvm.target.codegen.llvm_get_system_cpu()
    assert host["num-cores"] == (psutil.cpu_count(logical=False) or os.cpu_count())
    assert tvm_runtime.resolve_target("llvm") == host == tvm_runtime.resolve_target("host")
    generic = {"kind": "llvm", "mcpu": "x86-64"}
    assert tvm_runtime.resolve_target(generic) is generic


def test_inputs_are_refilled_on_every_run(mlp_1024: tvm_runtime.TVMModel) -> None:
    """The input tensors are reused between calls; each call must see its own data, and keep its outputs."""
    rng = np.random.default_rng(9)
    a, b = (rng.normal(size=(1024, 64)).astype(np.float32) for _ in range(2))
    out_a = mlp_1024.run(a)["logits"]
    out_b = mlp_1024.run(b)["logits"]
    (want_a,) = ort_run(mlp_model(), {"x": a})
    (want_b,) = ort_run(mlp_model(), {"x": b})
    np.testing.assert_allclose(out_a, want_a, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out_b, want_b, rtol=1e-4, atol=1e-4)


def test_fast_path_keeps_the_dtype_and_layout_checks(mlp_1024: tvm_runtime.TVMModel) -> None:
    """The one-array fast path compares dtypes, not names: a byte-swapped or strided array still gives the answer."""
    x = np.random.default_rng(3).normal(size=(1024, 64)).astype(np.float32)
    want = mlp_1024.run(x)["logits"]
    swapped = x.astype(">f4")  # dtype.name is "float32" too; the values must be swapped on the way in
    np.testing.assert_array_equal(mlp_1024.run(swapped)["logits"], want)
    strided = np.asfortranarray(x)
    np.testing.assert_array_equal(mlp_1024.run(strided)["logits"], want)
    with pytest.raises(InputShapeError, match=r"shape \(1024, 32\)"):
        mlp_1024.run(x[:, ::2])  # a strided view of the wrong shape is refused, not read past


def test_thread_count_follows_the_work(cache: Path, mlp_1024: tvm_runtime.TVMModel) -> None:
    """A batch-1 module runs on one thread, a batch-1024 one on every CPU; each call sets its own thread's pool."""
    import threading

    import tvm

    small = tvm_runtime.compile_onnx(mlp_model(), {"x": (1, 64)}, cache)
    assert small.meta["threads"] == 1 and mlp_1024.meta["threads"] == "all"
    assert small.meta["flops_estimate"] < tvm_runtime.PARALLEL_MIN_FLOPS <= mlp_1024.meta["flops_estimate"]
    cpus = len(os.sched_getaffinity(0))
    if tvm_runtime._env_threads() is not None:  # the operator's TVM_NUM_THREADS decides for every module
        assert small.threads == mlp_1024.threads == min(tvm_runtime._env_threads() or 0, cpus)
        return
    assert (small.threads, mlp_1024.threads) == (1, cpus)
    big_x = np.random.default_rng(5).normal(size=(1024, 64)).astype(np.float32)
    small_x = big_x[:1].copy()
    want_big, want_small = mlp_1024.run(big_x)["logits"], small.run(small_x)["logits"]
    seen: list[Any] = []

    def worker() -> None:  # a fresh calling thread: its own TVM pool, sized by each module it runs
        count = tvm.get_global_func("runtime.NumThreads")
        seen.extend([mlp_1024.run(big_x)["logits"], count(), small.run(small_x)["logits"], count()])
        seen.extend([mlp_1024.run(big_x)["logits"], count()])

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen[1::2] == [cpus, 1, cpus]
    np.testing.assert_array_equal(seen[0], want_big)
    np.testing.assert_array_equal(seen[2], want_small)
    np.testing.assert_array_equal(seen[4], want_big)


def _read_syscalls() -> int:
    lines = Path("/proc/self/io").read_text().splitlines()
    return int(next(line for line in lines if line.startswith("syscr:")).split()[1])


def test_kernel_launches_make_no_syscalls(cache: Path) -> None:
    """Unconfigured, TVM re-reads /sys/devices/system/cpu/online on every parallel kernel launch (~3-4 µs each).

    Every module configures its calling thread's pool, also one compiled before ``meta["threads"]`` existed.
    """
    import threading

    module = tvm_runtime.compile_onnx(cnn_model(), {"image": (1, 3, 16, 16)}, cache)
    old_meta = {k: v for k, v in module.meta.items() if k != "threads"}
    for candidate in (module, tvm_runtime.TVMModel(module.path, module.digest, old_meta, from_cache=True)):
        counts: list[int] = []

        def worker(m: tvm_runtime.TVMModel = candidate, counts: list[int] = counts) -> None:  # an unconfigured pool
            image = np.zeros((1, 3, 16, 16), np.float32)
            m.run(image)
            before = _read_syscalls()
            for _ in range(200):
                m.run(image)
            counts.append(_read_syscalls() - before)

        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()
        assert counts[0] < 50, f"{counts[0]} read syscalls in 200 runs"  # unconfigured: 3 per parallel launch


def test_outputs_never_alias_the_reused_input_tensor(tmp_path: Path) -> None:
    """An Identity graph may hand back the input tensor itself; the output is a copy the next run cannot change."""
    compiled = tvm_runtime.compile_onnx(single_op_model("Identity"), {"x": (4, 8)}, tmp_path)
    a, b = np.arange(32, dtype=np.float32).reshape(4, 8), np.ones((4, 8), np.float32)
    out_a = compiled.run(a)["y"]
    out_b = compiled.run(b)["y"]
    out_b[:] = -1  # writing into a result must not reach the module either
    np.testing.assert_array_equal(out_a, a)
    np.testing.assert_array_equal(compiled.run(b)["y"], b)


def test_untuned_compile_reports_phases(tmp_path: Path) -> None:
    events: list[dict[str, Any]] = []
    compiled = tvm_runtime.compile_onnx(single_op_model("Relu"), {"x": (4, 8)}, tmp_path, progress=events.append)
    assert [e["phase"] for e in events] == ["import", "build", "export", "done"]
    assert not compiled.from_cache
    assert compiled.tuned_trials == 0
    x = np.linspace(-1, 1, 32, dtype=np.float32).reshape(4, 8)
    np.testing.assert_array_equal(compiled.run(x)["y"], np.maximum(x, 0))
    entries = sorted(p.name for p in tmp_path.iterdir())
    assert entries == [f"tvm-{compiled.digest}"]
    assert sorted(p.name for p in (tmp_path / entries[0]).iterdir()) == ["compile.log", "meta.json", "model.so"]
    assert compiled.library_sha256 == hashlib.sha256(compiled.path.read_bytes()).hexdigest()


def test_corrupt_cached_module_is_rebuilt(tmp_path: Path) -> None:
    first = tvm_runtime.compile_onnx(single_op_model("Abs"), {"x": (4, 8)}, tmp_path)
    data = first.path.read_bytes()
    first.path.unlink()  # replace, never rewrite in place: a mapped library would crash this process
    first.path.write_bytes(data[:100])
    again = tvm_runtime.compile_onnx(single_op_model("Abs"), {"x": (4, 8)}, tmp_path)
    assert not again.from_cache
    x = -np.ones((4, 8), dtype=np.float32)
    np.testing.assert_array_equal(again.run(x)["y"], np.ones((4, 8), dtype=np.float32))


# ---- typed errors ---------------------------------------------------------------------------


def test_unsupported_operator_is_named(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedOperator, match="Celu") as info:
        tvm_runtime.compile_onnx(single_op_model("Celu"), {"x": (4, 8)}, tmp_path)
    assert info.value.details["ops"] == ["Celu"]
    assert isinstance(info.value, NotImplementedError)
    with pytest.raises(UnsupportedOperator, match=r"com\.example:Frobnicate"):
        tvm_runtime.compile_onnx(single_op_model("Frobnicate", domain="com.example"), {"x": (4, 8)}, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_malformed_onnx(tmp_path: Path) -> None:
    with pytest.raises(ModelFormatError, match="not a valid ONNX model"):
        tvm_runtime.compile_onnx(b"\x08\x07garbage-that-is-not-protobuf\xff", {"x": (1, 64)}, tmp_path)
    # Parses as protobuf, but a node reads a tensor nothing defines.
    node = helper.make_node("Add", ["x", "ghost"], ["y"])
    graph = helper.make_graph(
        [node],
        "broken",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    broken = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ModelFormatError, match="ghost"):
        tvm_runtime.compile_onnx(broken, {"x": (2,)}, tmp_path)
    with pytest.raises(ModelFormatError, match="no nodes"):
        tvm_runtime.compile_onnx(onnx.ModelProto(), {}, tmp_path)


@pytest.mark.parametrize(
    ("shapes", "match"),
    [
        ({"x": (1024, 32)}, r"declared with shape \('\?', 64\)"),
        ({"x": (1024,)}, "declared with shape"),
        ({"input": (1, 64)}, r"missing \['x'\], unknown \['input'\]"),
        ({"x": (0, 64)}, "positive integers"),
        ({"x": (1, 64), "y": (1, 1)}, r"unknown \['y'\]"),
    ],
)
def test_bad_input_shapes_at_compile(tmp_path: Path, shapes: dict[str, tuple[int, ...]], match: str) -> None:
    with pytest.raises(InputShapeError, match=match):
        tvm_runtime.compile_onnx(mlp_model(), shapes, tmp_path)


def test_input_mismatch_at_run(mlp_1024: tvm_runtime.TVMModel) -> None:
    with pytest.raises(InputShapeError, match=r"shape \(3, 64\); the model was compiled for \(1024, 64\)") as info:
        mlp_1024.run(np.zeros((3, 64), dtype=np.float32))
    assert info.value.details["expected"] == [1024, 64]
    with pytest.raises(InputShapeError, match=r"missing \['x'\], unexpected \['image'\]"):
        mlp_1024.run({"image": np.zeros((1024, 64), dtype=np.float32)})
    with pytest.raises(InputShapeError, match="dtype complex64"):
        mlp_1024.run(np.zeros((1024, 64), dtype=np.complex64))
    # A float64 array is cast to the model's float32.
    out64 = mlp_1024.run(np.full((1024, 64), 0.5))["logits"]
    out32 = mlp_1024.run(np.full((1024, 64), 0.5, dtype=np.float32))["logits"]
    np.testing.assert_array_equal(out64, out32)


def test_compile_timeout_kills_the_compiler(tmp_path: Path) -> None:
    before = set(_children())
    t0 = time.perf_counter()
    with pytest.raises(CompileTimeout, match=r"timeout of 1\.5 s") as info:
        tvm_runtime.compile_onnx(mlp_model(), {"x": (8, 64)}, tmp_path, tune_trials=64, timeout_s=1.5)
    assert time.perf_counter() - t0 < 30  # did not hang: 64 trials take minutes (generous for a loaded machine)
    assert isinstance(info.value, TimeoutError)
    assert set(_children()) <= before
    assert [p.name for p in tmp_path.iterdir()] == []


def test_progress_callback_can_cancel(tmp_path: Path) -> None:
    class Stop(Exception):
        pass

    def cancel(event: dict[str, Any]) -> None:
        raise Stop(event["phase"])

    with pytest.raises(Stop, match="import"):
        tvm_runtime.compile_onnx(single_op_model("Sigmoid"), {"x": (4, 8)}, tmp_path, progress=cancel)
    assert list(tmp_path.iterdir()) == []


def test_negative_budget_is_refused(tmp_path: Path) -> None:
    with pytest.raises(MLInputError, match="tune_trials"):
        tvm_runtime.compile_onnx(mlp_model(), {"x": (1, 64)}, tmp_path, tune_trials=-1)


def test_compiler_failure_is_a_compile_error(tmp_path: Path) -> None:
    # A valid model whose import TVM rejects: Reshape to a shape that does not fit.
    shape = numpy_helper.from_array(np.array([3, 5], dtype=np.int64), "shape")
    node = helper.make_node("Reshape", ["x", "shape"], ["y"])
    graph = helper.make_graph(
        [node],
        "bad-reshape",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 5])],
        [shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(CompileError, match="Reshape") as info:
        tvm_runtime.compile_onnx(model, {"x": (4, 8)}, tmp_path)
    assert not isinstance(info.value, CompileTimeout)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_tuned_compile_matches_and_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(5)
    weight = numpy_helper.from_array((rng.normal(size=(32, 16)) * 0.2).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    events: list[dict[str, Any]] = []
    tuned = tvm_runtime.compile_onnx(model, {"x": (64, 32)}, tmp_path, tune_trials=4, progress=events.append)
    trials = [e for e in events if e["event"] == "trial"]
    assert trials and trials[-1]["trials"] == 4 and trials[-1]["budget"] == 4
    assert trials[-1]["best_us"] is not None
    (chosen,) = [e for e in events if e.get("phase") == "tasks"]
    assert [(t["task"][:6], t["tuned"]) for t in chosen["tasks"]] == [("matmul", True)]
    assert [e["phase"] for e in events if e["event"] == "phase"] == [
        "import",
        "tune",
        "tasks",
        "tuned",
        "build",
        "export",
        "done",
    ]
    assert tuned.tuned_trials == 4
    x = rng.normal(size=(64, 32)).astype(np.float32)
    (want,) = ort_run(model, {"x": x})
    np.testing.assert_allclose(tuned.run(x)["y"], want, rtol=1e-4, atol=1e-4)

    (tune_dir,) = tmp_path.glob("tvm-tune-*")
    assert sorted(p.name for p in tune_dir.iterdir()) == [
        "database_tuning_record.json",
        "database_workload.json",
        "done.json",
    ]
    with monkeypatch.context() as patched:  # neither tuned nor compiled again
        patched.setattr(tvm_runtime, "_run_child", _compiling_fails)
        again = tvm_runtime.compile_onnx(model, {"x": (64, 32)}, tmp_path, tune_trials=4)
    assert again.from_cache

    # With the compiled module gone, the cached tuning database is reused: no new trials.
    for entry in tmp_path.glob("tvm-[0-9a-f]*"):
        for f in entry.iterdir():
            f.unlink()
        entry.rmdir()
    events.clear()
    rebuilt = tvm_runtime.compile_onnx(model, {"x": (64, 32)}, tmp_path, tune_trials=4, progress=events.append)
    assert "tune-cached" in [e.get("phase") for e in events]
    assert not [e for e in events if e["event"] == "trial"]
    np.testing.assert_allclose(rebuilt.run(x)["y"], want, rtol=1e-4, atol=1e-4)

    # Shipped in the package (here: a stand-in package directory), the database serves an untuned
    # request in a fresh cache: no tuning, the tuned schedules, a cache key of its own.
    shipped = tmp_path / "shipped"
    shutil.copytree(tune_dir, shipped / tune_dir.name.removeprefix("tvm-tune-"))
    monkeypatch.setattr(tvm_runtime, "_SHIPPED", shipped)
    fresh = tmp_path / "fresh"
    events.clear()
    served = tvm_runtime.compile_onnx(model, {"x": (64, 32)}, fresh, progress=events.append)
    assert "tune-shipped" in [e.get("phase") for e in events]
    assert not [e for e in events if e["event"] == "trial"]
    assert served.meta["shipped_database"] is True and served.tuned_trials == 0
    base = tune_dir.name.removeprefix("tvm-tune-")
    assert served.digest != tvm_runtime._digest(base, tvm_runtime._PIPELINE, "untuned")
    np.testing.assert_allclose(served.run(x)["y"], want, rtol=1e-4, atol=1e-4)


def _children() -> list[int]:
    import psutil

    return [p.pid for p in psutil.Process(os.getpid()).children(recursive=True)]
