"""ONNX inference compiled with Apache TVM 0.27 (relax), as run inside the enclave.

Pipeline: ``tvm.relax.frontend.onnx.from_onnx`` with the caller's static input
shapes, then either ``tvm.compile(mod, target)`` (untuned) or MetaSchedule
tuning (``ml/tvm_tune.py``: the fused module's tasks that carry the FLOPs, tuned with
``meta_schedule.tune_tasks``, then ``MetaScheduleApplyDatabase``) before ``tvm.compile``; the result is
exported as a ``.so`` and run by ``relax.VirtualMachine``.

Caching. Everything lands under ``cache_dir``:

- ``tvm-<key>/model.so`` + ``meta.json``: the compiled module, keyed by the
  digest of (model bytes, input shapes, target, TVM and tvm-ffi versions, tuning
  budget). A second compile of the same request only loads the ``.so``.
- ``tvm-tune-<base>/``: the MetaSchedule JSON database, keyed by the same digest
  without the budget, so a larger budget later builds on earlier trials.

The cache directory must be enclave-private: its ``.so`` files are loaded and
run, and contain the model's weights. ``meta.json`` records each library's
SHA-256, which catches corruption, not a deliberate swap.

Timeout. Compilation and tuning run in a child process
(``python -c ...tvm_runtime._child_main``) in its own process group; past
``timeout_s`` the whole group (MetaSchedule's builder and runner workers
included) is killed and :class:`CompileTimeout` raised. Progress events stream
back over a pipe to the ``progress`` callback; an exception raised by the
callback stops the compile too.

Tuning cost on the 2-core dev machine: a few seconds fixed (on x86 only TVM's x86
tensor intrinsics are registered, ``ml/tvm_tune.py``; the whole ``tvm.s_tir.tensor_intrin``
import took 56 s to 3 minutes) plus a few seconds per batch of trials per task. The
builder uses :func:`_ms_build`, which skips that import in every builder worker (TVM
restarts its builder pool on each batch, paying it again each time); float models on
``llvm`` use no tensor intrinsics.

Threads. A module's ``meta.json`` records ``"threads"`` (``1``, or ``"all"`` for kernels estimated at
:data:`PARALLEL_MIN_FLOPS` or more a call); :meth:`TVMModel.run` sizes the calling thread's TVM pool to it
(TVM keeps one pool per calling thread) whenever it differs, ``TVM_NUM_THREADS`` overriding. Configuring the
pool also stops TVM from re-reading ``/sys/devices/system/cpu/online`` on every parallel kernel launch.

Why this module is over ~500 lines: the TVM pipeline: ONNX import, target, tuning database, compile in a child
process, and the VM run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np

from mesatee_notebook.ml._errors import (
    CompileError,
    CompileTimeout,
    InputShapeError,
    MLInputError,
    ModelFormatError,
    UnsupportedOperator,
)
from mesatee_notebook.ml.tvm_tune import TASK_POLICY

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "HOST_TARGET",
    "Progress",
    "TVMModel",
    "TargetSpec",
    "TensorSpec",
    "compile_onnx",
    "host_target",
    "model_digest",
    "resolve_target",
    "unsupported_ops",
]

TargetSpec: TypeAlias = str | Mapping[str, Any]
"""A TVM target: a kind name (``"llvm"``) or its JSON dict form (``{"kind": "llvm", "mcpu": ...}``)."""
Progress: TypeAlias = Callable[[dict[str, Any]], None]
"""Receives ``{"event": "phase", "phase": ...}`` and ``{"event": "trial", "task", "trials", "budget", ...}``."""

DEFAULT_TIMEOUT_S = 900.0
_COMPILED_PREFIX = "tvm-"
_TUNE_PREFIX = "tvm-tune-"
_LOG_TAIL_LINES = 20
_DB_FILES = ("database_workload.json", "database_tuning_record.json")


@dataclass(frozen=True)
class TensorSpec:
    """Name, static shape and numpy dtype name of one model input or output."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def to_json(self) -> dict[str, Any]:
        """Plain form for ``meta.json``."""
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> TensorSpec:
        """Inverse of :meth:`to_json`."""
        return cls(str(doc["name"]), tuple(int(d) for d in doc["shape"]), str(doc["dtype"]))


class TVMModel:
    """A compiled ONNX model loaded into a relax VirtualMachine."""

    __slots__ = (
        "_args",
        "_dtypes",
        "_getitem",
        "_lock",
        "_main",
        "_threads",
        "_views",
        "_vm",
        "digest",
        "from_cache",
        "inputs",
        "meta",
        "outputs",
        "path",
    )

    def __init__(self, path: Path, digest: str, meta: Mapping[str, Any], *, from_cache: bool) -> None:
        import tvm
        from tvm import relax

        self.path = path
        self.digest = digest
        self.meta = dict(meta)
        self.from_cache = from_cache
        self.inputs = tuple(TensorSpec.from_json(d) for d in meta["inputs"])
        self.outputs = tuple(TensorSpec.from_json(d) for d in meta["outputs"])
        self._dtypes = tuple(np.dtype(s.dtype) for s in self.inputs)
        self._threads = _module_threads(self.meta)
        try:
            lib = tvm.runtime.load_module(str(path))
            self._vm = relax.VirtualMachine(lib, tvm.cpu())
            self._main = self._vm["main"]
            self._args = [tvm.runtime.empty(s.shape, s.dtype, tvm.cpu()) for s in self.inputs]
            self._views = [np.from_dlpack(a) for a in self._args]  # numpy views of the input tensors
            self._getitem = _array_getitem()
        except Exception as exc:  # TVM raises its own error classes from C++
            msg = f"cannot load the compiled module {path.name}: {exc}"
            raise CompileError(msg) from exc
        self._lock = threading.Lock()

    @property
    def library_sha256(self) -> str:
        """SHA-256 of the compiled ``.so`` that runs (checked before loading), for receipts."""
        return str(self.meta["so_sha256"])

    @property
    def threads(self) -> int:
        """Threads this module's kernels run on (``TVM_NUM_THREADS`` if set, else ``meta["threads"]``)."""
        return self._threads

    @property
    def tuned_trials(self) -> int:
        """MetaSchedule trial budget the module was compiled with (0: untuned)."""
        return int(self.meta.get("tune_trials", 0))

    def _arguments(self, inputs: Mapping[str, Any] | np.ndarray) -> list[np.ndarray]:
        # The one-array fast path: nothing to convert. ``dtype ==`` against the dtype made once, where
        # ``dtype.name`` alone cost ~4 µs a call (docs/benchmarks.md, P5); np.copyto in run() reads any strides.
        if (
            type(inputs) is np.ndarray
            and len(self.inputs) == 1
            and inputs.shape == self.inputs[0].shape
            and inputs.dtype == self._dtypes[0]
        ):
            return [inputs]
        if isinstance(inputs, np.ndarray):
            if len(self.inputs) != 1:
                names = ", ".join(s.name for s in self.inputs)
                msg = f"the model has {len(self.inputs)} inputs ({names}); pass a mapping of name to array"
                raise InputShapeError(msg, inputs=[s.name for s in self.inputs])
            inputs = {self.inputs[0].name: inputs}
        want = {s.name for s in self.inputs}
        missing, extra = sorted(want - set(inputs)), sorted(set(inputs) - want)
        if missing or extra:
            msg = f"model inputs are {sorted(want)}; missing {missing}, unexpected {extra}"
            raise InputShapeError(msg, missing=missing, extra=extra)
        args = []
        for spec in self.inputs:
            value = np.asarray(inputs[spec.name])
            if value.dtype != np.dtype(spec.dtype):
                if not np.can_cast(value.dtype, spec.dtype, casting="same_kind"):
                    msg = f"input {spec.name!r} has dtype {value.dtype}; the model takes {spec.dtype}"
                    raise InputShapeError(msg, input=spec.name, dtype=str(value.dtype), expected=spec.dtype)
                value = value.astype(spec.dtype)
            if tuple(value.shape) != spec.shape:
                msg = (
                    f"input {spec.name!r} has shape {tuple(value.shape)}; the model was compiled for {spec.shape} "
                    "(compile again with other input_shapes for another shape)"
                )
                raise InputShapeError(msg, input=spec.name, shape=list(value.shape), expected=list(spec.shape))
            args.append(np.ascontiguousarray(value))
        return args

    def run(self, inputs: Mapping[str, Any] | np.ndarray) -> dict[str, np.ndarray]:
        """Run the model; ``inputs`` maps input names to arrays (or is the array of a one-input model).

        The input tensors are allocated once (64-byte aligned, as TVM's kernels want) and refilled per
        call under a lock: allocating them cost more than the whole batch-1 MLP. They are refilled
        through numpy views of them (``np.copyto``: ~0.7 µs, where ``Tensor.copyfrom`` took ~8 µs),
        and outputs leave through DLPack and a numpy copy (~1 µs, where ``Tensor.numpy()`` took ~9 µs;
        the copy keeps a caller from aliasing a constant or an input buffer the VM returned). A tuple
        result is indexed through tvm-ffi's ``ArrayGetItem`` (~0.5 µs, where ``Array.__getitem__``'s
        length and index checks took ~2 µs per output); the VM returns exactly the outputs it declared.
        """
        arrays = self._arguments(inputs)
        with self._lock:
            for view, value in zip(self._views, arrays, strict=True):
                np.copyto(view, value)
            if getattr(_POOL, "threads", None) != self._threads:
                _set_pool_threads(self._threads)
            result = self._main(*self._args)
            if hasattr(result, "numpy"):
                values = [result]
            else:
                get = self._getitem
                values = [get(result, i) for i in range(len(self.outputs))]
            return {spec.name: np.from_dlpack(v).copy() for spec, v in zip(self.outputs, values, strict=True)}

    def __repr__(self) -> str:
        shapes = ", ".join(f"{s.name}{list(s.shape)}" for s in self.inputs)
        return f"TVMModel({shapes}, tuned_trials={self.tuned_trials}, digest={self.digest[:12]})"


PARALLEL_MIN_FLOPS = 10e6
"""A module whose kernels estimate at least this many FLOPs a call runs them on every CPU it may use; a smaller
one on one thread. A batch-1 call (0.2-0.3 MFLOP here, 10-25 µs) is too short to share: the second thread's
wake-up costs more than it saves; the batch-1024 models (170-270 MFLOP) gain from both cores when they are free
(docs/benchmarks.md, P5, session 7)."""

_POOL = threading.local()
"""The thread count this calling thread's TVM pool is set to (TVM keeps one pool per calling thread)."""


def _cpus() -> list[int]:
    """The CPUs this process may run on (its affinity), where the platform tells."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def _env_threads() -> int | None:
    """``TVM_NUM_THREADS`` (else ``OMP_NUM_THREADS``) when the operator set it to a positive number."""
    for name in ("TVM_NUM_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return None


def _module_threads(meta: Mapping[str, Any]) -> int:
    """The thread count a module runs with: the operator's ``TVM_NUM_THREADS``, else ``meta["threads"]``.

    ``meta["threads"]`` is ``1`` or ``"all"`` (every CPU this process may use), chosen at compile time from
    the estimated FLOPs. A module compiled before that was recorded gets TVM's own default: half the
    logical CPUs on x86 (TVM assumes two hyper-threads per core), all of them elsewhere.
    """
    cpus = len(_cpus())
    env = _env_threads()
    if env is not None:
        return min(env, cpus)
    choice = meta.get("threads")
    if choice == "all":
        return cpus
    if isinstance(choice, int) and choice > 0:
        return min(choice, cpus)
    import platform

    return max(1, cpus // 2) if platform.machine() in ("x86_64", "AMD64") else cpus


def _set_pool_threads(threads: int) -> None:
    """Size this calling thread's TVM pool: ``threads`` workers used, over the CPUs this process may use.

    ``runtime.config_threadpool`` with the CPU list sets TVM's per-thread concurrency to that many CPUs (the
    pool is created with that many workers on its first use in a thread) and lets its workers (and this
    thread) run on any of them, the affinity the process already has. It also spares every parallel kernel
    launch a syscall round: unconfigured, TVM asks ``std::thread::hardware_concurrency()`` on each launch,
    which reads ``/sys/devices/system/cpu/online`` (open, read, close; ~3-4 µs a launch, three to six
    launches a call here: the CNN's batch-1 VM ``main`` went from 26 to 14 µs).
    """
    import tvm

    cpus = [str(c) for c in _cpus()]
    tvm.get_global_func("runtime.config_threadpool")(-3, min(threads, len(cpus)), cpus)  # -3: share all the CPUs
    _POOL.threads = threads


def _array_getitem() -> Callable[[Any, int], Any]:
    """tvm-ffi's ``ArrayGetItem`` (what ``Array.__getitem__`` calls after its Python-side checks), or ``[]``."""
    try:
        from tvm_ffi import _ffi_api

        return _ffi_api.ArrayGetItem
    except (ImportError, AttributeError):
        return lambda array, i: array[i]


HOST_TARGET = "host"
"""Alias of :func:`host_target`; a bare ``"llvm"`` means the same (the module runs where it is compiled)."""


def host_target() -> dict[str, Any]:
    """The target of this machine's CPU exactly: ``llvm -mcpu=<host cpu> -num-cores=<physical cores>``.

    A bare ``llvm`` target compiles for generic x86-64 (SSE2), several times slower than AVX2/AVX-512
    code on the same CPU; MetaSchedule also needs ``num-cores``.
    """
    import psutil
    import tvm

    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    return {"kind": "llvm", "mcpu": str(tvm.target.codegen.llvm_get_system_cpu()), "num-cores": int(cores)}


def resolve_target(target: TargetSpec) -> TargetSpec:
    """``"host"`` and a bare ``"llvm"`` become :func:`host_target`; anything else is kept as given."""
    if isinstance(target, str) and target.strip() in (HOST_TARGET, "llvm"):
        return host_target()
    return target


def _target_json(target: TargetSpec) -> str:
    import tvm

    target = resolve_target(target)
    spec: Any = dict(target) if isinstance(target, Mapping) else target
    try:
        exported = tvm.target.Target(spec).export()
    except Exception as exc:  # tvm raises ValueError or its own errors for bad targets
        msg = f"invalid TVM target {target!r}: {exc}"
        raise MLInputError(msg, target=str(target)) from exc
    return json.dumps(exported, sort_keys=True, default=str)


def _versions() -> str:
    import tvm
    import tvm_ffi

    return f"tvm {tvm.__version__}; tvm-ffi {getattr(tvm_ffi, '__version__', '?')}"


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _shapes_json(input_shapes: Mapping[str, Sequence[int]]) -> str:
    return json.dumps({k: [int(d) for d in v] for k, v in sorted(input_shapes.items())})


def _base_digest(model: bytes, input_shapes: Mapping[str, Sequence[int]], target: TargetSpec) -> str:
    """Digest of (model, shapes, target, versions): the key of the tuning database."""
    return _digest(hashlib.sha256(model).hexdigest(), _shapes_json(input_shapes), _target_json(target), _versions())


_SHIPPED = Path(__file__).with_name("tuned")
"""Tuned MetaSchedule databases shipped in the package, one directory per base digest (docs/benchmarks.md, P5)."""


def _shipped_dir(base: str) -> Path | None:
    """The shipped tuning database for this (model, shapes, target, versions), if the package has one."""
    where = _SHIPPED / base
    return where if all((where / n).is_file() for n in (*_DB_FILES, "done.json")) else None


def _shipped_tag(base: str) -> str:
    where = _shipped_dir(base)
    if where is None:
        return ""
    return _digest(*(_sha256_file(where / n) for n in (*_DB_FILES, "done.json")))


_PIPELINE = "host-target, layout-free weights, no DLight"
"""Names the lowering in :func:`_schedule`; part of a compiled module's key, so a change rebuilds it."""


def _budget_key(base: str, tune_trials: int, max_trials_per_task: int | None) -> str:
    if tune_trials <= 0:
        shipped = _shipped_tag(base)  # an untuned request still uses a shipped database
        return _digest(base, _PIPELINE, "untuned", *([f"shipped={shipped}"] if shipped else []))
    return _digest(base, _PIPELINE, f"trials={tune_trials}", f"per_task={max_trials_per_task}", TASK_POLICY)


def _seed_tuning(base: str, tune_dir: Path) -> bool:
    """Copy the shipped database (if any) into an empty tuning cache; True when one exists for ``base``."""
    shipped = _shipped_dir(base)
    if shipped is None:
        return False
    if not (tune_dir / "done.json").is_file():
        staging = Path(tempfile.mkdtemp(prefix=".seed-", dir=tune_dir.parent))
        for name in (*_DB_FILES, "done.json"):
            shutil.copyfile(shipped / name, staging / name)
        try:
            staging.rename(tune_dir)
        except OSError:  # a concurrent compile seeded it (or tuned) first
            shutil.rmtree(staging, ignore_errors=True)
    return True


def model_digest(
    model: bytes,
    input_shapes: Mapping[str, Sequence[int]],
    target: TargetSpec = HOST_TARGET,
    *,
    tune_trials: int = 0,
    max_trials_per_task: int | None = None,
) -> str:
    """Cache key of a compile request: model bytes, shapes, target, TVM version and tuning budget."""
    return _budget_key(_base_digest(model, input_shapes, target), tune_trials, max_trials_per_task)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _iter_nodes(graph: Any) -> Iterator[Any]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _iter_nodes(attr.g)
            for sub in attr.graphs:
                yield from _iter_nodes(sub)


def unsupported_ops(model: Any) -> list[str]:
    """Operators of an ONNX ``ModelProto`` that TVM's relax frontend cannot import (``domain:Op`` if not ONNX)."""
    try:
        from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

        known = set(_get_convert_map()) | {"Constant", "If"}
    except ImportError:  # private helper moved: let the frontend itself report the op
        return []
    bad = set()
    for node in _iter_nodes(model.graph):
        if node.domain not in ("", "ai.onnx"):
            bad.add(f"{node.domain}:{node.op_type}")
        elif node.op_type not in known:
            bad.add(node.op_type)
    return sorted(bad)


def _parse_and_check(model_bytes: bytes, input_shapes: Mapping[str, Sequence[int]]) -> tuple[Any, list[TensorSpec]]:
    """Parse the ONNX bytes and match the caller's input shapes against the graph's inputs."""
    import onnx

    try:
        model = onnx.load_from_string(model_bytes)
    except Exception as exc:  # protobuf's DecodeError, among others
        msg = f"not a valid ONNX model: {exc}"
        raise ModelFormatError(msg) from exc
    if not model.graph.node:
        msg = "not a valid ONNX model: the graph has no nodes"
        raise ModelFormatError(msg)
    bad = unsupported_ops(model)
    if bad:
        msg = f"TVM's ONNX frontend does not support these operators: {', '.join(bad)}"
        raise UnsupportedOperator(msg, ops=bad)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        msg = f"not a valid ONNX model: {str(exc).strip().splitlines()[0]}"
        raise ModelFormatError(msg) from exc

    initializers = {t.name for t in model.graph.initializer}
    graph_inputs = [i for i in model.graph.input if i.name not in initializers]
    names = [i.name for i in graph_inputs]
    missing = [n for n in names if n not in input_shapes]
    extra = sorted(set(input_shapes) - set(names))
    if missing or extra:
        msg = f"input_shapes must name exactly the model's inputs {names}; missing {missing}, unknown {extra}"
        raise InputShapeError(msg, inputs=names, missing=missing, extra=extra)
    specs = []
    for graph_input in graph_inputs:
        shape = tuple(input_shapes[graph_input.name])
        if not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d > 0 for d in shape):
            msg = f"input_shapes[{graph_input.name!r}] must be positive integers, got {shape}"
            raise InputShapeError(msg, input=graph_input.name)
        tensor_type = graph_input.type.tensor_type
        declared = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
        if tensor_type.HasField("shape") and (
            len(declared) != len(shape) or any(w is not None and w != g for w, g in zip(declared, shape, strict=False))
        ):
            shown = tuple("?" if d is None else d for d in declared)
            msg = f"input {graph_input.name!r} is declared with shape {shown}; input_shapes gives {shape}"
            raise InputShapeError(msg, input=graph_input.name, declared=[str(d) for d in shown], given=list(shape))
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)).name
        specs.append(TensorSpec(graph_input.name, tuple(int(d) for d in shape), dtype))
    return model, specs


def compile_onnx(
    model: bytes | Any,
    input_shapes: Mapping[str, Sequence[int]],
    cache_dir: str | os.PathLike[str],
    *,
    target: TargetSpec = HOST_TARGET,
    tune_trials: int = 0,
    max_trials_per_task: int | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    progress: Progress | None = None,
) -> TVMModel:
    """Compile ONNX ``model`` (bytes or ``ModelProto``) for static ``input_shapes``, or load it from the cache.

    ``tune_trials`` > 0 runs MetaSchedule with that global trial budget (its
    database is cached too); ``timeout_s`` bounds the whole compile.
    """
    model_bytes = model if isinstance(model, bytes) else model.SerializeToString()
    target = resolve_target(target)
    if tune_trials < 0:
        msg = f"tune_trials must be >= 0, got {tune_trials}"
        raise MLInputError(msg)
    t0 = time.perf_counter()
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    base = _base_digest(model_bytes, input_shapes, target)
    key = _budget_key(base, tune_trials, max_trials_per_task)
    final = cache / f"{_COMPILED_PREFIX}{key}"
    cached = _load_cached(final, key)
    if cached is not None:
        if progress is not None:
            progress({"event": "phase", "phase": "cache-hit", "elapsed_s": time.perf_counter() - t0})
        return cached

    onnx_model, input_specs = _parse_and_check(model_bytes, input_shapes)
    tune_dir = cache / f"{_TUNE_PREFIX}{base}"
    jobdir = Path(tempfile.mkdtemp(prefix=".job-", dir=cache))
    try:
        (jobdir / "model.onnx").write_bytes(model_bytes)
        if tune_trials > 0:
            _seed_tuning(base, tune_dir)  # tuning builds on the shipped records
        request = {
            "target": dict(target) if isinstance(target, Mapping) else target,
            "inputs": [s.to_json() for s in input_specs],
            "outputs": [o.name for o in onnx_model.graph.output],
            "tune_trials": tune_trials,
            "max_trials_per_task": max_trials_per_task,
            "tune_dir": str(tune_dir),
            # An untuned request reads the shipped database itself, never the cache's copy of it: a copy
            # seeded from an older package would otherwise shadow a newer shipped database.
            "use_tuned": tune_trials <= 0 and _shipped_dir(base) is not None,
            "shipped_dir": str(_shipped_dir(base) or "") if tune_trials <= 0 else "",
        }
        (jobdir / "request.json").write_text(json.dumps(request))
        _run_child(jobdir, timeout_s, progress)
        libpath = jobdir / "model.so"
        meta = json.loads((jobdir / "result.json").read_text())
        meta.update(so_sha256=_sha256_file(libpath), key=key, versions=_versions())
        (jobdir / "meta.json").write_text(json.dumps(meta, indent=1))
        for name in ("model.onnx", "request.json", "result.json"):
            (jobdir / name).unlink()
        with contextlib.suppress(OSError):  # a concurrent compile may have cached it first; use theirs
            jobdir.rename(final)
        loaded = _load_cached(final, key)
        if loaded is None:
            msg = f"compiled module missing from the cache at {final}"
            raise CompileError(msg)
        loaded.from_cache = False
        return loaded
    finally:
        if jobdir.exists():
            shutil.rmtree(jobdir, ignore_errors=True)


def _load_cached(final: Path, key: str) -> TVMModel | None:
    meta_path, libpath = final / "meta.json", final / "model.so"
    if not (meta_path.is_file() and libpath.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        meta = {}
    if meta.get("so_sha256") != _sha256_file(libpath):
        shutil.rmtree(final, ignore_errors=True)  # corrupt or half-written: compile again
        return None
    return TVMModel(libpath, key, meta, from_cache=True)


def _log_tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-_LOG_TAIL_LINES:])


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """Kill the compile child and everything in its process group (tuning workers), then reap it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _read_events(read_fd: int, deadline: float, timeout_s: float, progress: Progress | None) -> dict[str, Any] | None:
    """Pass the child's JSON-line events to ``progress`` until it closes the pipe; return its error event."""
    error: dict[str, Any] | None = None
    buffer = b""
    with os.fdopen(read_fd, "rb", buffering=0) as pipe:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                msg = f"compilation ran past its timeout of {timeout_s:g} s and was stopped"
                raise CompileTimeout(msg, timeout_s=timeout_s)
            ready, _, _ = select.select([pipe], [], [], min(remaining, 1.0))
            if not ready:
                continue
            chunk = pipe.read(65536)
            if not chunk:
                return error
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                event = json.loads(line)
                if event.get("event") == "error":
                    error = event
                elif progress is not None:
                    progress(event)


def _run_child(jobdir: Path, timeout_s: float, progress: Progress | None) -> None:
    """Run the compile in a child process group; stream its events; enforce the timeout."""
    package_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    read_fd, write_fd = os.pipe()
    log_path = jobdir / "compile.log"
    code = f"from mesatee_notebook.ml.tvm_runtime import _child_main; _child_main({str(jobdir)!r}, {write_fd})"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            pass_fds=(write_fd,),
            start_new_session=True,
            env=env,
        )
    os.close(write_fd)
    deadline = time.monotonic() + timeout_s
    try:
        error = _read_events(read_fd, deadline, timeout_s, progress)
        # Wait for the exit without reaping, so the process group id cannot be reused before
        # _kill_group clears out any worker the child left behind.
        while os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is None:
            if time.monotonic() > deadline:
                msg = f"compilation ran past its timeout of {timeout_s:g} s and was stopped"
                raise CompileTimeout(msg, timeout_s=timeout_s)
            time.sleep(0.01)
    except BaseException:
        _kill_group(proc)
        raise
    _kill_group(proc)
    if error is not None:
        if error.get("code") == UnsupportedOperator.code:
            raise UnsupportedOperator(str(error["message"]), ops=list(error.get("ops", [])))
        raise CompileError(str(error["message"]), log=_log_tail(log_path))
    if proc.returncode != 0:
        msg = f"the compiler process died (exit status {proc.returncode}):\n{_log_tail(log_path)}"
        raise CompileError(msg, returncode=proc.returncode)


# ---------------------------------------------------------------------------------------------
# Child side: runs in its own process, imports TVM, writes JSON lines to the parent's pipe.


def _ms_build(mod: Any, target: Any, _params: Any) -> Any:
    """MetaSchedule builder without TVM's 12-s ``tensor_intrin`` import (no intrinsics on float CPU code)."""
    import tvm
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm.build(mod, target=target)


def _output_specs(ret_type: Any, names: Sequence[str]) -> list[dict[str, Any]]:
    """Specs of the relax ``main`` result: a tensor type, or a tuple type of tensors (TVM 0.27 ``relax.type``)."""
    fields = list(ret_type.fields) if hasattr(ret_type, "fields") else [ret_type]
    specs = []
    for i, field in enumerate(fields):
        shape = getattr(field, "shape", None)
        dims = [int(d) for d in shape.values] if shape is not None and hasattr(shape, "values") else []
        name = names[i] if i < len(names) else f"output_{i}"
        specs.append(TensorSpec(name, tuple(dims), str(field.dtype)).to_json())
    return specs


def _tune(
    mod: Any, target: Any, request: Mapping[str, Any], workdir: Path, emit: Callable[[dict[str, Any]], None]
) -> Any:
    """Tune ``mod`` (already through the zero pipeline); return the cached database.

    Tuning writes into ``workdir`` (seeded with the cached records), which replaces the cached
    database only when tuning finished, so a killed run never leaves a half-written database.
    """
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    from mesatee_notebook.ml.tvm_tune import tune_chosen

    budget = int(request["tune_trials"])
    per_task = request["max_trials_per_task"]
    tune_dir = Path(request["tune_dir"])
    done_path = tune_dir / "done.json"
    done = json.loads(done_path.read_text()) if done_path.is_file() else {}
    if done.get("trials", 0) >= budget and done.get("per_task") == per_task:
        emit({"event": "phase", "phase": "tune-cached", "trials": done["trials"]})
        return ms.database.JSONDatabase(work_dir=str(tune_dir))

    @derived_object
    class _Progress(ms.measure_callback.PyMeasureCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.trials = 0

        def apply(self, scheduler: Any, task_id: int, candidates: Any, builds: Any, runs: Any) -> None:
            self.trials += len(candidates)
            secs = [
                float(np.mean([float(s) for s in r.run_secs]))
                for r in runs
                if r.error_msg is None and r.run_secs is not None
            ]
            emit(
                {
                    "event": "trial",
                    "task": str(scheduler.tasks_[task_id].ctx.task_name),
                    "trials": self.trials,
                    "budget": budget,
                    "best_us": min(secs) * 1e6 if secs else None,
                    "errors": sum(1 for r in runs if r.error_msg is not None),
                }
            )

    emit({"event": "phase", "phase": "tune", "budget": budget})
    t0 = time.perf_counter()
    callbacks = [*ms.measure_callback.MeasureCallback.create("default"), _Progress()]
    workers = max(1, os.cpu_count() or 1)
    work = workdir / "tune"
    work.mkdir()
    for name in _DB_FILES:
        if (tune_dir / name).is_file():
            shutil.copyfile(tune_dir / name, work / name)
    tune_chosen(
        mod,
        target,
        str(work),
        budget=budget,
        per_task=per_task,
        builder=ms.builder.LocalBuilder(f_build=_ms_build, max_workers=workers),
        callbacks=callbacks,
        emit=emit,
    )
    shutil.rmtree(work / "logs", ignore_errors=True)  # per-task logs: large, and compile.log has the summary
    (work / "done.json").write_text(json.dumps({"trials": budget, "per_task": per_task}))
    old = tune_dir.with_name(f"{tune_dir.name}.old-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tune_dir.rename(old)
    work.rename(tune_dir)
    shutil.rmtree(old, ignore_errors=True)
    emit({"event": "phase", "phase": "tuned", "tuning_seconds": time.perf_counter() - t0})
    return ms.database.JSONDatabase(work_dir=str(tune_dir))


def _tuning_target(spec: Any, tune_trials: int) -> Any:
    """MetaSchedule needs ``num-cores`` on CPU targets; default it to this machine's physical cores."""
    if tune_trials <= 0:
        return spec
    doc = {"kind": spec} if isinstance(spec, str) else dict(spec)
    if doc.get("kind") == "llvm" and "num-cores" not in doc:
        import psutil

        doc["num-cores"] = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    return doc


def _import_model(request: Mapping[str, Any], jobdir: Path, emit: Callable[[dict[str, Any]], None]) -> Any:
    """The relax module of ``model.onnx``, or None after emitting an ``UnsupportedOperator`` error event."""
    import onnx
    import tvm
    from tvm.relax.frontend.onnx import from_onnx

    inputs = [TensorSpec.from_json(d) for d in request["inputs"]]
    onnx_model = onnx.load_from_string((jobdir / "model.onnx").read_bytes())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return from_onnx(
                onnx_model,
                shape_dict={s.name: list(s.shape) for s in inputs},
                dtype_dict={s.name: s.dtype for s in inputs},
                keep_params_in_input=False,
            )
        except tvm.error.OpNotImplemented as exc:
            text = str(exc).strip().splitlines()[-1]
            ops = sorted(o.strip() for o in text.split(":")[-1].split(","))
            emit({"event": "error", "code": UnsupportedOperator.code, "message": text, "ops": ops})
            return None


def _schedule(
    mod: Any, target: Any, request: Mapping[str, Any], jobdir: Path, emit: Callable[[dict[str, Any]], None]
) -> tuple[Any, float, float | None]:
    """Legalise and fuse ``mod``, then apply tuned schedules (tuned now, cached, or shipped) if any.

    Returns the module, the tuning seconds and the legalised kernels' estimated FLOPs per call.

    Tuned: the weights (constants) are marked layout-free, so MetaSchedule may pick a packed weight
    layout; the weight transform is split out and folded into the constants at compile time.
    DLight's CPU rules (GEMV, reduction) are not applied: measured on this project's MLP and CNN they
    made the modules 1.3-5x slower than TVM's default lowering (docs/benchmarks.md, P5).
    """
    import tvm
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    trials = int(request["tune_trials"])
    tuned = trials > 0 or bool(request.get("use_tuned"))
    passes = [
        relax.transform.DecomposeOpsForInference(),
        relax.transform.CanonicalizeBindings(),
        relax.pipeline.zero_pipeline(),
    ]
    if tuned:
        passes.append(relax.transform.AttachAttrLayoutFreeBuffers())
    with target:
        mod = tvm.transform.Sequential(passes)(mod)
    flops = _estimated_flops(mod)
    tuning_seconds = 0.0
    if tuned:
        t_tune = time.perf_counter()
        if trials > 0:
            database = _tune(mod, target, request, jobdir, emit)
        else:
            emit({"event": "phase", "phase": "tune-shipped"})
            database = ms.database.JSONDatabase(work_dir=str(request["shipped_dir"]))
        tuning_seconds = time.perf_counter() - t_tune
        with target, database:
            mod = relax.transform.MetaScheduleApplyDatabase()(mod)
        with target:
            mod = tvm.transform.Sequential(
                [
                    relax.transform.SplitLayoutRewritePreproc(),
                    relax.transform.LiftTransformParams(),
                    relax.transform.FoldConstant(),
                ]
            )(mod)
    return mod, tuning_seconds, flops


def _estimated_flops(mod: Any) -> float | None:
    """FLOPs of one call, estimated on the legalised kernels (each counted once); None if TVM cannot tell."""
    from tvm.s_tir.analysis import estimate_tir_flops

    try:
        return float(estimate_tir_flops(mod))
    except Exception:  # an estimate only: a kernel TVM cannot count gets TVM's default thread count
        return None


def _child_main(jobdir_str: str, fd: int) -> None:
    """Entry point of the compile child process: read request.json, write model.so and result.json."""
    out = os.fdopen(fd, "wb", buffering=0)

    def emit(event: dict[str, Any]) -> None:
        out.write(json.dumps(event).encode() + b"\n")

    jobdir = Path(jobdir_str)
    t0 = time.perf_counter()
    try:
        request = json.loads((jobdir / "request.json").read_text())
        emit({"event": "phase", "phase": "import"})
        import tvm

        target = tvm.target.Target(_tuning_target(request["target"], int(request["tune_trials"])))
        mod = _import_model(request, jobdir, emit)
        if mod is None:
            return
        outputs = _output_specs(mod["main"].ret_ty, request["outputs"])
        mod, tuning_seconds, flops = _schedule(mod, target, request, jobdir, emit)
        emit({"event": "phase", "phase": "build"})
        executable = tvm.compile(mod, target=target)
        emit({"event": "phase", "phase": "export"})
        executable.export_library(str(jobdir / "model.so"))
        result = {
            "inputs": request["inputs"],
            "outputs": outputs,
            "target": request["target"],
            "tune_trials": int(request["tune_trials"]),
            "max_trials_per_task": request["max_trials_per_task"],
            "shipped_database": bool(request.get("use_tuned")),
            "tuning_seconds": tuning_seconds,
            "compile_seconds": time.perf_counter() - t0,
            "flops_estimate": flops,
            "threads": None if flops is None else "all" if flops >= PARALLEL_MIN_FLOPS else 1,
        }
        (jobdir / "result.json").write_text(json.dumps(result))
        emit({"event": "phase", "phase": "done", "elapsed_s": time.perf_counter() - t0})
    except Exception as exc:  # report any compiler failure to the parent as a typed event
        emit({"event": "error", "code": CompileError.code, "message": f"{type(exc).__name__}: {exc}"})
    finally:
        out.close()
