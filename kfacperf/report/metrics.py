"""Numbers the report shows, read off trace summaries and event tables (no plotting).

Measured numbers come from :func:`kfacperf.trace.store.summarize` (so the report, the CLI and
validation agree): a step's time is the slowest rank's ``step`` row, a run's step time the
mean over its measured steps, a stage's time its per-step mean on one rank, and exposed
communication the comm-lane time not covered by compute.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import pandas as pd

from kfacperf import vocab as stages
from kfacperf.validation import error_pct as validation_error_pct

if TYPE_CHECKING:  # pragma: no cover
    from kfacperf.trace.summary import TraceSummary


def ordered_stages(names: list[str] | pd.Index) -> list[str]:
    """Stage names in the canonical order of a step; unknown names last, alphabetically."""
    present = {str(n) for n in names}
    known = [s for s in stages.STAGE_NAMES if s in present]
    return known + sorted(present - set(stages.STAGE_NAMES))


def rank_stage_breakdown(summary: TraceSummary) -> pd.DataFrame:
    """Per-step time (µs) of every stage (columns, step order) on every rank (index)."""
    st = summary.stages.assign(stage=summary.stages["stage"].astype(str))
    st = st[st["stage"] != stages.STEP]
    table = st.pivot_table(index="rank", columns="stage", values="per_step_us", aggfunc="sum",
                           fill_value=0.0, observed=True)
    table = table[ordered_stages(list(table.columns))]
    table.columns.name = "stage"
    return table.sort_index()


def rank_table(summary: TraceSummary) -> pd.DataFrame:
    """Per rank (index): mean step, compute, comm, exposed comm (µs) and overlap (%)."""
    cols = ["step_us", "compute_us", "comm_us", "exposed_comm_us", "overlap_pct", "idle_us"]
    return summary.ranks.set_index("rank")[cols].sort_index()


def critical_rank(summary: TraceSummary) -> int:
    """The rank with the most compute per step (the lowest such rank on ties).

    Every rank's step ends at the same collective, so step rows hardly tell ranks apart; a
    rank that waits for others shows long communication instead.  The rank with the most
    compute is the one the others wait for (an SP-NGD layer owner inverting its factors), the
    measured counterpart of the simulator's slowest representative rank.
    """
    per_rank = summary.ranks.set_index("rank")["compute_us"].sort_index()
    return int(per_rank.idxmax())


def stage_totals(summary: TraceSummary, rank: int) -> pd.Series:
    """Per-step time (µs) of each stage on ``rank`` (``step`` excluded), indexed by stage."""
    breakdown = rank_stage_breakdown(summary)
    if rank not in breakdown.index:
        return pd.Series(dtype=float)
    return breakdown.loc[rank]


def layer_times(events: pd.DataFrame, rank: int, n_steps: int) -> pd.Series:
    """Per-step time (µs) of each per-layer stage on ``rank``, indexed by (stage, layer)."""
    ev = events[events["rank"] == rank]
    ev = ev.assign(stage=ev["stage"].astype(str), layer=ev["layer"].astype(str))
    ev = ev[ev["layer"] != ""]
    return ev.groupby(["stage", "layer"])["dur_us"].sum() / max(n_steps, 1)


def layer_comparison(measured: pd.Series, predicted: pd.Series) -> pd.DataFrame:
    """Measured and predicted per-layer stage times (µs), outer-joined on (stage, layer)."""
    both = pd.concat([measured.rename("measured_us"), predicted.rename("predicted_us")], axis=1)
    both = both.fillna(0.0).reset_index()
    both.columns = ["stage", "layer", "measured_us", "predicted_us"]
    order = {s: i for i, s in enumerate(ordered_stages(list(both["stage"])))}
    both = both.assign(_o=both["stage"].map(order)).sort_values(["_o", "layer"], kind="stable")
    both["error_pct"] = [error_pct(p, m) for p, m in zip(both["predicted_us"], both["measured_us"])]
    return both.drop(columns="_o").reset_index(drop=True)


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
            raise ValueError(f"step {step} is not among the measured steps ({steps[0]}..{steps[-1]})")
        return step
    counts = events.assign(stage=events["stage"].astype(str)).groupby("step")["stage"].nunique()
    best = counts.max()
    return int(min(s for s, c in counts.items() if c == best))


def error_pct(predicted: float | None, measured: float | None) -> float:
    """Signed relative error of a prediction in percent (NaN if either is missing or measured 0);
    :func:`kfacperf.validation.error_pct`, so the report and ``kfacperf validate`` agree."""
    if measured is None or predicted is None:
        return math.nan
    return validation_error_pct(predicted, measured)


def stage_comparison(measured: pd.Series, predicted: pd.Series, measured_step_us: float,
                     predicted_step_us: float) -> pd.DataFrame:
    """Measured and predicted per-stage times (µs) side by side, the whole step last, with
    the error in %; a stage missing on one side counts as 0 there."""
    names = [n for n in ordered_stages(list(set(measured.index) | set(predicted.index)))
             if n != stages.STEP]
    rows = []
    for name in names:
        m = float(measured.get(name, 0.0))
        p = float(predicted.get(name, 0.0))
        rows.append({"stage": name, "measured_us": m, "predicted_us": p, "error_pct": error_pct(p, m)})
    rows.append({"stage": stages.STEP, "measured_us": measured_step_us, "predicted_us": predicted_step_us,
                 "error_pct": error_pct(predicted_step_us, measured_step_us)})
    return pd.DataFrame(rows, columns=["stage", "measured_us", "predicted_us", "error_pct"])

