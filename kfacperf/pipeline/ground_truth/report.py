"""What the driver prints and writes about the plan: the plan with its estimates
(``plan.txt``) and the summary of the tasks (``summary.txt``, ``summary.json``), kept
current after every task so that a run stopped from outside still says what it did."""
from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kfacperf.bench.kernels import write_json
from kfacperf.pipeline.ground_truth.estimates import CostGuess
from kfacperf.pipeline.ground_truth.plan import Task
from kfacperf.pipeline.ground_truth.run import Outcome

STATUSES = ("ok", "failed", "skipped")


def plan_text(plan: Sequence[Task], guess: CostGuess, budget_s: float | None) -> str:
    """The plan, one task a line, with its estimate and the running total."""
    lines = [f"{'#':>3}  {'tier':>4}  {'task':<40} {'steps':>14} {'est s':>7} {'cum s':>7}"]
    cum = 0.0
    for i, t in enumerate(plan, 1):
        est = guess.task_s(t)
        cum += est
        steps = f"{t.run.warmup}+{t.run.steps}" if t.run else ""
        lines.append(f"{i:>3}  {t.tier:>4}  {t.name:<40} {steps:>14} {est:>7.0f} {cum:>7.0f}")
    lines.append(f"estimated total {cum:.0f} s" + (
        f" against a budget of {budget_s:.0f} s: the time guard skips what does not fit"
        if budget_s is not None and math.isfinite(budget_s) else ""))
    return "\n".join(lines)


def summary_text(outcomes: Sequence[Outcome]) -> str:
    """The table printed at the end: per task its status, wall time against its estimate,
    median step time per kind, images per second and the median share of the step that no
    stage accounts for (:mod:`kfacperf.trace.coverage`)."""
    head = ["task", "status", "wall s", "est s", "plain ms", "factor ms", "inverse ms",
            "img/s", "gap %", "note"]
    rows = [head]
    for o in outcomes:
        run = o.task.run
        plain = o.step_ms.get("plain")
        rate = f"{run.batch / (plain / 1e3):.0f}" if run is not None and plain else ""
        gap = (o.checks.get("coverage") or {}).get("median_gap_pct")
        rows.append([o.task.name, o.status, f"{o.wall_s:.1f}", f"{o.estimate_s:.0f}",
                     _num(o.step_ms.get("plain")), _num(o.step_ms.get("factor")),
                     _num(o.step_ms.get("inverse")), rate, _num(gap), o.detail])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head) - 1)]
    lines = []
    for r in rows:
        cells = [c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells + [r[-1]]).rstrip())
    counts = {s: sum(o.status == s for o in outcomes) for s in STATUSES}
    lines.append(f"{counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} skipped")
    skipped = [o for o in outcomes if o.status == "skipped"]
    if skipped:
        lines.append("skipped: " + ", ".join(o.task.name for o in skipped))
    return "\n".join(lines)


def _num(v: float | None) -> str:
    return "" if v is None else f"{v:.1f}"


def write_summary(out: Path, plan: Sequence[Task], outcomes: Sequence[Outcome], *,
                  guess: CostGuess, budget_s: float | None, dry_run: bool) -> str:
    """``summary.txt`` and ``summary.json`` of the tasks so far; the text."""
    done = {o.task.name for o in outcomes}
    pending = [t.name for t in plan if t.name not in done]
    summary = summary_text(outcomes) + (
        f"\nnot reached: {', '.join(pending)}" if pending else "")
    (out / "summary.txt").write_text(summary + "\n")
    data: dict[str, Any] = {
        "budget_s": budget_s, "dry_run": dry_run, "finished": not pending,
        "tasks": [o.to_json() for o in outcomes], "not_reached": pending,
        "learned_step_ratios": {k: statistics.median(v) for k, v in guess.ratios.items() if v},
    }
    write_json(out / "summary.json", data)
    return summary
