"""P5: TVM (relax, llvm) inference vs onnxruntime, untuned and tuned with a small MetaSchedule budget.

Engine level (no channel yet). Models are built in code: an MLP 64->256->256->10 and a small CNN on
(N, 3, 16, 16). Each at batch 1 and 1024: onnxruntime (CPU provider), TVM untuned, TVM tuned with
TRIALS trials (global budget per model and shape). Latency is ``TVMModel.run`` (input checks, copy in,
run, copy out) vs ``InferenceSession.run``; medians of R samples, each a loop of at least 50 ms.
Compile, cache-hit and tuning times come from the same run (fresh cache directory).
Prints a table and writes bench/results/p5_tvm.json.
onnxruntime runs with all graph optimisations, at its default threads and at 1 thread; the faster is the
baseline. TVM targets this CPU exactly (``--target host``: llvm -mcpu=<host> -num-cores=<physical cores>);
"untuned" is TVM's default lowering, or a tuned database shipped in mesatee_notebook/ml/tuned/ for this exact
(model, shapes, target, TVM version) when there is one (column "shipped").
Usage: python bench/p5_tvm.py [TRIALS] [REPEATS] [--target JSON] [--cache DIR] [--cases mlp1,...]
       [--tune-cases mlp1024,...]   (TRIALS 0: untuned only)
       python bench/p5_tvm.py --overhead SECONDS [--cache DIR] [--cases mlp1,cnn1]
       python bench/p5_tvm.py --ops SECONDS [--cache DIR] [--cases mlp1,...]
       python bench/p5_tvm.py --cases CASE --ship-from DIR   (merge a MetaSchedule database into CASE's shipped one)
--ops: which operator holds TVM back: every kernel the VM's ``main`` launches (captured with the VM's
instrument hook) timed alone on the arguments it was given, interleaved with the whole ``main`` and the whole
onnxruntime call (p10 and median), and onnxruntime's own per-node profile (its profiler adds a few µs per
node, so compare its nodes with each other, the whole call with the whole call). Writes
bench/results/p5_tvm_ops.json.
--overhead: where a batch-1 call's time goes, the variants interleaved round-robin for SECONDS each case
(on a shared machine a slower variant's longer samples are preempted more often, so p10 is the fairer
figure and both are printed): onnxruntime (1 thread); ``TVMModel.run``; the same module's VM ``main`` alone;
the untuned module's ``main`` built with ``exec_mode="bytecode"`` and with ``"compiled"``; the pre-session-4
run (``Tensor.copyfrom`` in,
``Tensor.numpy()`` out); and a one-``Relu`` model's VM call (the VM's fixed cost). Writes
bench/results/p5_tvm_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._timing import timeit
from mesatee_notebook.ml import tvm_runtime
from tests.ml.conftest import cnn_model, mlp_model

_CASES = {
    "mlp1": ("mlp", mlp_model(), "x", (1, 64)),
    "mlp1024": ("mlp", mlp_model(), "x", (1024, 64)),
    "cnn1": ("cnn", cnn_model(), "image", (1, 3, 16, 16)),
    "cnn1024": ("cnn", cnn_model(), "image", (1024, 3, 16, 16)),
}


def tvm_threads() -> int:
    """Threads TVM's pool uses in this thread: ``TVM_NUM_THREADS``, else half the logical CPUs on x86 (at least 1).

    TVM assumes two hyper-threads per core on x86, so on this 2-vCPU VM (one thread per core) it runs every
    kernel on one thread unless ``TVM_NUM_THREADS`` says otherwise (docs/benchmarks.md, P5, session 7).
    """
    import tvm

    return int(tvm.get_global_func("runtime.NumThreads")())


def fmt(seconds: float) -> str:
    return f"{seconds * 1e6:,.0f} us" if seconds < 1e-2 else f"{seconds * 1e3:,.1f} ms"


def bench_case(
    name: str,
    model: onnx.ModelProto,
    input_name: str,
    shape: tuple[int, ...],
    cache: Path,
    trials: int,
    repeats: int,
    target: Any,
) -> dict[str, Any]:
    import onnxruntime as ort

    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    row: dict[str, Any] = {"model": name, "shape": list(shape)}

    t0 = time.perf_counter()
    untuned = tvm_runtime.compile_onnx(model, {input_name: shape}, cache, target=target)
    row["untuned_compile_s"] = time.perf_counter() - t0
    row["untuned_from_cache"] = untuned.from_cache
    t0 = time.perf_counter()
    tvm_runtime.compile_onnx(model, {input_name: shape}, cache, target=target)
    row["cache_hit_s"] = time.perf_counter() - t0
    row["untuned_shipped_database"] = bool(untuned.meta.get("shipped_database"))
    row["base_digest"] = tvm_runtime._base_digest(model.SerializeToString(), {input_name: shape}, target)

    tuned = None
    if trials > 0:
        trial_events: list[dict[str, Any]] = []
        t0 = time.perf_counter()
        tuned = tvm_runtime.compile_onnx(
            model, {input_name: shape}, cache, target=target, tune_trials=trials, progress=trial_events.append
        )
        row["tuned_compile_s"] = time.perf_counter() - t0
        row["tuned_from_cache"] = tuned.from_cache
        row["tuning_s"] = float(tuned.meta["tuning_seconds"])
        row["tasks"] = sorted({e["task"] for e in trial_events if e.get("event") == "trial"})
        row["trials_run"] = max((e["trials"] for e in trial_events if e.get("event") == "trial"), default=0)
        t0 = time.perf_counter()
        tvm_runtime.compile_onnx(model, {input_name: shape}, cache, target=target, tune_trials=trials)
        row["tuned_cache_hit_s"] = time.perf_counter() - t0

    # TVM first, then each onnxruntime session on its own: on 2 cores, onnxruntime's spinning pool
    # threads slow TVM's pool (and each other) several times over when they share the process.
    row["tvm_untuned"] = timeit(lambda: untuned.run(x), repeats)
    row["tvm_threads"] = untuned.threads  # the module's own choice (meta["threads"]) or TVM's
    if tuned is not None:
        row["tvm_tuned"] = timeit(lambda: tuned.run(x), repeats)
    ort_runs = {}
    want = None
    for threads in (0, 1):  # 0: onnxruntime's default (one thread per physical core)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        if want is None:
            want = session.run(None, {input_name: x})[0]  # first output; the CNN also returns its logits
        ort_runs[threads] = timeit(lambda s=session: s.run(None, {input_name: x}), repeats)
        del session
    # onnxruntime at its best: all graph optimisations, the faster of 1 thread and one per core (same run)
    best = min(ort_runs, key=lambda t: ort_runs[t]["median_s"])
    row["onnxruntime"] = ort_runs[best]
    row["onnxruntime_threads"] = {"default" if t == 0 else str(t): v["median_s"] for t, v in ort_runs.items()}
    row["onnxruntime_best"] = "default" if best == 0 else f"{best} thread"
    out = untuned.outputs[0].name
    row["untuned_max_abs_diff"] = float(np.max(np.abs(untuned.run(x)[out] - want)))
    row["ratio_untuned_vs_ort"] = row["tvm_untuned"]["median_s"] / row["onnxruntime"]["median_s"]
    if tuned is not None:
        row["tuned_max_abs_diff"] = float(np.max(np.abs(tuned.run(x)[out] - want)))
        row["ratio_tuned_vs_ort"] = row["tvm_tuned"]["median_s"] / row["onnxruntime"]["median_s"]
        row["speedup_tuned_vs_untuned"] = row["tvm_untuned"]["median_s"] / row["tvm_tuned"]["median_s"]
    return row


def ship_database(tune_dir: Path, dest: Path) -> int:
    """Copy a tuning database into the package, keeping only each workload's fastest valid record."""
    best: dict[int, tuple[float, str]] = {}
    for line in (tune_dir / "database_tuning_record.json").read_text().splitlines():
        if not line.strip():
            continue
        workload, record = json.loads(line)
        secs = [float(x) for x in (record[1] or [])]
        if not secs:
            continue
        mean = sum(secs) / len(secs)
        if workload not in best or mean < best[workload][0]:
            best[workload] = (mean, line)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "database_workload.json").write_bytes((tune_dir / "database_workload.json").read_bytes())
    (dest / "database_tuning_record.json").write_text("".join(line + "\n" for _, line in sorted(best.values())))
    (dest / "done.json").write_bytes((tune_dir / "done.json").read_bytes())
    return len(best)


def merge_records(source: Path, into: Path) -> int:
    """Commit every tuning record of the MetaSchedule database ``source`` into the one at ``into`` (re-indexed)."""
    from tvm.s_tir import meta_schedule as ms

    src = ms.database.JSONDatabase(work_dir=str(source))
    dst = ms.database.JSONDatabase(work_dir=str(into))
    records = src.get_all_tuning_records()
    for rec in records:
        workload = dst.commit_workload(rec.workload.mod)
        dst.commit_tuning_record(ms.database.TuningRecord(rec.trace, workload, rec.run_secs, rec.target, rec.args_info))
    return len(records)


def _interleaved(variants: dict[str, Any], seconds: float, inner: int = 20) -> dict[str, dict[str, float]]:
    samples: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():
        fn()
        fn()
    end = time.time() + seconds
    while time.time() < end:
        for key, fn in variants.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[key].append((time.perf_counter() - t0) / inner)
    return {
        k: {"median_s": float(np.median(v)), "p10_s": float(np.percentile(v, 10)), "rounds": len(v)}
        for k, v in samples.items()
    }


def _vm_main(model: onnx.ModelProto, input_name: str, shape: tuple[int, ...], mode: str, where: Path) -> Any:
    """The untuned module's relax VM ``main`` built with ``exec_mode`` (same passes as the compile path)."""
    import warnings

    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    target = tvm.target.Target(tvm_runtime.resolve_target("host"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mod = from_onnx(
            model, shape_dict={input_name: list(shape)}, dtype_dict={input_name: "float32"}, keep_params_in_input=False
        )
    passes = [
        relax.transform.DecomposeOpsForInference(),
        relax.transform.CanonicalizeBindings(),
        relax.pipeline.zero_pipeline(),
    ]
    with target:
        mod = tvm.transform.Sequential(passes)(mod)
    path = where / f"overhead-{mode}-{shape[1]}.so"  # distinct per model: dlopen caches by path
    relax.build(mod, target=target, exec_mode=mode).export_library(str(path))
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(path)), tvm.cpu())
    arg = tvm.runtime.empty(shape, "float32", tvm.cpu())
    main = vm["main"]
    return lambda: main(arg)


def overhead(cases: list[str], seconds: float, cache: Path) -> None:
    """Batch-1 call breakdown (see the module docstring); prints a table, writes p5_tvm_overhead.json."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    relu = helper.make_model(
        helper.make_graph(
            [helper.make_node("Relu", ["x"], ["y"])],
            "relu",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    trivial = tvm_runtime.compile_onnx(relu, {"x": (1, 64)}, cache)
    models = {"mlp1": (mlp_model(), "x", (1, 64)), "cnn1": (cnn_model(), "image", (1, 3, 16, 16))}
    load_before = os.getloadavg()
    out: dict[str, Any] = {}
    for case in cases:
        model, input_name, shape = models[case]
        x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
        module = tvm_runtime.compile_onnx(model, {input_name: shape}, cache)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        arg, main = module._args[0], module._main

        def old_run(arg: Any = arg, main: Any = main, x: np.ndarray = x) -> Any:
            arg.copyfrom(x)
            result = main(arg)
            return [v.numpy() for v in ([result] if hasattr(result, "numpy") else list(result))]

        variants = {
            "onnxruntime (1 thread)": lambda s=session, n=input_name, x=x: s.run(None, {n: x}),
            "TVMModel.run": lambda m=module, x=x: m.run(x),
            "pre-session-4 run (copyfrom, numpy())": old_run,
            "VM main alone": lambda main=main, arg=arg: main(arg),
            "untuned VM main, exec_mode=bytecode": _vm_main(model, input_name, shape, "bytecode", cache),
            "untuned VM main, exec_mode=compiled": _vm_main(model, input_name, shape, "compiled", cache),
            "one-Relu model: VM main alone": lambda: trivial._main(trivial._args[0]),
        }
        out[case] = _interleaved(variants, seconds)
        base = out[case]["onnxruntime (1 thread)"]
        print(f"{case}: load {os.getloadavg()[0]:.1f}")
        for key, st in out[case].items():
            print(
                f"  {key:<40} p10 {fmt(st['p10_s']):>9} ({st['p10_s'] / base['p10_s']:5.2f}x)  "
                f"median {fmt(st['median_s']):>9} ({st['median_s'] / base['median_s']:5.2f}x)"
            )
    result = {"bench": "p5_tvm_overhead", "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cases": out}
    result["machine"] = {"cpus": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    path = Path(__file__).resolve().parent / "results" / "p5_tvm_overhead.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


def _kernel_calls(module: Any) -> list[tuple[str, Any, list[Any]]]:
    """The compiled kernels one VM ``main`` call launches, in order, with the arguments it passed them."""
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(tvm.runtime.load_module(str(module.path)), tvm.cpu())
    calls: list[tuple[str, Any, list[Any]]] = []

    def instrument(func: Any, symbol: str, before: bool, _ret: Any, *args: Any) -> int:
        if before and not symbol.startswith("vm.builtin"):
            calls.append((symbol, func, list(args)))
        return 0

    vm.set_instrument(instrument)
    vm["main"](*module._args)
    return calls


def _ort_nodes(model: onnx.ModelProto, feeds: dict[str, np.ndarray], calls: int, where: Path) -> dict[str, Any]:
    """onnxruntime's own per-node profile (1 thread, all optimisations): median and p10 per node, in µs."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.enable_profiling = True
    options.profile_file_prefix = str(where / "ort-profile")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    for _ in range(calls):
        session.run(None, feeds)
    events = json.loads(Path(session.end_profiling()).read_text())
    nodes: dict[str, list[float]] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            label = f"{e['args'].get('op_name', '')} {e['name'].removesuffix('_kernel_time')}"
            nodes.setdefault(label, []).append(float(e["dur"]))
    return {k: {"median_us": float(np.median(v)), "p10_us": float(np.percentile(v, 10))} for k, v in nodes.items()}


def ops(cases: list[str], seconds: float, cache: Path) -> None:
    """Per-kernel times: each TVM kernel alone (p10, median) vs onnxruntime's per-node profile; p5_tvm_ops.json."""
    import onnxruntime as ort

    out: dict[str, Any] = {}
    for case in cases:
        _, model, input_name, shape = _CASES[case]
        x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
        module = tvm_runtime.compile_onnx(model, {input_name: shape}, cache)
        np.copyto(module._views[0], x)
        sessions = []
        for threads in (1, 0):  # 0: onnxruntime's default, one thread per physical core
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            # Its pool threads spin between calls, which starves TVM's second thread in the same process.
            options.add_session_config_entry("session.intra_op.allow_spinning", "1" if threads == 1 else "0")
            blob = model.SerializeToString()
            sessions.append(ort.InferenceSession(blob, options, providers=["CPUExecutionProvider"]))
        inner = 20 if shape[0] == 1 else 2
        variants = {
            "onnxruntime (1 thread), whole call": lambda s=sessions[0], n=input_name, x=x: s.run(None, {n: x}),
            "onnxruntime (default threads, no spinning), whole call": lambda s=sessions[1], n=input_name, x=x: s.run(
                None, {n: x}
            ),
            "TVMModel.run (copy in, VM main, copy out)": lambda m=module, x=x: m.run(x),
            "TVM VM main, whole call": lambda m=module: m._main(*m._args),
        }
        variants.update({f"TVM kernel {sym}": (lambda f=f, a=a: f(*a)) for sym, f, a in _kernel_calls(module)})
        timed = _interleaved(variants, seconds, inner)
        nodes = _ort_nodes(model, {input_name: x}, 2000 if shape[0] == 1 else 20, cache)
        out[case] = {"shipped_database": bool(module.meta.get("shipped_database")), "tvm": timed, "ort_nodes": nodes}
        best_ort = min(v["p10_s"] for k, v in timed.items() if k.startswith("onnxruntime"))
        ratio = timed["TVMModel.run (copy in, VM main, copy out)"]["p10_s"] / best_ort
        out[case]["ratio_run_vs_ort_p10"] = ratio
        out[case]["tvm_threads"] = module.threads
        print(
            f"{case}: load {os.getloadavg()[0]:.1f}, shipped database: {out[case]['shipped_database']}, "
            f"TVM threads {out[case]['tvm_threads']}, TVMModel.run / faster onnxruntime (p10, interleaved) {ratio:.2f}x"
        )
        for key, st in timed.items():
            print(f"  {key:<48} p10 {fmt(st['p10_s']):>9}  median {fmt(st['median_s']):>9}")
        for key, st in sorted(nodes.items(), key=lambda kv: -kv[1]["median_us"]):
            p10, median = fmt(st["p10_us"] * 1e-6), fmt(st["median_us"] * 1e-6)
            print(f"  onnxruntime node {key:<37} p10 {p10:>9}  median {median:>9}")
    result = {"bench": "p5_tvm_ops", "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cases": out}
    result["machine"] = {"cpus": os.cpu_count(), "loadavg_after": os.getloadavg()}
    path = Path(__file__).resolve().parent / "results" / "p5_tvm_ops.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


def ship_merged(case: str, source: Path, target: Any) -> None:
    """Merge a tuning database made elsewhere (e.g. a standalone MetaSchedule run) into ``case``'s shipped one."""
    _, model, input_name, shape = _CASES[case]
    base = tvm_runtime._base_digest(model.SerializeToString(), {input_name: shape}, tvm_runtime.resolve_target(target))
    dest = Path(tvm_runtime.__file__).with_name("tuned") / base
    with tempfile.TemporaryDirectory() as d:
        merged = Path(d)
        for name in ("database_workload.json", "database_tuning_record.json"):
            if (dest / name).is_file():
                (merged / name).write_bytes((dest / name).read_bytes())
        added = merge_records(source, merged)
        done = dest / "done.json"  # the budget the compile path tuned with stays what it was
        (merged / "done.json").write_bytes(done.read_bytes() if done.is_file() else b'{"trials": 0, "per_task": null}')
        print(f"merged {added} records from {source}; shipped {ship_database(merged, dest)} records to {dest}")


def parse_target(text: str) -> Any:
    """A target kind name, or the JSON dict form (``{"kind": "llvm", "mcpu": "..."}``)."""
    return json.loads(text) if text.lstrip().startswith("{") else text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trials", nargs="?", type=int, default=64, help="MetaSchedule budget per model and shape")
    parser.add_argument("repeats", nargs="?", type=int, default=11)
    parser.add_argument(
        "--target", type=parse_target, default="host", help='"host" (this CPU exactly), "llvm" or a JSON dict form'
    )
    parser.add_argument("--cases", default="mlp1,mlp1024,cnn1,cnn1024", help="comma-separated subset to run")
    parser.add_argument("--tune-cases", default=None, help="tune only these cases (default: all that run)")
    parser.add_argument(
        "--ship", action="store_true", help="write the tuned databases into mesatee_notebook/ml/tuned/ (best records)"
    )
    parser.add_argument(
        "--ship-from",
        type=Path,
        help="with --cases ONE: merge this MetaSchedule database into that case's shipped one (best per workload)",
    )
    parser.add_argument("--cache", type=Path, help="keep compiled modules here (tuning time then comes from meta)")
    parser.add_argument("--overhead", type=float, default=0.0, help="SECONDS: batch-1 call breakdown only")
    parser.add_argument("--ops", type=float, default=0.0, help="SECONDS: per-kernel times vs onnxruntime's nodes")
    args = parser.parse_args()
    if args.overhead > 0:
        with tempfile.TemporaryDirectory() as d:
            cases = [c for c in args.cases.split(",") if c in ("mlp1", "cnn1")] or ["mlp1", "cnn1"]
            overhead(cases, args.overhead, args.cache or Path(d))
        return
    if args.ship_from is not None:
        ship_merged(args.cases, args.ship_from, args.target)
        return
    if args.ops > 0:
        with tempfile.TemporaryDirectory() as d:
            ops(args.cases.split(","), args.ops, args.cache or Path(d))
        return
    trials, repeats, target = args.trials, args.repeats, args.target
    load_before = os.getloadavg()
    all_cases = _CASES
    chosen = args.cases.split(",")
    tune = set(chosen if args.tune_cases is None else args.tune_cases.split(","))
    target = tvm_runtime.resolve_target(target)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        cache = args.cache or Path(d)
        for case in chosen:
            name, model, input_name, shape = all_cases[case]
            budget = trials if case in tune else 0
            print(f"... {name} {shape}: compiling (tuning {budget} trials)", flush=True)
            rows.append(bench_case(name, model, input_name, shape, cache, budget, repeats, target))
            tune_dir = cache / f"tvm-tune-{rows[-1]['base_digest']}"
            if args.ship and budget > 0 and (tune_dir / "done.json").is_file():
                dest = Path(tvm_runtime.__file__).with_name("tuned") / rows[-1]["base_digest"]
                print(f"    shipped {ship_database(tune_dir, dest)} records to {dest}", flush=True)

    print(f"P5 TVM vs onnxruntime, target {json.dumps(target)}, tuning budget {trials} trials; {os.cpu_count()} cores")
    head = f"{'model':<5} {'batch':>5} {'ort':>10} {'ort thr':>8} {'tvm thr':>8} {'tvm untuned':>12} {'x ort':>7}"
    print(head + f" {'tvm tuned':>10} {'x ort':>7} {'tuning':>8} {'untuned compile':>16} {'cache hit':>10}")
    for r in rows:
        line = (
            f"{r['model']:<5} {r['shape'][0]:>5} {fmt(r['onnxruntime']['median_s']):>10} "
            f"{r['onnxruntime_best'].split()[0]:>8} {r['tvm_threads']:>8} "
            f"{fmt(r['tvm_untuned']['median_s']):>12} {r['ratio_untuned_vs_ort']:>6.2f}x"
        )
        if "tvm_tuned" in r:
            line += f" {fmt(r['tvm_tuned']['median_s']):>10} {r['ratio_tuned_vs_ort']:>6.1f}x {r['tuning_s']:>7.0f}s"
        else:
            line += f" {'-':>10} {'-':>7} {'-':>8}"
        cached = " (hit)" if r["untuned_from_cache"] else ""
        cached += " shipped" if r["untuned_shipped_database"] else ""
        line += f" {r['untuned_compile_s']:>9.2f}s{cached:>6} {r['cache_hit_s'] * 1e3:>8.1f}ms"
        print(line)

    import onnxruntime
    import tvm

    result = {
        "bench": "p5_tvm",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },
        "versions": {"tvm": tvm.__version__, "onnxruntime": onnxruntime.__version__},
        "target": target,
        # unset: each module's meta["threads"] decides (TVM's own default: half the logical CPUs on x86, here 1)
        "tvm_num_threads": os.environ.get("TVM_NUM_THREADS"),
        "tune_trials": trials,
        "cases": rows,
    }
    out = Path(__file__).resolve().parent / "results" / "p5_tvm.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
