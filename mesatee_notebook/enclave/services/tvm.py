"""TVM services: compile an ONNX model with apache-tvm in the service worker, run it, keep modules cached.

``tvm.compile`` takes the ONNX bytes as input ``model`` and ``input_shapes``; the compile runs in a child
process of the worker under a timeout (``ml/tvm_runtime.py``). The compiled module and any MetaSchedule
tuning database are sealed under ``svc/cache/tvm/<digest>`` and ``svc/cache/tvm-tune/<digest>``, keyed
by (model, shapes, target, TVM versions, tuning budget), so compiling the same model again, even after a
worker restart, only unseals and loads the library. The handle is that digest; a party may run a module
only if it compiled it (the weights are the compiling party's).

``tvm.run`` takes arrays (inputs ``in0, in1, ...`` named by ``args['inputs']``), or a dataset: its
(selected) columns feed a 2-D input in batches of the compiled batch size (the last batch padded). As
with GBDT, results on another party's dataset stay in the enclave as a dataset under the owner's policy.

While loaded, a module's ``.so`` (which holds the model's weights) is plaintext in the worker's private
0700 directory on the host's tmpfs (softtee: the host is trusted not to read it).
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from mesatee_notebook.enclave.services import ServiceContext, ServiceResult, service
from mesatee_notebook.enclave.services.gbdt import (
    DataRef,
    private_dir,
    refuse,
    resolve_data,
    restore_blob,
    seal_dir,
    store_derived,
)
from mesatee_notebook.errors import EncodingError, NotFound, PolicyViolation

if TYPE_CHECKING:
    from mesatee_notebook.ml.onnx_engine import ORTModel
    from mesatee_notebook.ml.onnx_treelib import TreeliteONNXModel
    from mesatee_notebook.ml.tvm_runtime import TVMModel

__all__: list[str] = []

_MAX_TIMEOUT_S = 3600.0


def _shapes(value: Any) -> dict[str, list[int]]:
    if not isinstance(value, dict) or not value:
        msg = "input_shapes must map each model input name to its shape, e.g. {'x': [1024, 64]}"
        raise EncodingError(msg)
    out: dict[str, list[int]] = {}
    for name, shape in value.items():
        if not isinstance(shape, (list, tuple)) or not all(
            isinstance(d, int) and not isinstance(d, bool) for d in shape
        ):
            msg = f"input_shapes[{name!r}] must be a list of integers, got {shape!r}"
            raise EncodingError(msg)
        out[str(name)] = [int(d) for d in shape]
    return out


def _module_meta(module: TVMModel, owners: list[str]) -> dict[str, Any]:
    return {
        "id": module.digest,
        "owners": owners,
        "inputs": [s.to_json() for s in module.inputs],
        "outputs": [s.to_json() for s in module.outputs],
        "tune_trials": module.tuned_trials,
        "shipped_database": bool(module.meta.get("shipped_database")),  # tuned schedules shipped in the package
        "library_sha256": module.library_sha256,
        "tuning_seconds": float(module.meta.get("tuning_seconds", 0.0)),
        "compile_seconds": float(module.meta.get("compile_seconds", 0.0)),
        "threads": module.meta.get("threads"),  # 1 or "all", chosen at compile time (TVM_NUM_THREADS overrides)
    }


@service("tvm.compile")
def compile_model(ctx: ServiceContext, args: dict[str, Any], inputs: dict[str, Any]) -> ServiceResult:
    """Compile ONNX bytes (input ``model``) for static ``input_shapes``; cached sealed by digest."""
    from mesatee_notebook.ml import tvm_runtime

    raw = inputs.get("model")
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        msg = "tvm.compile needs the ONNX model as bytes (input 'model')"
        raise EncodingError(msg)
    model = bytes(raw)
    shapes = _shapes(args.get("input_shapes"))
    from mesatee_notebook.enclave.services import onnx_ort  # engine hook: graphs TVM cannot take (onnx_engine.py)

    other = onnx_ort.compile_other(ctx, model, shapes, str(args.get("engine") or "auto"))
    if other is not None:
        return other
    target = args.get("target") or "llvm"
    trials = int(args.get("tune_trials", 0))
    per_task = args.get("max_trials_per_task")
    per_task = None if per_task is None else int(per_task)
    timeout = min(float(args.get("timeout_s") or tvm_runtime.DEFAULT_TIMEOUT_S), _MAX_TIMEOUT_S)
    t0 = time.perf_counter()
    key = tvm_runtime.model_digest(model, shapes, target, tune_trials=trials, max_trials_per_task=per_task)
    loaded: dict[str, TVMModel] = ctx.state.setdefault("tvm_modules", {})
    module = loaded.get(key)
    source = "worker"
    if module is None:
        where = private_dir(ctx) / "tvm"
        where.mkdir(exist_ok=True)
        blob = f"cache/tvm/{key}"
        had_blob = restore_blob(ctx, blob, where)
        tune_blob = (
            "cache/tvm-tune/"
            + hashlib.sha256(
                hashlib.sha256(model).digest() + json.dumps([shapes, target], sort_keys=True).encode()
            ).hexdigest()
        )
        if trials > 0 and not had_blob:
            restore_blob(ctx, tune_blob, where)
        before = {p.name: p.stat().st_mtime_ns for p in where.iterdir()}

        def progress(event: dict[str, Any]) -> None:
            ctx.progress(**event)

        module = tvm_runtime.compile_onnx(
            model,
            shapes,
            where,
            target=target,
            tune_trials=trials,
            max_trials_per_task=per_task,
            timeout_s=timeout,
            progress=progress,
        )
        source = "sealed cache" if had_blob and module.from_cache else "compiled"
        if source == "compiled":
            seal_dir(ctx, blob, module.path.parent)
            for entry in where.iterdir():
                if entry.name.startswith("tvm-tune-") and before.get(entry.name) != entry.stat().st_mtime_ns:
                    seal_dir(ctx, tune_blob, entry)
        loaded[key] = module
    meta_name = f"tvm/modules/{key}"
    try:
        owners = list(json.loads(ctx.seal_get(meta_name)).get("owners", []))
    except NotFound:
        owners = []
    if ctx.party not in owners:
        owners.append(ctx.party)
    meta = _module_meta(module, owners)
    ctx.seal_put(meta_name, json.dumps(meta).encode())
    ctx.audit("job", {"service": "tvm.compile", "module": key, "tune_trials": trials, "source": source})
    info = {k: v for k, v in meta.items() if k != "owners"}
    return ServiceResult(info={**info, "engine": "tvm", "source": source, "seconds": time.perf_counter() - t0})


def _module(ctx: ServiceContext, key: Any) -> TVMModel | ORTModel | TreeliteONNXModel:
    """A module the caller compiled, loaded in this worker (unsealed again after a restart)."""
    from mesatee_notebook.ml import tvm_runtime

    mid = str(key or "")
    try:
        meta = json.loads(ctx.seal_get(f"tvm/modules/{mid}"))
    except (NotFound, ValueError):
        msg = f"no compiled module {mid[:12]}… in this kernel; compile it first"
        raise NotFound(msg, module=mid) from None
    if ctx.party not in meta.get("owners", []):
        msg = "this module was compiled by another party"
        raise PolicyViolation(msg, module=mid)
    if meta.get("engine") == "onnxruntime":  # engine hooks (enclave/services/onnx_ort.py)
        from mesatee_notebook.enclave.services.onnx_ort import load_ort

        return load_ort(ctx, mid)
    if meta.get("engine") == "treelite":
        from mesatee_notebook.enclave.services.onnx_ort import load_treelite

        return load_treelite(ctx, mid)
    loaded: dict[str, TVMModel] = ctx.state.setdefault("tvm_modules", {})
    module = loaded.get(mid)
    if module is None:
        where = private_dir(ctx) / "tvm"
        where.mkdir(exist_ok=True)
        if not restore_blob(ctx, f"cache/tvm/{mid}", where):
            msg = f"compiled module {mid[:12]}… is no longer cached; compile it again"
            raise NotFound(msg, module=mid)
        final = where / f"tvm-{mid}"
        module = tvm_runtime.TVMModel(
            final / "model.so", mid, json.loads((final / "meta.json").read_text()), from_cache=True
        )
        loaded[mid] = module
    return module


def _run_dataset(
    module: TVMModel | ORTModel | TreeliteONNXModel, data: DataRef, input_name: str | None
) -> dict[str, np.ndarray]:
    from mesatee_notebook.ml._errors import InputShapeError, NonNumericFeatures

    specs = module.inputs
    if input_name is None:
        if len(specs) != 1:
            msg = f"the model has inputs {[s.name for s in specs]}; name the one the dataset feeds (input=...)"
            raise InputShapeError(msg)
        spec = specs[0]
    else:
        found = [s for s in specs if s.name == input_name]
        if not found:
            msg = f"the model has no input {input_name!r} (inputs: {[s.name for s in specs]})"
            raise InputShapeError(msg)
        spec = found[0]
    if len(specs) != 1:
        msg = "a dataset can feed a one-input model only"
        raise InputShapeError(msg)
    if len(spec.shape) != 2:
        msg = f"a dataset feeds a 2-D input (rows, features); input {spec.name!r} has shape {spec.shape}"
        raise InputShapeError(msg, shape=list(spec.shape))
    batch, width = spec.shape
    frame = data.frame
    bad = [str(c) for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c].dtype)]
    if bad:
        msg = f"feature columns must be numeric: {', '.join(bad)}"
        raise NonNumericFeatures(msg, columns=bad)
    if frame.shape[1] != width:
        msg = f"input {spec.name!r} takes {width} features per row; the dataset gives {frame.shape[1]} columns"
        raise InputShapeError(msg, expected=width, got=int(frame.shape[1]))
    X = np.ascontiguousarray(frame.to_numpy(dtype=spec.dtype))
    chunks: dict[str, list[np.ndarray]] = {o.name: [] for o in module.outputs}
    for start in range(0, X.shape[0], batch):
        part = X[start : start + batch]
        n = part.shape[0]
        if n < batch:
            part = np.concatenate([part, np.zeros((batch - n, width), dtype=part.dtype)])
        for name, value in module.run({spec.name: part}).items():
            chunks[name].append(value[:n])
    return {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in chunks.items()}


def _outputs_frame(outputs: dict[str, np.ndarray]) -> pd.DataFrame:
    cols: dict[str, np.ndarray] = {}
    for name, value in outputs.items():
        flat = value.reshape(value.shape[0], -1)
        if flat.shape[1] == 1:
            cols[name] = flat[:, 0]
        else:
            cols.update({f"{name}_{j}": flat[:, j] for j in range(flat.shape[1])})
    return pd.DataFrame(cols)


def _engine(module: TVMModel | ORTModel | TreeliteONNXModel) -> str:
    return str(getattr(module, "engine", "tvm"))


@service("tvm.run")
def run(ctx: ServiceContext, args: dict[str, Any], inputs: dict[str, Any]) -> ServiceResult:
    """Run a compiled module on arrays, or on a dataset (the result stays remote when it is another's)."""
    module = _module(ctx, args.get("module"))
    t0 = time.perf_counter()
    if args.get("data") is not None:
        data = resolve_data(ctx, args.get("data"), inputs, "model input")
        foreign = data.dataset is not None and data.owner != ctx.party
        remote = args.get("remote")
        keep = foreign if remote is None else bool(remote)
        if keep and data.dataset is None:
            msg = "only results on a stored dataset can stay in the enclave"
            raise EncodingError(msg)
        if not data.code_access(ctx.party):
            if not keep:
                raise refuse(
                    ctx,
                    data,
                    f"results on dataset {data.dataset!r} stay in the enclave: its owner has not given you code access",
                )
            used = set(map(str, data.frame.columns)) & data.hidden()
            if used:
                raise refuse(
                    ctx,
                    data,
                    f"the model would read hidden column(s) {', '.join(sorted(used))}; select other columns",
                    columns=sorted(used),
                )
        outputs = _run_dataset(module, data, args.get("input"))
        info: dict[str, Any] = {
            "module": module.digest,
            "rows": len(data.frame),
            "engine": _engine(module),
            "run_seconds": time.perf_counter() - t0,
            "library_sha256": module.library_sha256,
        }
        if keep:
            derived = {"kind": "tvm", "module": module.digest}
            info["dataset"] = store_derived(ctx, data, _outputs_frame(outputs), args.get("name"), derived)
            return ServiceResult(info=info)
        return ServiceResult(info=info, values=outputs)
    names = dict(args.get("inputs") or {})
    feeds = {str(names.get(k, k)): v for k, v in inputs.items()}
    outputs = module.run(feeds)
    return ServiceResult(
        info={
            "module": module.digest,
            "run_seconds": time.perf_counter() - t0,
            "library_sha256": module.library_sha256,
            "engine": _engine(module),
        },
        values=outputs,
    )
