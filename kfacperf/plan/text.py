"""A plan as text: the best SGD and K-FAC configuration per GPU count side by side, and the
Pareto front of time to solution against GPU-hours (what ``kfacperf plan`` prints)."""
from __future__ import annotations

import math
from collections.abc import Sequence

from kfacperf import vocab as S
from kfacperf.plan.result import OPTIMIZER_NAMES, Choice, PlanResult


def fmt_gpu_hours(hours: float) -> str:
    """GPU-hours with a thousands separator; three significant figures below 1."""
    return f"{hours:.3g}" if 0 < hours < 1 else f"{hours:,.1f}"


def fmt_duration(seconds: float) -> str:
    """Seconds as s, min, h or d, whichever reads best."""
    if not math.isfinite(seconds):
        return "-"
    if seconds < 10:
        return f"{seconds:.3g} s"  # three figures: a toy run is not "0 s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def comm_text(c: Choice) -> str:
    """Factor precision and packing (and bucket size), or '-' where nothing is communicated."""
    if c.comm_dtype is None:
        return "-"
    return c.comm_dtype + (" sym" if c.symmetric else "")


def config_text(c: Choice, *, buckets: bool = False) -> str:
    """One configuration in a few words: ``spngd b32 12/12 fp16 sym``."""
    parts = [c.label, f"b{c.batch_per_gpu}"]
    if c.factor_interval is not None:
        parts += [c.intervals, comm_text(c)]
    if buckets and c.bucket_mb is not None:
        parts.append(f"{c.bucket_mb:g}MB")
    return " ".join(p for p in parts if p != "-")


def _steps(c: Choice) -> str:
    return f"{c.steps:,.0f}" + ("*" if c.extrapolated else "")


def _table(rows: Sequence[Sequence[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(v.rjust(w) if i in right else v.ljust(w)
                      for i, (v, w) in enumerate(zip(r, widths))).rstrip() for r in rows]


def _header(result: PlanResult) -> list[str]:
    i, s = result.inputs, result.stats
    lines = [f"plan: {i['workload']} on {i['device']} / {i['cluster']}, "
             f"{i['memory_GB']:g} GB per GPU ({i['memory_fraction']:.0%} usable), "
             f"{i['dtype']} compute, {i['inverse_method']} inverses"]
    for n, (opt, conv) in enumerate(result.convergence.items()):
        lo, hi = conv["batch_range"]
        head = "convergence: " if n == 0 else "             "
        lines.append(f"{head}{OPTIMIZER_NAMES.get(opt, opt)} {conv['name']} ({conv['target']}; "
                     f"measured at global batch {lo:,} to {hi:,})")
    lines.append(
        f"searched {s['configurations']:,} configurations at {len(result.space['gpus'])} GPU "
        f"count(s) in {s['seconds']:.1f} s: {s['identical']:,} identical to another, "
        f"{s['over_memory']:,} over memory, {s['beyond_data']:,} beyond the convergence data, "
        f"{s['bounded']:,} bounded out, {s['evaluated']:,} evaluated "
        f"({s['simulated_steps']:,} steps simulated)")
    return lines


def best_table(result: PlanResult) -> list[str]:
    """Per GPU count: the best SGD and the best K-FAC configuration, and their time ratio."""
    buckets = len(result.space.get("bucket_mb", [])) > 1
    head = ["GPUs", "SGD", "step ms", "steps", "time", "GPU-h", "|", "K-FAC", "step ms",
            "steps", "time", "GPU-h", "|", "K-FAC/SGD"]
    rows = [head]
    for g in result.gpus:
        sgd, kfac = result.best(g, S.SGD), result.best(g, S.KFAC)
        row = [f"{g:,}"]
        for c in (sgd, kfac):
            if c is None:
                row += ["-", "", "", "", "", "|"]
            else:
                row += [config_text(c, buckets=buckets), f"{c.step_us / 1e3:,.1f}", _steps(c),
                        fmt_duration(c.time_s), fmt_gpu_hours(c.gpu_hours), "|"]
        row.append(f"{kfac.time_s / sgd.time_s:.2f}x" if sgd and kfac else "-")
        rows.append(row)
    if S.KFAC not in result.convergence:  # one optimizer: its columns alone
        rows = [r[:6] for r in rows]
    elif S.SGD not in result.convergence:
        rows = [[r[0]] + r[7:12] for r in rows]
    return _table(rows, right={0, 2, 3, 4, 5, 8, 9, 10, 11, 13})


def pareto_table(result: PlanResult) -> list[str]:
    rows = [["GPUs", "optimizer", "configuration", "time", "GPU-h"]]
    for c in result.pareto():
        rows.append([f"{c.gpus:,}", OPTIMIZER_NAMES[c.optimizer], config_text(c),
                     fmt_duration(c.time_s), fmt_gpu_hours(c.gpu_hours)])
    return _table(rows, right={0, 3, 4})


def format_plan(result: PlanResult) -> str:
    lines = _header(result)
    lines += ["", "best configuration per GPU count (time to the target; * steps extrapolated "
                  "beyond the convergence data):"]
    lines += ["  " + ln for ln in best_table(result)]
    for m in result.missing:
        lines.append(f"  no {OPTIMIZER_NAMES.get(m['optimizer'], m['optimizer'])} configuration "
                     f"at {m['gpus']:,} GPUs: {m['reason']}")
    front = result.pareto()
    if front:
        lines += ["", "Pareto front, time to solution against GPU-hours (each the fastest at its "
                      "GPU count):"]
        lines += ["  " + ln for ln in pareto_table(result)]
    targets = {c["target"] for c in result.convergence.values()}
    if len(targets) > 1:
        lines += ["", "note: the convergence models reach different targets, so SGD and K-FAC "
                      "times are to different qualities"]
    return "\n".join(lines)
