"""Which MetaSchedule tasks a tuning budget goes to, and the tuning run itself (child side of ``tvm_runtime``).

MetaSchedule's gradient task scheduler first gives every task one round of ``num_trials_per_iter``
trials, in extraction order. On the CNN at batch 1 that order is softmax, reshape, mean, matmul, conv,
max-pool, conv: a 24-trial budget (session 4) went to the first three and never reached either
convolution, which were then 95% of the run time (docs/benchmarks.md, P5). Here the budget goes only to
the tasks that carry the work: those with at least :data:`MIN_FLOP_SHARE` of the model's estimated
floating-point operations (``tvm.s_tir.analysis.estimate_tir_flops``), the largest always. The other
tasks keep TVM's default lowering (a records database can still hold schedules for them from earlier
runs; they are applied too).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["GENERATIONS", "MIN_FLOP_SHARE", "POPULATION", "TASK_POLICY", "TaskChoice", "choose_tasks", "tune_chosen"]

MIN_FLOP_SHARE = 0.05
"""A task is tuned when its estimated FLOPs are at least this share of all tasks' (weighted by use count)."""

POPULATION, GENERATIONS = 128, 2
"""Evolutionary search per round: MetaSchedule's default (512 candidates, 4 generations) spent about a minute
per generation on the CNN's conv at load 8 on 2 cores, four minutes of search per round before one measurement;
this spends ~5 s (docs/benchmarks.md, P5)."""

TASK_POLICY = f"tasks with >= {MIN_FLOP_SHARE:g} of the FLOPs; search {POPULATION}x{GENERATIONS}"
"""Names the selection and search; part of a tuned module's cache key, so a change of policy tunes again."""


@dataclass(frozen=True)
class TaskChoice:
    """One extracted task: its name, estimated FLOPs per call, how often the graph calls it, whether tuned."""

    name: str
    flops: float
    weight: int
    tuned: bool

    def to_json(self) -> dict[str, Any]:
        """Plain form for progress events and ``meta.json``."""
        return {"task": self.name, "flops": self.flops, "weight": self.weight, "tuned": self.tuned}


def _flops(task: Any) -> float:
    from tvm.s_tir.analysis import estimate_tir_flops

    try:
        return float(estimate_tir_flops(task.dispatched[0]))
    except Exception:
        return 0.0


def choose_tasks(tasks: Sequence[Any], min_share: float = MIN_FLOP_SHARE) -> list[TaskChoice]:
    """Mark the tasks worth tuning: FLOPs x weight at least ``min_share`` of the total, and the largest."""
    work = [(t, _flops(t), int(t.weight)) for t in tasks]
    total = sum(f * w for _, f, w in work)
    largest = max((f * w for _, f, w in work), default=0.0)
    return [
        TaskChoice(str(t.task_name), f, w, total > 0 and (f * w >= min_share * total or f * w == largest))
        for t, f, w in work
    ]


def _x86_intrinsics_only() -> None:
    """Register only TVM's x86 tensor intrinsics, which an x86 ``llvm`` target's schedule rules look up.

    ``TuneContext`` imports ``tvm.s_tir.tensor_intrin``, which parses every intrinsic TVM has (CUDA, ROCm, Metal,
    Arm, Hexagon, RISC-V: over 4,000 lines of TVMScript, each ``prim_func`` walking ``inspect.stack()``): 56 s
    at load 1.5 and over 3 minutes at load 10-25 here, before a single trial. Float models on x86 use none of
    them; the x86 ones (VNNI/AVX-512 int8 dot products) are registered because the AVX-512 rules name them.
    Skipped for any other target (TVM's own import then runs), and when the package is already imported.
    """
    import importlib
    import importlib.util
    import sys
    import types

    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.submodule_search_locations is None:
        return
    package = types.ModuleType(name, "TVM's tensor intrinsics: x86 only (mesatee_notebook.ml.tvm_tune)")
    package.__path__ = list(spec.submodule_search_locations)
    package.__package__ = name
    sys.modules[name] = package
    try:
        importlib.import_module(f"{name}.x86")
    except BaseException:
        del sys.modules[name]
        raise


def _is_x86_llvm(target: Any) -> bool:
    """An ``llvm`` target for this x86-64 host (no other ``mtriple``)."""
    import platform

    triple = str(target.attrs.get("mtriple", "") or "")
    return str(target.kind.name) == "llvm" and platform.machine() in ("x86_64", "AMD64") and triple[:3] in ("", "x86")


def tune_chosen(
    mod: Any,
    target: Any,
    work_dir: str,
    *,
    budget: int,
    per_task: int | None,
    builder: Any,
    callbacks: Sequence[Any],
    emit: Callable[[dict[str, Any]], None],
) -> None:
    """Extract ``mod``'s tasks, tune the chosen ones with ``budget`` trials; records land in ``work_dir``.

    ``num_trials_per_iter`` is a quarter of the per-task share (8 to 64), so every chosen task gets
    several rounds of the evolutionary search rather than one.
    """
    from tvm.s_tir import meta_schedule as ms

    if _is_x86_llvm(target):
        _x86_intrinsics_only()
    extracted = list(ms.relax_integration.extract_tasks(mod, target))
    choices = choose_tasks(extracted)
    emit({"event": "phase", "phase": "tasks", "tasks": [c.to_json() for c in choices], "policy": TASK_POLICY})
    chosen = [t for t, c in zip(extracted, choices, strict=True) if c.tuned]
    if not chosen:  # nothing with FLOPs (a pure reshape model): tune everything, as MetaSchedule would
        chosen = extracted
    strategy = ms.search_strategy.EvolutionarySearch(population_size=POPULATION, genetic_num_iters=GENERATIONS)
    contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
        chosen, work_dir, strategy=strategy, seed=0
    )
    share = budget // max(1, len(contexts))
    ms.tune.tune_tasks(
        tasks=contexts,
        task_weights=weights,
        work_dir=work_dir,
        max_trials_global=budget,
        max_trials_per_task=per_task,
        num_trials_per_iter=min(64, max(8, share // 4)),
        builder=builder,
        measure_callbacks=list(callbacks),
    )
