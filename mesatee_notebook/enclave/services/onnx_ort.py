"""The onnxruntime side of ``tvm.compile`` / ``tvm.run`` (``ml/onnx_engine.py``); no services of its own.

``tvm.compile`` hands a model here when the engine is ``onnxruntime`` (pinned by the caller, or chosen by
``auto`` because TVM's frontend cannot import the graph). The model bytes and shapes are sealed under
``svc/cache/ort/<digest>`` and the module's metadata under ``svc/tvm/modules/<digest>`` with
``"engine": "onnxruntime"``, so ``tvm.run`` finds it through the same handle, even after a worker
restart, with the same rule: a party runs only a module it compiled. Nothing is written to disk: the
session is built from the bytes in memory.

The ``treelite`` engine (tree ensembles compiled by the compiled-tree path, ``ml/onnx_treelib.py``) is handled
here too: its build directory (``model.onnx``, ``model.so``, ``meta.json``) is sealed under
``svc/cache/onnx-trees/<digest>`` and its metadata under ``svc/tvm/modules/<digest>`` with
``"engine": "treelite"``. Under ``engine="auto"`` a graph the treelite engine cannot compile or that fails
its parity check against onnxruntime goes to onnxruntime, and the reply says why (``treelite_refused``).
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from mesatee_notebook.enclave.services import ServiceContext, ServiceResult
from mesatee_notebook.errors import NotFound

if TYPE_CHECKING:
    from mesatee_notebook.ml.onnx_engine import ORTModel
    from mesatee_notebook.ml.onnx_treelib import TreeliteONNXModel

__all__ = ["compile_ort", "compile_other", "compile_treelite", "load_ort", "load_treelite"]


def compile_other(
    ctx: ServiceContext, model: bytes, shapes: dict[str, list[int]], requested: str
) -> ServiceResult | None:
    """Compile on onnxruntime or treelite if the (requested or chosen) engine is one of them; None for TVM."""
    from mesatee_notebook.ml.onnx_engine import choose_engine

    engine = choose_engine(model, requested, shapes)
    if engine == "onnxruntime":
        return compile_ort(ctx, model, shapes)
    if engine == "treelite":
        return compile_treelite(ctx, model, shapes, pinned=requested == "treelite")
    return None


def _blob(key: str) -> str:
    return f"cache/ort/{key}"


def compile_ort(
    ctx: ServiceContext, model: bytes, shapes: dict[str, list[int]], *, refused: str | None = None
) -> ServiceResult:
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
    extra: dict[str, Any] = {"onnxruntime": module.meta["onnxruntime"]}
    if refused is not None:
        extra["treelite_refused"] = refused
    return _record(ctx, module, source, extra, t0)


def _record(
    ctx: ServiceContext, module: ORTModel | TreeliteONNXModel, source: str, extra: dict[str, Any], t0: float
) -> ServiceResult:
    """Seal the module's metadata (adding the caller as an owner), audit the job, and reply with it."""
    meta_name = f"tvm/modules/{module.digest}"
    try:
        owners = list(json.loads(ctx.seal_get(meta_name)).get("owners", []))
    except NotFound:
        owners = []
    if ctx.party not in owners:
        owners.append(ctx.party)
    meta = {
        "id": module.digest,
        "engine": module.engine,
        "owners": owners,
        "inputs": [s.to_json() for s in module.inputs],
        "outputs": [s.to_json() for s in module.outputs],
        "tune_trials": 0,
        "library_sha256": module.library_sha256,
        **extra,
    }
    ctx.seal_put(meta_name, json.dumps(meta).encode())
    ctx.audit("job", {"service": "tvm.compile", "module": module.digest, "engine": module.engine, "source": source})
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


def _trees_blob(key: str) -> str:
    return f"cache/onnx-trees/{key}"


def compile_treelite(ctx: ServiceContext, model: bytes, shapes: dict[str, list[int]], *, pinned: bool) -> ServiceResult:
    """Compile a tree-ensemble graph with the treelite engine; unless ``pinned``, onnxruntime if it cannot."""
    from mesatee_notebook.enclave.services.gbdt import private_dir, restore_blob, seal_dir
    from mesatee_notebook.errors import CompileError, UnsupportedOperator
    from mesatee_notebook.ml.onnx_treelib import compile_onnx_trees, model_digest

    t0 = time.perf_counter()
    key = model_digest(model, shapes)
    loaded: dict[str, TreeliteONNXModel] = ctx.state.setdefault("onnx_trees", {})
    module = loaded.get(key)
    source = "worker"
    if module is None:
        where = private_dir(ctx) / "onnx-trees"
        where.mkdir(exist_ok=True)
        had_blob = restore_blob(ctx, _trees_blob(key), where)
        try:
            module = compile_onnx_trees(model, shapes, where)
        except (CompileError, UnsupportedOperator) as exc:
            if pinned:
                raise
            return compile_ort(ctx, model, shapes, refused=str(exc))
        source = "sealed cache" if had_blob and module.from_cache else "compiled"
        if source == "compiled":
            seal_dir(ctx, _trees_blob(key), module.path.parent)
        loaded[key] = module
    extra = {"treelite": module.meta["toolchain"], "parity_max_abs_diff": module.meta.get("parity_max_abs_diff")}
    return _record(ctx, module, source, extra, t0)


def load_treelite(ctx: ServiceContext, key: str) -> TreeliteONNXModel:
    """The treelite module ``key`` (owner already checked), from this worker or unsealed again."""
    from mesatee_notebook.enclave.services.gbdt import private_dir, restore_blob
    from mesatee_notebook.ml.onnx_treelib import TreeliteONNXModel

    loaded: dict[str, TreeliteONNXModel] = ctx.state.setdefault("onnx_trees", {})
    module = loaded.get(key)
    if module is None:
        where = private_dir(ctx) / "onnx-trees"
        where.mkdir(exist_ok=True)
        if not restore_blob(ctx, _trees_blob(key), where):
            msg = f"module {key[:12]}… is no longer cached; compile it again"
            raise NotFound(msg, module=key)
        module = TreeliteONNXModel(where / f"onnxtrees-{key}", from_cache=True)
        loaded[key] = module
    return module
