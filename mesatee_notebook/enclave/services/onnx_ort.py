"""The onnxruntime side of ``tvm.compile`` / ``tvm.run`` (``ml/onnx_engine.py``); no services of its own.

``tvm.compile`` hands a model here when the engine is ``onnxruntime`` (pinned by the caller, or chosen by
``auto`` because TVM's frontend cannot import the graph). The model bytes and shapes are sealed under
``svc/cache/ort/<digest>`` and the module's metadata under ``svc/tvm/modules/<digest>`` with
``"engine": "onnxruntime"``, so ``tvm.run`` finds it through the same handle, even after a worker
restart, with the same rule: a party runs only a module it compiled. Nothing is written to disk: the
session is built from the bytes in memory.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

from mesatee_notebook.enclave.services import ServiceContext, ServiceResult
from mesatee_notebook.errors import NotFound

if TYPE_CHECKING:
    from mesatee_notebook.ml.onnx_engine import ORTModel

__all__ = ["compile_ort", "load_ort"]


def _blob(key: str) -> str:
    return f"cache/ort/{key}"


def compile_ort(ctx: ServiceContext, model: bytes, shapes: dict[str, list[int]]) -> ServiceResult:
    """Load ``model`` into onnxruntime for ``shapes``, seal it, record the caller as an owner of the handle."""
    from mesatee_notebook.ml.onnx_engine import ORTModel, model_digest

    t0 = time.perf_counter()
    key = model_digest(model, shapes)
    loaded: dict[str, ORTModel] = ctx.state.setdefault("ort_modules", {})
    module = loaded.get(key)
    source = "worker"
    if module is None:
        module = ORTModel(model, shapes, from_cache=False)
        try:
            ctx.seal_get(_blob(key))
            source = "sealed cache"
        except NotFound:
            ctx.seal_put(_blob(key), json.dumps({"shapes": shapes}).encode() + b"\n" + model)
            source = "compiled"
        loaded[key] = module
    meta_name = f"tvm/modules/{key}"
    try:
        owners = list(json.loads(ctx.seal_get(meta_name)).get("owners", []))
    except NotFound:
        owners = []
    if ctx.party not in owners:
        owners.append(ctx.party)
    meta = {
        "id": key,
        "engine": module.engine,
        "owners": owners,
        "inputs": [s.to_json() for s in module.inputs],
        "outputs": [s.to_json() for s in module.outputs],
        "tune_trials": 0,
        "library_sha256": module.library_sha256,
        "onnxruntime": module.meta["onnxruntime"],
    }
    ctx.seal_put(meta_name, json.dumps(meta).encode())
    ctx.audit("job", {"service": "tvm.compile", "module": key, "engine": module.engine, "source": source})
    info = {k: v for k, v in meta.items() if k != "owners"}
    return ServiceResult(info={**info, "source": source, "seconds": time.perf_counter() - t0})


def load_ort(ctx: ServiceContext, key: str) -> ORTModel:
    """The onnxruntime module ``key`` (owner already checked), from this worker or unsealed again."""
    from mesatee_notebook.ml.onnx_engine import ORTModel

    loaded: dict[str, ORTModel] = ctx.state.setdefault("ort_modules", {})
    module = loaded.get(key)
    if module is None:
        try:
            head, _, model = ctx.seal_get(_blob(key)).partition(b"\n")
        except NotFound:
            msg = f"module {key[:12]}… is no longer cached; compile it again"
            raise NotFound(msg, module=key) from None
        module = ORTModel(model, json.loads(head)["shapes"], from_cache=True)
        loaded[key] = module
    return module
