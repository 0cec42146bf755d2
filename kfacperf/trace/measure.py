"""A run's measured step time and stage times: the one definition every comparison uses.

The trace summary, the report, ``kfacperf validate``, the device calibration and the demo's
headline all take a run's step time and its stages' times from here.

**Kinds of step.**  A K-FAC run repeats steps of up to three kinds, by the optimizer's rule
(:func:`kfacperf.vocab.step_kind`: step ``k`` recomputes inverses iff ``k % inverse_interval
== 0``, else factors iff ``k % factor_interval == 0``; SGD steps are all plain).  The
measured steps (those after warm-up) are a window that need not be a whole cycle: a 10/100
run of 20 steps has no inverse step in it.

**Step time.**  A step lasts as long as its slowest rank's ``step`` row (the whole step,
measured, not summed; a rank without one: the span of its rows).  A run's step time is, per
kind of step, the median over its measured steps of that kind, weighted by the kind's
number of measured steps.  Medians keep a burst of load from elsewhere on the machine out
of the number.

**Stage time.**  A stage's time in a step is the mean over ranks of each rank's time in it
(a rank without the stage counts 0; every layer summed; :func:`rank_stage_times`):

* a compute stage counts its *exclusive* time: the compute stages nested inside it are
  subtracted (the factor statistics computed in backward hooks lie inside the measured
  ``backward``; the simulator's backward excludes them), and so is the time the rank was
  blocked in it waiting for a late peer's collective (DDP waits for its gradient buckets at
  the end of ``backward``);
* a communication stage counts, for every collective of it that the rank takes part in,
  the collective's cost: from its last member's start to its last member's completion
  (:func:`collective_costs`), the quantity ``kfacperf commbench`` times.  The time a rank
  waits for a late peer is no collective's cost.

A run's stage time is, like its step time, the median per kind of step weighted by the mix;
the same holds per (stage, layer), and per rank for the trace summary's per-rank numbers and
the report's per-rank breakdown (:func:`over_steps`).  A prediction is compared kind by
kind, weighted by the *measured* mix (:mod:`kfacperf.trace.compare`).

This module never imports torch.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from kfacperf import vocab as S

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

KINDS: tuple[str, ...] = S.STEP_KIND_NAMES

BLOCKED_TOLERANCE_US = 2000.0
"""A compute stage that ends this soon after a collective completes was waiting for it."""

LayerKey = tuple[str, str]


def run_step_kind(step: int, run: Mapping[str, Any]) -> str:
    """The kind of step ``step`` of the run described by ``run`` (a run.json)."""
    return S.step_kind(step, int(run.get("factor_interval") or 1),
                       int(run.get("inverse_interval") or 1),
                       kfac=run.get("optimizer") != S.SGD).name


def measured_events(trace: Any) -> pd.DataFrame:
    """The events of the steps after warm-up (``run["warmup"]``) of anything with ``.run``
    and ``.events`` that every rank of the trace finished (:func:`unfinished_steps`)."""
    events = trace.events
    events = events[events["step"] >= int(trace.run.get("warmup", 0) or 0)]
    partial = unfinished_steps(trace.events)
    return events[~events["step"].isin(partial)] if partial else events


def unfinished_steps(events: pd.DataFrame) -> list[int]:
    """The steps that some ranks of ``events`` recorded and others did not: in a run that died,
    the step a rank finished while a peer was being killed.  Such a step is no measurement of
    the run's step (its missing ranks would count 0 in every stage's mean), so
    :func:`measured_events` leaves it out."""
    if events.empty:
        return []
    ranks = events.groupby("step", observed=True)["rank"].nunique()
    return sorted(int(s) for s in ranks.index[ranks < events["rank"].nunique()])


def no_measured_steps(trace: Any, label: str) -> str:
    """Why ``trace`` (anything with ``.run`` and ``.events``) has no measured step, in one
    line: no step recorded at all (with the run's own ``failure`` where it says one), only
    warm-up steps, or only steps that some ranks did not finish."""
    warmup = int(trace.run.get("warmup", 0) or 0)
    steps = trace.events["step"].nunique() if "step" in trace.events else 0
    if steps == 0:
        failure = trace.run.get("failure")
        return (f"{label}: the run recorded no step"
                + (f" (run.json: {failure})" if failure else "")
                + "; profile it again with at least one step after the warm-up")
    after = trace.events.loc[trace.events["step"] >= warmup, "step"].nunique()
    if after:
        return (f"{label}: no measured step that every rank finished: the {after} step(s) "
                f"after the warm-up were finished by only some ranks; profile it again")
    return (f"{label}: no measured step: all {steps} recorded step(s) are warm-up "
            f"(warmup = {warmup}); profile it again with more steps than warm-up steps")


@dataclass(frozen=True, kw_only=True)
class KindTimes:
    """Per kind of step: the step time, each stage's time and each (stage, layer)'s time."""

    step_us: dict[str, float]
    stage_us: dict[str, dict[str, float]]
    layer_us: dict[str, dict[LayerKey, float]] = field(default_factory=dict)

    def step_time_us(self, mix: Mapping[str, int]) -> float:
        """The step time over steps of the kinds and numbers in ``mix``."""
        return weighted(self.step_us, mix)

    def stage_times_us(self, mix: Mapping[str, int]) -> dict[str, float]:
        """Every stage's time over steps of the kinds and numbers in ``mix``."""
        return _weighted_table(self.stage_us, mix)

    def layer_times_us(self, mix: Mapping[str, int]) -> dict[LayerKey, float]:
        """Every (stage, layer)'s time over steps of the kinds and numbers in ``mix``."""
        return _weighted_table(self.layer_us, mix)


@dataclass(frozen=True, kw_only=True)
class Measured(KindTimes):
    """A run's measured steps: how many of each kind, and their times (medians per kind)."""

    kinds: dict[str, int]  # kind -> number of measured steps
    mean_step_us: float  # plain mean over the measured steps, for reference

    @property
    def step_time(self) -> float:
        """The run's step time (µs): the per-kind medians weighted by the measured mix."""
        return self.step_time_us(self.kinds)

    def stage_times(self) -> dict[str, float]:
        """The run's time (µs) of every stage, weighted by the measured mix."""
        return self.stage_times_us(self.kinds)

    def layer_times(self) -> dict[LayerKey, float]:
        """The run's time (µs) of every (stage, layer), weighted by the measured mix."""
        return self.layer_times_us(self.kinds)


def weighted(per_kind: Mapping[str, float], kinds: Mapping[str, int]) -> float:
    """The mean over steps of the kinds and numbers in ``kinds`` (NaN for no steps)."""
    n = sum(kinds.values())
    if n == 0:
        return float("nan")
    return sum(per_kind.get(k, 0.0) * c for k, c in kinds.items()) / n


def _weighted_table(per_kind: Mapping[str, Mapping[Any, float]],
                    kinds: Mapping[str, int]) -> dict[Any, float]:
    keys = dict.fromkeys(k for kind in kinds for k in per_kind.get(kind, {}))
    return {key: weighted({kind: per_kind.get(kind, {}).get(key, 0.0) for kind in kinds}, kinds)
            for key in keys}


class TraceLike(Protocol):
    """What :func:`measure` reads of a trace: a :class:`~kfacperf.trace.store.Trace`, or
    anything with ``run`` (its run.json), ``events`` and optionally ``path``."""

    @property
    def run(self) -> Mapping[str, Any]: ...

    @property
    def events(self) -> pd.DataFrame: ...


def measure(trace: TraceLike | str | os.PathLike[str]) -> Measured:
    """The step and stage times of ``trace``'s measured steps: a trace directory (loaded
    with :func:`kfacperf.trace.store.load_trace`), a :class:`~kfacperf.trace.store.Trace`,
    or anything with ``.run``, ``.events`` and optionally ``.path``."""
    from pathlib import Path

    if isinstance(trace, (str, os.PathLike)):
        from kfacperf.trace.store import load_trace

        trace = load_trace(trace)
    path = getattr(trace, "path", None)
    label = Path(path).name if path else str(trace.run.get("workload", "run"))
    events = measured_events(trace)
    if events.empty:
        raise ValueError(no_measured_steps(trace, label))
    return measure_events(events, trace.run, label=label)


def measure_events(events: pd.DataFrame, run: Mapping[str, Any], *,
                   label: str = "run") -> Measured:
    """:func:`measure` on an event table (measured steps only) and its run.json."""
    steps = step_times(events)
    kinds = step_kinds(steps.index, run)
    stage = events["stage"].astype(str)
    with_inverse = set(events.loc[stage == S.INVERSE, "step"].astype(int))
    wrong = sorted(s for s in with_inverse if kinds.get(s) != S.INVERSE_STEP.name)
    if wrong:
        raise ValueError(f"{label}: step {wrong[0]} inverts factors but inverse_interval "
                         f"{run.get('inverse_interval')} says it should not")
    world = int(run.get("world_size") or 1)
    per_step = rank_stage_times(events).groupby(["step", "stage", "layer"])["dur_us"].sum() / world
    stages = per_step.groupby(level=["step", "stage"]).sum().unstack("stage", fill_value=0.0)
    stages = stages.reindex(steps.index, fill_value=0.0)
    layered = per_step[per_step.index.get_level_values("layer") != ""]
    stage_us = kind_medians(stages, kinds)
    layer_us: dict[str, dict[Any, float]] = {kind: {} for kind in stage_us}
    if len(layered):
        layer_us = kind_medians(layered.unstack(["stage", "layer"], fill_value=0.0).reindex(
            steps.index, fill_value=0.0), kinds)
    step_us = {kind: times["step_us"]
               for kind, times in kind_medians(steps.to_frame("step_us"), kinds).items()}
    return Measured(kinds=step_mix(kinds), step_us=step_us, stage_us=stage_us,
                    layer_us=layer_us, mean_step_us=float(steps.mean()))


def step_kinds(steps: Iterable[Any], run: Mapping[str, Any]) -> pd.Series:
    """The kind of each of ``steps`` in the run described by ``run`` (kind names, indexed by
    step)."""
    import pandas as pd

    index = pd.Index([int(s) for s in steps], dtype="int64", name="step")
    return pd.Series([run_step_kind(int(s), run) for s in index], index=index, dtype=object)


def step_mix(kinds: pd.Series) -> dict[str, int]:
    """How many steps of each kind (:data:`KINDS` order) ``kinds`` (:func:`step_kinds`) has."""
    counts = kinds.value_counts()
    return {kind: int(counts[kind]) for kind in KINDS if kind in counts.index}


def kind_medians(table: pd.DataFrame, kinds: pd.Series) -> dict[str, dict[Any, float]]:
    """Per kind of step (:data:`KINDS` order): the median of each column of ``table`` (one row
    per step, indexed by step; missing values skipped) over its steps of that kind
    (``kinds``: :func:`step_kinds`)."""
    import pandas as pd

    of_row = kinds.reindex(pd.Index(table.index).astype("int64")).to_numpy()
    medians = table.groupby(of_row).median()
    return {kind: {col: float(v) for col, v in medians.loc[kind].items()}
            for kind in KINDS if kind in medians.index}


def over_steps(table: pd.DataFrame, kinds: pd.Series) -> dict[Any, float]:
    """Each column of ``table`` (one row per measured step, indexed by step) over the measured
    steps as the module docstring takes a step or stage time: per kind of step the median,
    weighted by the number of steps of each kind in ``kinds`` (:func:`step_kinds`)."""
    return _weighted_table(kind_medians(table, kinds), step_mix(kinds))


def rank_step_times(events: pd.DataFrame) -> pd.Series:
    """Per (rank, step): the rank's ``step`` row (the longest, if several), or the span of
    its rows when it has none."""
    stage = events["stage"].astype(str)
    end = events["start_us"] + events["dur_us"]
    frame = events[["rank", "step", "start_us"]].assign(end_us=end)
    by = frame.groupby(["rank", "step"])
    out = (by["end_us"].max() - by["start_us"].min()).rename("step_us")
    rows = events.loc[stage == S.STEP].groupby(["rank", "step"])["dur_us"].max()
    out.loc[rows.index] = rows
    return out


def step_times(events: pd.DataFrame) -> pd.Series:
    """Per measured step: its time, the slowest rank's (:func:`rank_step_times`)."""
    return rank_step_times(events).groupby(level="step").max()


def rank_stage_times(events: pd.DataFrame) -> pd.DataFrame:
    """Per (rank, step, stage, layer): the rank's time in the stage (``dur_us``), as defined
    in the module docstring: exclusive compute less time blocked on late peers, and the
    cost of every collective the rank takes part in."""
    import pandas as pd

    keys = ["rank", "step", "stage", "layer"]
    comp = exclusive_compute_times(events)
    members, blocked = collective_costs(events)
    if len(blocked):
        comp = comp.merge(blocked, on=keys, how="left")
        comp["dur_us"] = (comp["dur_us"] - comp["wait_us"].fillna(0.0)).clip(lower=0.0)
        comp = comp[keys + ["dur_us"]]
    comm = members.groupby(keys, as_index=False, sort=False)["cost_us"].sum().rename(
        columns={"cost_us": "dur_us"})
    out = pd.concat([comp, comm], ignore_index=True) if len(comm) else comp
    return out.astype({"rank": "int64", "step": "int64", "stage": str, "layer": str,
                       "dur_us": float})


def exclusive_compute_times(events: pd.DataFrame) -> pd.DataFrame:
    """Per (rank, step, stage, layer): summed exclusive time of the compute stages.

    A compute event that lies inside another one on the same rank (the factor statistics
    computed in a backward hook lie inside ``backward``) is subtracted from its parent.
    """
    import numpy as np
    import pandas as pd

    lane = events["lane"].astype(str)
    stage_col = events["stage"].astype(str)
    comp = events[(lane == S.COMPUTE) & (stage_col != S.STEP)]
    out_rows: list[tuple[int, int, str, str, float]] = []
    for rank, ev in comp.groupby("rank", observed=True):
        start = ev["start_us"].to_numpy(float)
        dur = ev["dur_us"].to_numpy(float)
        order = np.lexsort((-dur, start))
        end = start + dur
        excl = dur.copy()
        stack: list[int] = []
        eps = 1e-6
        for i in order:
            while stack and end[stack[-1]] <= start[i] + eps:
                stack.pop()
            if stack and end[i] <= end[stack[-1]] + eps:
                excl[stack[-1]] -= dur[i]
            stack.append(i)
        steps = ev["step"].to_numpy()
        stage = ev["stage"].astype(str).to_numpy()
        layer = ev["layer"].astype(str).to_numpy()
        for i in range(len(ev)):
            out_rows.append((int(rank), int(steps[i]), stage[i], layer[i], max(0.0, excl[i])))
    df = pd.DataFrame(out_rows, columns=["rank", "step", "stage", "layer", "dur_us"])
    return df.groupby(["rank", "step", "stage", "layer"], as_index=False, sort=False)[
        "dur_us"].sum()


def collective_costs(events: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Each collective's cost for each of its members, and the time ranks spent blocked on
    late peers inside a compute stage.

    Collectives are matched across ranks by (step, stage, layer, order of issue).  A rank runs
    its collectives one at a time, in issue order: one issued while an earlier one is in flight
    starts when that one completes.  Cost: from the last member's start to the last member's
    completion, the time the collective holds the group once everyone has arrived.  It is
    the quantity ``kfacperf commbench`` times (a barrier, then the slowest rank's
    completion): where ranks share cores they complete the same collective up to a few
    milliseconds apart, and the peer that completes last is the one the next collective
    waits for.  A rank's wait is the time from its start to the last member's start; when
    a compute stage that began before the issue ends within :data:`BLOCKED_TOLERANCE_US` of
    the completion, the rank was blocked in it, and the wait is charged to no stage.
    Returns ``(rank, step, stage, layer, occ, cost_us)`` (one row per member) and
    ``(rank, step, stage, layer, wait_us)`` of the blocked compute stages.
    """
    import numpy as np
    import pandas as pd

    lane = events["lane"].astype(str)
    comm = events.loc[lane == S.COMM, ["rank", "step", "stage", "layer", "start_us",
                                       "dur_us"]].copy()
    empty = pd.DataFrame(columns=["rank", "step", "stage", "layer", "wait_us"])
    if comm.empty:
        return pd.DataFrame(columns=["rank", "step", "stage", "layer", "occ", "cost_us"]), empty
    for col in ("stage", "layer"):
        comm[col] = comm[col].astype(str)
    comm = comm.sort_values(["rank", "start_us"])
    comm["occ"] = comm.groupby(["rank", "step", "stage", "layer"]).cumcount()
    comm["end_us"] = comm["start_us"] + comm["dur_us"]
    # a rank's collectives run one after another (one comm stream, as in the simulator): one
    # issued while an earlier one is in flight starts when that one completes
    before = comm.groupby("rank")["end_us"].transform(lambda e: e.cummax().shift(1))
    comm["run_start_us"] = comm["start_us"].where(
        before.isna() | (comm["start_us"] >= before), before).clip(upper=comm["end_us"])
    keys = ["step", "stage", "layer", "occ"]
    span = comm.groupby(keys, as_index=False).agg(last_start=("run_start_us", "max"),
                                                  last_end=("end_us", "max"))
    span["cost_us"] = (span["last_end"] - span["last_start"]).clip(lower=0.0)
    comm = comm.merge(span, on=keys)
    members = comm[["rank", "step", "stage", "layer", "occ", "cost_us"]].reset_index(drop=True)
    comm["wait_us"] = (comm["last_start"] - comm["run_start_us"]).clip(lower=0.0)
    waits = comm[comm["wait_us"] > 0]
    stage = events["stage"].astype(str)
    comp = events.loc[(lane == S.COMPUTE) & (stage != S.STEP)]
    rows = []
    for (rank, step), w in waits.groupby(["rank", "step"]):
        c = comp[(comp["rank"] == rank) & (comp["step"] == step)]
        c_start = c["start_us"].to_numpy(float)
        c_end = c_start + c["dur_us"].to_numpy(float)
        for start, end, wait in zip(w["start_us"], w["end_us"], w["wait_us"]):
            hit = np.flatnonzero((c_start <= start) & (c_end >= end)
                                 & (c_end - end <= BLOCKED_TOLERANCE_US))
            if len(hit):
                i = hit[np.argmin(c_end[hit] - c_start[hit])]  # the innermost stage
                rows.append((int(rank), int(step), str(c["stage"].iloc[i]),
                             str(c["layer"].iloc[i]), float(wait)))
    blocked = pd.DataFrame(rows, columns=list(empty.columns)) if rows else empty
    if len(blocked):
        blocked = blocked.groupby(["rank", "step", "stage", "layer"], as_index=False).sum()
    return members, blocked
