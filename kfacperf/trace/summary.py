"""Summaries of a trace: per-stage statistics, step time, exposed communication, overlap,
stragglers, and the K-FAC overhead over an SGD baseline.

Definitions (all over the measured steps, i.e. after warm-up):

* The run's step time (``step_us``, what the overhead over SGD divides) is the one of
  :mod:`kfacperf.trace.measure`: a step's time is the slowest rank's ``step`` row (without
  one, the span of the rank's rows); per kind of step (inverse, factor, plain) the median
  over the measured steps of that kind, weighted by the kind's number of steps.  The mean,
  median and p95 over all measured steps are shown next to it.
* A stage's time in a step on a rank is as :func:`kfacperf.trace.measure.rank_stage_times`
  defines it (every layer summed): compute exclusive of the stages nested inside it, a
  collective its cost from the last member's start to the last completion.
  ``mean_us``/``median_us``/``p95_us`` are over the steps in which the stage ran (``count``
  of them); ``per_step_us`` is the rank's time in the stage over every measured step as the
  step time is taken (:func:`kfacperf.trace.measure.over_steps`: per kind of step the
  median, a step without the stage counting 0, weighted by the mix), so an inverse every
  10 steps shows a tenth of its cost and a few stalled steps do not show at all.
* Communication of a rank in a step (``comm_us``): the length of the union of its comm-lane
  intervals, so the time it waited in a collective for its peers counts (the stage rows
  count a collective's cost alone).  Exposed communication: that minus the part of it
  covered by the union of its compute-lane intervals (the ``step`` row excluded) in the
  same step.
* ``idle_us`` = step time minus the union of all compute and comm intervals.
* Per rank (``ranks``): each of these per-step numbers over the measured steps as
  ``per_step_us`` takes them (the rank's step time too); ``overlap_pct`` = (comm - exposed)
  / comm * 100 of those.  The run's ``comm_us`` and ``exposed_comm_us`` are the means over
  ranks of the ranks', its ``overlap_pct`` is from those.

This module never imports torch.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kfacperf.trace.intervals import intersection_length, merge_intervals, total_length
from kfacperf.trace.measure import (
    Measured,
    measure_events,
    measured_events,
    no_measured_steps,
    over_steps,
    rank_stage_times,
    rank_step_times,
    step_kinds,
)
from kfacperf.trace.missing import incomplete_note
from kfacperf.trace.schema import TraceError
from kfacperf.trace.store import Trace, load_trace
from kfacperf.vocab import COMM, COMPUTE, ORDER, SGD, STEP

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

@dataclass(frozen=True, kw_only=True)
class TraceSummary:
    """The numbers :func:`summarize` computes; ``table()`` renders them as text."""

    run: dict[str, Any]
    completed: bool
    measured_steps: int
    stages: pd.DataFrame  # stage, rank, count, mean_us, median_us, p95_us, per_step_us
    per_step: pd.DataFrame  # rank, step, step_us, compute_us, comm_us, exposed_comm_us, ...
    ranks: pd.DataFrame  # per rank: the per_step columns over the measured steps (over_steps)
    slowest: pd.DataFrame  # stage, slowest_rank, slowest_us, median_us, imbalance
    measured: Measured  # kfacperf.trace.measure: step and stage times per kind of step
    step_us: float  # the run's step time (measured.step_time)
    step_mean_us: float  # over all measured steps of the slowest rank's step time
    step_median_us: float
    step_p95_us: float
    exposed_comm_us: float  # mean over ranks of ranks["exposed_comm_us"]
    comm_us: float
    overlap_pct: float
    baseline_step_us: float | None = None
    kfac_overhead: float | None = None
    lacking: str = ""  # what the trace lacks (kfacperf.trace.measure.incomplete_note), or ""

    def table(self) -> str:
        """A plain-text table: one line per stage, then step-level figures."""
        lines = [
            f"{'stage':<16}{'per step ms':>12}{'mean ms':>10}{'median ms':>11}{'p95 ms':>10}"
            f"{'count':>7}  slowest rank (x median)"
        ]
        agg = self.stages.groupby("stage", observed=True, sort=False).agg(
            per_step_us=("per_step_us", "mean"), mean_us=("mean_us", "mean"),
            median_us=("median_us", "mean"), p95_us=("p95_us", "max"), count=("count", "max"),
        )
        slow = self.slowest.set_index("stage")
        for stage in sorted(agg.index, key=lambda s: ORDER.get(s, 99)):
            r = agg.loc[stage]
            s = slow.loc[stage] if stage in slow.index else None
            slow_txt = "" if s is None else f"{int(s['slowest_rank'])} ({s['imbalance']:.2f}x)"
            lines.append(
                f"{stage:<16}{r.per_step_us / 1e3:>12.3f}{r.mean_us / 1e3:>10.3f}"
                f"{r.median_us / 1e3:>11.3f}{r.p95_us / 1e3:>10.3f}{int(r['count']):>7}  {slow_txt}"
            )
        lines.append("")
        mix = ", ".join(f"{n} {kind}" for kind, n in self.measured.kinds.items())
        lines.append(f"step time: {self.step_us / 1e3:.3f} ms (the median of each kind of step, "
                     f"weighted by the mix: {mix})")
        lines.append(
            f"all {self.measured_steps} measured steps: mean {self.step_mean_us / 1e3:.3f} ms, "
            f"median {self.step_median_us / 1e3:.3f} ms, p95 {self.step_p95_us / 1e3:.3f} ms"
        )
        lines.append(
            f"time in collectives per rank (waits for peers included, unlike the stage rows): "
            f"{self.comm_us / 1e3:.3f} ms/step, exposed {self.exposed_comm_us / 1e3:.3f} "
            f"ms/step, overlap {_pct(self.overlap_pct)}"
        )
        if self.kfac_overhead is not None:
            lines.append(
                f"overhead over SGD: {self.kfac_overhead:.3f}x (baseline step "
                f"{(self.baseline_step_us or 0) / 1e3:.3f} ms)"
            )
        if not self.completed or self.lacking:
            lines.append("run INCOMPLETE: summary of the steps that every rank finished"
                         + (f" ({self.lacking})" if self.lacking else ""))
        return "\n".join(lines)


def _pct(v: float) -> str:
    return "n/a" if math.isnan(v) else f"{v:.1f}%"


def _per_step_table(events: pd.DataFrame) -> pd.DataFrame:
    import pandas as pd

    step_of = rank_step_times(events).to_dict()
    rows = []
    for (rank, step), g in events.groupby(["rank", "step"], observed=True, sort=True):
        stage = g["stage"].astype(str).to_numpy()
        lane = g["lane"].astype(str).to_numpy()
        start = g["start_us"].to_numpy()
        end = start + g["dur_us"].to_numpy()
        is_step = stage == STEP
        comp = merge_intervals(start[(lane == COMPUTE) & ~is_step],
                               end[(lane == COMPUTE) & ~is_step])
        comm = merge_intervals(start[lane == COMM], end[lane == COMM])
        step_us = float(step_of[(rank, step)])
        comm_len = total_length(comm)
        covered = intersection_length(comm, comp)
        busy = merge_intervals(start[~is_step], end[~is_step])
        rows.append({
            "rank": int(rank), "step": int(step), "step_us": step_us,
            "compute_us": total_length(comp), "comm_us": comm_len,
            "exposed_comm_us": comm_len - covered,
            "overlap_pct": 100.0 * covered / comm_len if comm_len > 0 else math.nan,
            "idle_us": max(0.0, step_us - total_length(busy)),
        })
    cols = ["rank", "step", "step_us", "compute_us", "comm_us", "exposed_comm_us",
            "overlap_pct", "idle_us"]
    return pd.DataFrame(rows, columns=cols)


_PER_STEP_COLS = ["step_us", "compute_us", "comm_us", "exposed_comm_us", "idle_us"]


def _per_rank(table: pd.DataFrame, kinds: pd.Series, *, fill: float) -> pd.DataFrame:
    """Per rank (index): each column of ``table`` (indexed by rank and step) over the measured
    steps (those of ``kinds``) as :func:`kfacperf.trace.measure.over_steps` takes it; a step
    without a row of the rank counts ``fill`` (NaN: left out)."""
    import pandas as pd

    rows = {int(rank): over_steps(g.droplevel("rank").reindex(kinds.index, fill_value=fill),
                                  kinds)
            for rank, g in table.groupby(level="rank")}
    return pd.DataFrame.from_dict(rows, orient="index", columns=list(table.columns))


def _rank_table(per_step: pd.DataFrame, kinds: pd.Series) -> pd.DataFrame:
    """Per rank: the per-step numbers over the measured steps (:func:`_per_rank`), and the
    share of the communication hidden under compute of those."""
    out = _per_rank(per_step.set_index(["rank", "step"])[_PER_STEP_COLS], kinds, fill=math.nan)
    hidden = out["comm_us"] - out["exposed_comm_us"]
    out["overlap_pct"] = (100.0 * hidden / out["comm_us"]).where(out["comm_us"] > 0)
    out.index.name = "rank"
    return out.reset_index()[["rank", *_PER_STEP_COLS[:4], "overlap_pct", "idle_us"]]


def _stage_table(events: pd.DataFrame, kinds: pd.Series) -> pd.DataFrame:
    import pandas as pd

    totals = rank_stage_times(events).groupby(["stage", "rank", "step"])["dur_us"].sum()
    g = totals.groupby(level=["stage", "rank"])
    out = pd.DataFrame({
        "count": g.size(),
        "mean_us": g.mean(),
        "median_us": g.median(),
        "p95_us": g.quantile(0.95),
    })
    per_step = _per_rank(totals.unstack("stage", fill_value=0.0), kinds, fill=0.0)
    out["per_step_us"] = per_step.stack().swaplevel().reindex(out.index) if len(out) else 0.0
    out = out.reset_index()
    out["stage"] = out["stage"].astype(str)
    out["order"] = out["stage"].map(ORDER)
    return out.sort_values(["order", "rank"]).drop(columns="order").reset_index(drop=True)


def _slowest(stages: pd.DataFrame) -> pd.DataFrame:
    import pandas as pd

    rows = []
    for stage, g in stages.groupby("stage", sort=False):
        i = g["per_step_us"].idxmax()
        med = float(g["per_step_us"].median())
        rows.append({
            "stage": stage, "slowest_rank": int(g.loc[i, "rank"]),
            "slowest_us": float(g.loc[i, "per_step_us"]), "median_us": med,
            "imbalance": float(g.loc[i, "per_step_us"]) / med if med > 0 else math.nan,
        })
    return pd.DataFrame(rows, columns=["stage", "slowest_rank", "slowest_us", "median_us",
                                       "imbalance"])


def summarize(trace: Trace | str | os.PathLike[str],
              baseline: Trace | str | os.PathLike[str] | None = None) -> TraceSummary:
    """Summarize ``trace`` (its measured steps); with ``baseline`` (an SGD run of the same
    workload, world size and batch) also the overhead ``step_us / baseline step_us``.  Each
    is a :class:`~kfacperf.trace.store.Trace` or a trace directory
    (:func:`~kfacperf.trace.store.load_trace` loads it)."""
    import numpy as np

    if isinstance(trace, (str, os.PathLike)):
        trace = load_trace(trace)
    if isinstance(baseline, (str, os.PathLike)):
        baseline = load_trace(baseline)
    events = measured_events(trace)
    if events.empty:
        raise TraceError(no_measured_steps(trace, str(trace.path)))
    steps = sorted(events["step"].unique())
    try:
        measured = measure_events(events, trace.run, label=str(trace.path))
    except ValueError as exc:
        raise TraceError(str(exc)) from None
    per_step = _per_step_table(events)
    kinds = step_kinds(steps, trace.run)
    stages = _stage_table(events, kinds)
    ranks = _rank_table(per_step, kinds)
    comm_us = float(ranks["comm_us"].mean())
    exposed_us = float(ranks["exposed_comm_us"].mean())
    step_times = per_step.groupby("step")["step_us"].max().to_numpy()
    baseline_us = overhead = None
    step_us = measured.step_time
    if baseline is not None:
        _check_comparable(trace, baseline)
        baseline_us = summarize(baseline).step_us
        overhead = step_us / baseline_us if baseline_us > 0 else math.nan
    return TraceSummary(
        run=trace.run,
        completed=trace.completed,
        measured_steps=len(steps),
        stages=stages,
        per_step=per_step,
        ranks=ranks,
        slowest=_slowest(stages),
        measured=measured,
        step_us=step_us,
        step_mean_us=float(step_times.mean()),
        step_median_us=float(np.median(step_times)),
        step_p95_us=float(np.quantile(step_times, 0.95)),
        exposed_comm_us=exposed_us,
        comm_us=comm_us,
        overlap_pct=100.0 * (comm_us - exposed_us) / comm_us if comm_us > 0 else math.nan,
        baseline_step_us=baseline_us,
        kfac_overhead=overhead,
        lacking=incomplete_note(trace, str(trace.path)),
    )


def _check_comparable(trace: Trace, baseline: Trace) -> None:
    check_baseline(baseline, trace.run, what=str(trace.path))


def check_baseline(baseline: Trace, run: dict[str, Any], *, what: str = "this run") -> None:
    """Raise a TraceError unless ``baseline`` is an SGD run of ``run``'s workload, world size
    and batch per rank (each compared where both say it): what the overhead over SGD needs.
    ``kfacperf profile --baseline`` checks it before launching as well as after."""
    for key in ("workload", "world_size", "batch_per_rank"):
        a, b = run.get(key), baseline.run.get(key)
        if a is not None and b is not None and a != b:
            raise TraceError(
                f"baseline {baseline.path} has {key}={b!r} but {what} has {key}={a!r}; "
                "the overhead over SGD compares runs of the same workload, world size and batch"
            )
    opt = baseline.run.get("optimizer")
    if opt is not None and opt != SGD:
        raise TraceError(f"baseline {baseline.path} ran optimizer {opt!r}, expected 'sgd'")
