"""Do a trace's compute stages add up to its step?

Per (rank, measured step), against the rank's ``step`` row:

* **covered**: the time inside the step that some stage covers (the union of the stages'
  intervals, clipped to the step; in a one-process run the compute lane's alone, with
  several ranks a collective also covers the time a rank waits in it);
* **gap**: the step less what is covered, time no stage accounts for (on a GPU: the stream
  idle between two stages' events);
* **double counted**: the compute stages' exclusive times (:func:`kfacperf.trace.measure.
  exclusive_compute_times`, what every comparison adds up) less the time the compute lane
  covers.  Stages that nest (the factor statistics inside ``backward``) are not double
  counted; two stages that overlap without one holding the other are, and so is a stage
  reaching outside its step.

A trace whose stages account for the step leaves gaps of a few per cent at most and double
counts nothing.

A compute stage longer than the step it lies in (by more than :data:`STAGE_OVERRUN_PCT` and
:data:`STAGE_OVERRUN_US`) is impossible, not noise: the trace's times are corrupt.
:func:`check_stage_spans` refuses such a trace (``calibrate`` and ``validate`` call it); a
collective may outlast its step (asynchronous communication completes in the next one) and
is not checked.  Gaps are judged per kind of step by their median (as step times are, so
that one step stalled by the machine's other work does not fail a run); double counting,
a defect of the instrumentation rather than noise, by its worst step.  This module never
imports torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kfacperf import vocab as S
from kfacperf.trace.measure import exclusive_compute_times, measured_events, run_step_kind

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

STAGE_OVERRUN_PCT = 10.0
STAGE_OVERRUN_US = 1000.0
"""A compute stage may be longer than its rank's step by this much (relative, plus absolute:
rounding and the timers' own cost) before the trace is refused."""
GAP_LIMIT_PCT = 5.0
"""The most of a step that no stage may account for."""
DOUBLE_COUNT_LIMIT_PCT = 0.1
"""Rounding of event times aside, nothing may be counted twice."""


@dataclass(frozen=True, kw_only=True)
class Coverage:
    """How the compute stages of a trace's measured steps cover them."""

    steps: pd.DataFrame
    """One row per (rank, step): ``kind`` (of step; empty where the run is unknown),
    ``step_us``, ``covered_us`` (any lane), ``compute_us`` (the compute lane),
    ``exclusive_us``, ``gap_pct``, ``double_pct``."""

    @property
    def worst_gap_pct(self) -> float:
        return float(self.steps["gap_pct"].max()) if len(self.steps) else float("nan")

    @property
    def median_gap_pct(self) -> float:
        return float(self.steps["gap_pct"].median()) if len(self.steps) else float("nan")

    @property
    def worst_double_pct(self) -> float:
        return float(self.steps["double_pct"].max()) if len(self.steps) else float("nan")

    def median_gap_by_kind(self) -> dict[str, float]:
        """Per kind of step, the median gap (%)."""
        return {str(k): float(g.median())
                for k, g in self.steps.groupby("kind", sort=False)["gap_pct"]}

    def problems(self, *, gap_limit_pct: float = GAP_LIMIT_PCT,
                 double_limit_pct: float = DOUBLE_COUNT_LIMIT_PCT) -> list[str]:
        """What is wrong (empty: the stages add up to the step)."""
        if self.steps.empty:
            return ["no measured step with a step row"]
        out = []
        for kind, gap in self.median_gap_by_kind().items():
            if gap > gap_limit_pct:
                out.append(f"{kind + ' ' if kind else ''}steps: a median {gap:.1f}% of the "
                           f"step in no stage (limit {gap_limit_pct:g}%)")
        if self.worst_double_pct > double_limit_pct:
            worst = self.steps.loc[self.steps["double_pct"].idxmax()]
            out.append(f"step {int(worst['step'])} (rank {int(worst['rank'])}): "
                       f"{worst['double_pct']:.1f}% of it counted twice by overlapping stages")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"steps": int(len(self.steps)), "median_gap_pct": self.median_gap_pct,
                "median_gap_pct_by_kind": self.median_gap_by_kind(),
                "worst_gap_pct": self.worst_gap_pct, "worst_double_pct": self.worst_double_pct,
                "problems": self.problems()}


def coverage(trace: Any) -> Coverage:
    """:func:`coverage_of` the measured steps of ``trace`` (anything with ``.run`` and
    ``.events``), each with its kind of step."""
    cov = coverage_of(measured_events(trace))
    kinds = [run_step_kind(int(s), trace.run) for s in cov.steps["step"]]
    return Coverage(steps=cov.steps.assign(kind=kinds))


def check_stage_spans(trace: Any, *, label: str = "") -> None:
    """Refuse a trace whose measured steps hold a compute stage longer than the step (the
    rank's ``step`` row) by more than :data:`STAGE_OVERRUN_PCT` % + :data:`STAGE_OVERRUN_US`:
    a ValueError naming the trace, the stage, the step and the rank (the worst such event)."""
    events = measured_events(trace)
    if events.empty:
        return
    stage = events["stage"].astype(str)
    lane = events["lane"].astype(str)
    steps = events[stage == S.STEP].groupby(["rank", "step"], observed=True)["dur_us"].max()
    if steps.empty:
        return
    comp = events[(lane == S.COMPUTE) & (stage != S.STEP)]
    comp = comp.join(steps.rename("step_us"), on=["rank", "step"], how="inner")
    limit = comp["step_us"] * (1.0 + STAGE_OVERRUN_PCT / 100.0) + STAGE_OVERRUN_US
    over = comp[comp["dur_us"] > limit]
    if over.empty:
        return
    worst = over.loc[(over["dur_us"] / over["step_us"].clip(lower=1e-9)).idxmax()]
    path = getattr(trace, "path", None)
    name = label or (str(path) if path else str(trace.run.get("workload", "trace")))
    layer = f" of layer {worst['layer']}" if str(worst["layer"]) else ""
    raise ValueError(
        f"{name}: step {int(worst['step'])} (rank {int(worst['rank'])}): {worst['stage']}"
        f"{layer} lasts {float(worst['dur_us']) / 1e3:.1f} ms, longer than its step "
        f"({float(worst['step_us']) / 1e3:.1f} ms; {len(over)} such event(s)); the trace's "
        "times are impossible: record it again or leave it out")


def coverage_of(events: pd.DataFrame) -> Coverage:
    """How the stages in ``events`` cover each (rank, step) that has a ``step`` row."""
    import numpy as np
    import pandas as pd

    stage = events["stage"].astype(str)
    lane = events["lane"].astype(str)
    step_rows = events[stage == S.STEP]
    stages = events[stage != S.STEP]
    comp = stages[lane[stage != S.STEP] == S.COMPUTE]
    exclusive = exclusive_compute_times(comp).groupby(["rank", "step"])["dur_us"].sum() \
        if len(comp) else pd.Series(dtype=float)
    by_step = dict(iter(stages.groupby(["rank", "step"], observed=True)))
    rows = []
    for r in step_rows.itertuples(index=False):
        key = (int(r.rank), int(r.step))
        lo, hi = float(r.start_us), float(r.start_us) + float(r.dur_us)
        ev = by_step.get(key)
        covered = compute = 0.0
        if ev is not None:
            start = ev["start_us"].to_numpy(float)
            end = start + ev["dur_us"].to_numpy(float)
            on_compute = (ev["lane"].astype(str) == S.COMPUTE).to_numpy()
            covered = _union_within(start, end, lo, hi)
            compute = _union_within(start[on_compute], end[on_compute], lo, hi)
        excl = float(exclusive.get(key, 0.0))
        step_us = float(r.dur_us)
        scale = 100.0 / step_us if step_us > 0 else np.nan
        rows.append((key[0], key[1], step_us, covered, compute, excl,
                     (step_us - covered) * scale, max(0.0, excl - compute) * scale))
    table = pd.DataFrame(rows, columns=["rank", "step", "step_us", "covered_us", "compute_us",
                                        "exclusive_us", "gap_pct", "double_pct"])
    table.insert(2, "kind", "")
    return Coverage(steps=table)


def _union_within(start: Any, end: Any, lo: float, hi: float) -> float:
    """The length of the union of the intervals [start, end) clipped to [lo, hi)."""
    import numpy as np

    s = np.clip(start, lo, hi)
    e = np.clip(end, lo, hi)
    order = np.argsort(s, kind="stable")
    total, cur_s, cur_e = 0.0, None, None
    for i in order:
        if cur_e is None or s[i] > cur_e:
            if cur_e is not None and cur_s is not None:
                total += cur_e - cur_s
            cur_s, cur_e = float(s[i]), float(e[i])
        else:
            cur_e = max(cur_e, float(e[i]))
    if cur_e is not None and cur_s is not None:
        total += cur_e - cur_s
    return total
