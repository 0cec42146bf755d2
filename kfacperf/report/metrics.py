"""Numbers the report shows, read off trace summaries and event tables (no plotting).

Measured numbers come from :func:`kfacperf.trace.summary.summarize`, whose step and stage
times are :mod:`kfacperf.trace.measure`'s, and comparisons with a prediction from
:mod:`kfacperf.trace.compare`, so the report and ``kfacperf validate`` print the same
numbers for the same run: a run's step time is, per kind of step, the median of the slowest
rank's ``step`` row, weighted by the measured mix of kinds; a stage's time is its exclusive
compute time or its collectives' cost, averaged over ranks the same way.  The per-rank
breakdown takes each rank's numbers over the steps by the same statistic
(:func:`kfacperf.trace.measure.over_steps`), so a few stalled steps move neither the
headline nor the breakdown.  Exposed communication is the comm-lane time not covered by
compute.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import pandas as pd

from kfacperf import vocab as stages
from kfacperf.trace.compare import error_pct as compare_error_pct

if TYPE_CHECKING:  # pragma: no cover
    from kfacperf.trace.compare import Comparison
    from kfacperf.trace.summary import TraceSummary


def ordered_stages(names: list[str] | pd.Index) -> list[str]:
    """Stage names in the canonical order of a step; unknown names last, alphabetically."""
    present = {str(n) for n in names}
    known = [s for s in stages.STAGE_NAMES if s in present]
    return known + sorted(present - set(stages.STAGE_NAMES))


def rank_stage_breakdown(summary: TraceSummary) -> pd.DataFrame:
    """Per-step time (µs) of every stage (columns, step order) on every rank (index): the
    rank's stage time (exclusive compute, collective cost;
    :func:`kfacperf.trace.measure.rank_stage_times`) over the measured steps as the step time
    is taken: per kind of step the median, weighted by the measured mix (the summary's
    ``per_step_us``, :func:`kfacperf.trace.measure.over_steps`)."""
    st = summary.stages.assign(stage=summary.stages["stage"].astype(str))
    st = st[st["stage"] != stages.STEP]
    table = st.pivot_table(index="rank", columns="stage", values="per_step_us", aggfunc="sum",
                           fill_value=0.0, observed=True)
    table = table[ordered_stages(list(table.columns))]
    table.columns.name = "stage"
    return table.sort_index()


def rank_table(summary: TraceSummary) -> pd.DataFrame:
    """Per rank (index): step, compute, comm, exposed comm, idle (µs) and overlap (%), each
    over the measured steps as the step time is taken (per kind of step the median, weighted
    by the measured mix; the summary's ``ranks``)."""
    cols = ["step_us", "compute_us", "comm_us", "exposed_comm_us", "overlap_pct", "idle_us"]
    return summary.ranks.set_index("rank")[cols].sort_index()


def pick_step(events: pd.DataFrame, step: int | None = None) -> int:
    """The step a timeline shows: ``step`` if given, else the first with the most stages.

    Stale-statistics runs compute factors and inverses only every few steps; the step with
    the most distinct stages shows all of them.
    """
    steps = sorted(int(s) for s in events["step"].unique())
    if not steps:
        raise ValueError("no events to draw a timeline from")
    if step is not None:
        if step not in steps:
            raise ValueError(f"step {step} is not among the measured steps "
                             f"({steps[0]}..{steps[-1]})")
        return step
    counts = events.assign(stage=events["stage"].astype(str)).groupby("step")["stage"].nunique()
    best = counts.max()
    return int(min(s for s, c in counts.items() if c == best))


def error_pct(predicted: float | None, measured: float | None) -> float:
    """Signed relative error of a prediction in percent (NaN if either is missing or measured 0);
    :func:`kfacperf.trace.compare.error_pct`, so the report and ``kfacperf validate`` agree."""
    if measured is None or predicted is None:
        return math.nan
    return compare_error_pct(predicted, measured)


def stage_comparison(comparison: Comparison) -> pd.DataFrame:
    """The stages of ``comparison`` (measured and predicted µs, error %), the step last."""
    rows = comparison.stages[["stage", "measured_us", "predicted_us", "error_pct"]]
    step = pd.DataFrame([{"stage": stages.STEP, "measured_us": comparison.measured_step_us,
                          "predicted_us": comparison.predicted_step_us,
                          "error_pct": comparison.error_pct}])
    return pd.concat([rows, step], ignore_index=True)
