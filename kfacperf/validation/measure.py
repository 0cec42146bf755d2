"""What a trace measured: per kind of step, the step time and the time of every stage."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kfacperf import vocab as S
from kfacperf.validation.inputs import trace_label

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from kfacperf.trace.store import Trace

KINDS: tuple[str, ...] = ("inverse", "factor", "plain")


def step_kind(step: int, run: Mapping[str, Any]) -> str:
    """The optimizer's rule for which work step ``step`` does."""
    if run.get("optimizer") == "sgd":
        return "plain"
    if step % int(run.get("inverse_interval") or 1) == 0:
        return "inverse"
    if step % int(run.get("factor_interval") or 1) == 0:
        return "factor"
    return "plain"


@dataclass(frozen=True, kw_only=True)
class Measured:
    """A run's measured steps: the kind of each, the step time and the stage times."""

    kinds: dict[str, int]  # kind -> number of measured steps
    step_us: dict[str, float]  # kind -> median step time
    stage_us: dict[str, dict[str, float]]  # kind -> stage -> median per-step time (rank mean)
    mean_step_us: float


def measure(trace: Trace) -> Measured:
    """Step and stage times of a trace's measured steps, per kind of step."""
    import numpy as np
    import pandas as pd

    from kfacperf.calibrate.device import exclusive_compute_times

    run, label = trace.run, trace_label(trace)
    ev = trace.measured()
    if ev.empty:
        raise ValueError(f"{label}: no measured steps (all {trace.warmup} recorded steps are "
                         "warm-up, or the trace is empty)")
    stage = ev["stage"].astype(str)
    steps = ev.loc[stage == S.STEP].groupby("step")["dur_us"].max()
    if steps.empty:
        raise ValueError(f"{label}: no 'step' rows in the measured steps")
    kind_of = {int(s): step_kind(int(s), run) for s in steps.index}
    with_inverse = set(ev.loc[stage == S.INVERSE, "step"].astype(int))
    wrong = sorted(s for s in with_inverse if kind_of.get(s) != "inverse")
    if wrong:
        raise ValueError(f"{label}: step {wrong[0]} inverts factors but inverse_interval "
                         f"{run.get('inverse_interval')} says it should not")
    world = int(run.get("world_size") or 1)

    comp = exclusive_compute_times(ev)
    comm, blocked = collective_costs(ev)
    if len(blocked):  # a rank blocked inside a stage waiting for a late peer is not computing
        comp = comp.merge(blocked, on=["rank", "step", "stage", "layer"], how="left")
        comp["dur_us"] = (comp["dur_us"] - comp["wait_us"].fillna(0.0)).clip(lower=0.0)
    comp = comp.groupby(["step", "stage"], as_index=False)["dur_us"].sum()
    comp["dur_us"] /= world  # mean over ranks (ranks without the stage count as 0)
    per = comm.groupby(["step", "stage"], as_index=False)["cost_us"].sum().rename(
        columns={"cost_us": "dur_us"})
    table = pd.concat([comp, per], ignore_index=True)
    wide = table.pivot_table(index="step", columns="stage", values="dur_us", aggfunc="sum",
                             fill_value=0.0).reindex(steps.index, fill_value=0.0)

    kinds: dict[str, int] = {}
    step_us: dict[str, float] = {}
    stage_us: dict[str, dict[str, float]] = {}
    for kind in KINDS:
        sel = [s for s in steps.index if kind_of[int(s)] == kind]
        if not sel:
            continue
        kinds[kind] = len(sel)
        step_us[kind] = float(np.median(steps.loc[sel].to_numpy()))
        stage_us[kind] = {str(c): float(np.median(wide.loc[sel, c].to_numpy()))
                          for c in wide.columns}
    return Measured(kinds=kinds, step_us=step_us, stage_us=stage_us,
                    mean_step_us=float(steps.mean()))


BLOCKED_TOLERANCE_US = 2000.0
"""A compute stage that ends this soon after a collective completes was waiting for it."""


def collective_costs(events: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Each collective's cost, and the time ranks spent blocked on late peers inside a stage.

    Collectives are matched across ranks by (step, stage, layer, order of issue).  A rank runs
    its collectives one at a time, in issue order: one issued while an earlier one is in flight
    starts when that one completes.  Cost: from the last member's start to the last member's
    completion, the time the collective holds the group once everyone has arrived.  It is
    the quantity ``kfacperf commbench`` times (a barrier, then the slowest rank's
    completion): where ranks share cores they complete the same collective up to a few
    milliseconds apart, and the peer that completes last is the one the next collective
    waits for.  A rank's wait is the time from its start to the last member's start; when
    a compute stage that began before the issue ends within :data:`BLOCKED_TOLERANCE_US` of
    the completion, the rank was blocked in it (DDP waits for its gradient buckets at the
    end of ``backward``), and the wait is charged to no stage.  Returns ``(step, stage,
    layer, occ, cost_us)`` and ``(rank, step, stage, layer, wait_us)`` of the blocked
    compute stages.
    """
    import numpy as np
    import pandas as pd

    lane = events["lane"].astype(str)
    comm = events.loc[lane == S.COMM, ["rank", "step", "stage", "layer", "start_us",
                                       "dur_us"]].copy()
    empty = pd.DataFrame(columns=["rank", "step", "stage", "layer", "wait_us"])
    if comm.empty:
        return pd.DataFrame(columns=["step", "stage", "layer", "occ", "cost_us"]), empty
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
    cost = span[keys + ["cost_us"]]
    comm = comm.merge(span, on=keys)
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
    return cost, blocked


def weighted(per_kind: Mapping[str, float], kinds: Mapping[str, int]) -> float:
    n = sum(kinds.values())
    return sum(per_kind.get(k, 0.0) * c for k, c in kinds.items()) / n
