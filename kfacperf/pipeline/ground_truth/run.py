"""Executing the plan under the time guard: each task's runner, and what became of it.

A task whose estimate would end after the budget is skipped, said so, and the next (smaller)
one is tried; a task that fails is recorded (its traceback in ``logs/errors.log``) and the
next one runs.  Profiles run in this process through the library
(:func:`kfacperf.runtime.runner.profile`, so torch starts once, not once per run), each with
the equivalent ``kfacperf profile`` command in its ``run.json``.
"""
from __future__ import annotations

import contextlib
import gc
import math
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kfacperf.bench.kernels import Budget, write_json
from kfacperf.pipeline.ground_truth.checks import check_problems, run_step_times, trace_checks
from kfacperf.pipeline.ground_truth.estimates import CostGuess
from kfacperf.pipeline.ground_truth.nsys import nvtx_tool, run_nvtx_check
from kfacperf.pipeline.ground_truth.plan import (
    KERNELS,
    NSYS,
    OVERHEAD,
    PROFILE,
    ProfileRun,
    Settings,
    Task,
    overhead_configs,
)


@dataclass
class Outcome:
    """What became of one task."""

    task: Task
    status: str  # "ok", "failed", "skipped"
    estimate_s: float
    wall_s: float = 0.0
    detail: str = ""
    step_ms: dict[str, float] = field(default_factory=dict)  # measured median per kind
    checks: dict[str, Any] = field(default_factory=dict)  # what the trace says it recorded
    result: Any = None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.task.name, "kind": self.task.kind,
                             "tier": self.task.tier, "status": self.status,
                             "estimate_s": round(self.estimate_s, 1),
                             "wall_s": round(self.wall_s, 1), "detail": self.detail,
                             "step_ms": {k: round(v, 3) for k, v in self.step_ms.items()},
                             **self.checks}
        if self.task.run is not None:
            d["run"] = asdict(self.task.run)
        return d


@dataclass(frozen=True, kw_only=True)
class Context:
    """What every task's runner may use."""

    settings: Settings
    out: Path
    budget: Budget
    guess: CostGuess
    log: Callable[[str], None] = print


Runner = Callable[[Outcome, Context], None]
"""Runs ``outcome.task`` and fills in ``outcome`` (status ``ok`` unless it says otherwise);
an exception marks the task failed."""


class ProfileFailed(RuntimeError):
    """A profile run did not complete."""


def run_profile(run: ProfileRun, settings: Settings, out: Path, log_path: Path) -> Any:
    """Profile ``run`` in this process, its trace under ``out`` and its output (progress, the
    per-stage summary, or the traceback) in ``log_path``; the trace."""
    from kfacperf.runtime.runner import profile
    from kfacperf.trace.summary import summarize

    config = run.profile_config(settings, out)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        print(f"$ {config.command}", flush=True)
        try:
            outcome = profile(config, force=True)
        except Exception:
            traceback.print_exc()
            raise
        if outcome.message:
            print(outcome.message, flush=True)
        if not outcome.ok or outcome.trace is None:
            first = (outcome.message or "no trace").splitlines()[0]
            raise ProfileFailed(f"{first} (logs/{log_path.name})")
        print(summarize(outcome.trace).table(), flush=True)
    return outcome.trace


def profile_task(o: Outcome, ctx: Context) -> None:
    """A profile run: its trace checked, its step times taught to the estimates."""
    run = o.task.run
    if run is None:
        raise ValueError(f"task {o.task.name!r} has no profile run")
    t0 = time.monotonic()
    trace = run_profile(run, ctx.settings, ctx.out, ctx.out / "logs" / f"{run.name}.log")
    wall = time.monotonic() - t0
    every, o.step_ms = run_step_times(trace)
    o.checks = trace_checks(trace)
    problems = check_problems(o.checks, gpu=ctx.settings.device == "cuda")
    if problems:
        o.detail = "; ".join(problems)
    ctx.guess.learn(run, every, wall)


def overhead_task(o: Outcome, ctx: Context) -> None:
    """The stage timer's overhead, into ``timer_overhead.json``."""
    from kfacperf.bench.overhead import OUTPUT_FILE, TARGET, measure_timer_overhead

    results = [measure_timer_overhead(c, device=ctx.settings.device)
               for c in overhead_configs(ctx.settings)]
    write_json(ctx.out / OUTPUT_FILE, {"target": TARGET, "results": results})
    o.result = results
    o.detail = "; ".join(f"{r['name']}: {100 * r['overhead_median']:+.2f}% "
                         f"({'meets' if r['meets_target'] else 'misses'} <=1%)" for r in results)


def kernels_task(o: Outcome, ctx: Context) -> None:
    """The kernel timings, at most 1.5x their estimate and never past the budget."""
    import torch

    from kfacperf.bench import kernels

    allowed = min(ctx.budget.left(), 1.5 * o.estimate_s)
    report = kernels.run_all(ctx.out, dry_run=ctx.settings.dry_run, budget_s=allowed,
                             device=torch.device(ctx.settings.device), log=ctx.log)
    o.result = report
    o.detail = (f"{len(report.eigh)} eigh, {len(report.cholesky)} cholesky, "
                f"{len(report.factors)} factor, {len(report.gemm)} gemm record(s); "
                f"{len(report.skipped)} skipped")
    (ctx.out / "kernels.txt").write_text("\n".join(kernels.summary_lines(report)) + "\n")


def nvtx_check_task(o: Outcome, ctx: Context) -> None:
    """The NVTX check under Nsight Systems or Nsight Compute."""
    left = ctx.budget.left()
    o.detail = run_nvtx_check(ctx.settings, ctx.out, ctx.out / "logs" / "nvtx-check.log",
                              timeout_s=max(10.0, left) if math.isfinite(left) else None)


RUNNERS: Mapping[str, Runner] = {PROFILE: profile_task, OVERHEAD: overhead_task,
                                 KERNELS: kernels_task, NSYS: nvtx_check_task}


KERNELS_MIN_S = 30.0
"""The kernel timings run whenever this much is left, even below their estimate: they cut
themselves to the time given (smallest sizes first), and they are the inverse cost's other
source when slow inverses have used up the time of the 1/1 profiles."""

ALIKE_FAILURES = 2
"""Profile runs failing alike in a row after which the other profile runs are skipped: a
fault common to them all would otherwise spend the device's time on every one of them."""


def common_failure(outcomes: Sequence[Outcome]) -> str:
    """The failure of the last :data:`ALIKE_FAILURES` profile runs that ran, if they all
    failed alike (empty otherwise)."""
    ran = [o for o in outcomes if o.task.kind == PROFILE and o.status != "skipped"]
    last = ran[-ALIKE_FAILURES:]
    if len(last) < ALIKE_FAILURES or any(o.status != "failed" for o in last):
        return ""
    causes = {o.detail.split(" (logs/")[0] for o in last}
    return causes.pop() if len(causes) == 1 else ""


def skip_reason(task: Task, estimate_s: float, budget: Budget,
                outcomes: Sequence[Outcome] = ()) -> str:
    """Why ``task`` is not run (empty: it is): no NVTX tool here, profile runs failing alike,
    or the time guard."""
    if task.kind == NSYS and nvtx_tool() is None:
        return "neither nsys nor ncu is installed here"
    if task.kind == PROFILE:
        cause = common_failure(outcomes)
        if cause:
            return f"the last {ALIKE_FAILURES} profile runs failed alike: {cause}"
    need = min(estimate_s, KERNELS_MIN_S) if task.kind == KERNELS else estimate_s
    if not budget.allows(need):
        return (f"time guard: needs ~{need:.0f} s, "
                f"{max(0.0, budget.left()):.0f} s left")
    return ""


def execute(plan: Sequence[Task], ctx: Context, *,
            after_each: Callable[[list[Outcome]], object] | None = None,
            runners: Mapping[str, Runner] = RUNNERS) -> list[Outcome]:
    """Run the plan under the time guard; every task's outcome, in plan order.
    ``after_each`` gets the outcomes so far after every task (to keep a summary on disk);
    should it raise, that is said and the next task runs all the same."""
    outcomes: list[Outcome] = []
    for i, task in enumerate(plan, 1):
        est = ctx.guess.task_s(task)
        head = f"[{i}/{len(plan)}] {task.name}"
        why = skip_reason(task, est, ctx.budget, outcomes)
        if why:
            outcomes.append(Outcome(task=task, status="skipped", estimate_s=est, detail=why))
            ctx.log(f"{head}: skipped ({why})")
        else:
            o = _run_one(task, est, ctx, runners[task.kind])
            outcomes.append(o)
            ctx.log(f"{head}: {_progress(o, ctx.budget)}")
        if after_each is not None:
            try:
                after_each(outcomes)
            except Exception as exc:  # keeping the summary never costs the measurements
                ctx.log(f"  keeping the summary failed ({type(exc).__name__}: {exc}); "
                        "the tasks go on")
    return outcomes


def _run_one(task: Task, estimate_s: float, ctx: Context, runner: Runner) -> Outcome:
    o = Outcome(task=task, status="ok", estimate_s=estimate_s)
    t0 = time.monotonic()
    try:
        runner(o, ctx)
    except Exception as exc:  # one task failing does not stop the others
        o.status, o.detail = "failed", f"{type(exc).__name__}: {exc}"
        with open(ctx.out / "logs" / "errors.log", "a") as f:
            f.write(f"--- {task.name}\n{traceback.format_exc()}\n")
    o.wall_s = time.monotonic() - t0
    _free_device_memory()
    return o


def _progress(o: Outcome, budget: Budget) -> str:
    steps = "  ".join(f"{k} {v:.1f} ms" for k, v in o.step_ms.items())
    left = budget.left()
    return (f"{o.status} in {o.wall_s:.1f} s (estimated {o.estimate_s:.0f} s"
            + (f"; {max(0.0, left):.0f} s left)" if math.isfinite(left) else ")")
            + (f"  {steps}" if steps else "") + (f"  {o.detail}" if o.detail else ""))


def _free_device_memory() -> None:
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
