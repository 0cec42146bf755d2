"""From simulated steps to the numbers a prediction reports.

A K-FAC run repeats a cycle of ``inverse_interval`` steps made of three kinds of step: one
*inverse* step (factors and inverses), ``inverse_interval / factor_interval - 1`` *factor*
steps (factors only) and the remaining *plain* steps.  Every step ends when all of its work has
finished on every rank, so steps are independent and the steady-state mean step time over a
cycle is exactly the weighted mean of the kinds' step times::

    mean = (1 * T_inverse + (n_f - 1) * T_factor + (I - n_f) * T_plain) / I,  n_f = I / F

Per GPU count the summary reports, for the *slowest representative rank* of each kind (the
one whose work ends last), weighted the same way: compute time (its compute stream busy),
communication time (its comm stream busy), exposed communication (comm time not overlapped
by its own compute), and the per-stage times.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kfacperf import vocab as S
from kfacperf.sim.engine import StepResult
from kfacperf.sim.graphs.graph import UNSTAGED
from kfacperf.trace.intervals import covered_length
from kfacperf.vocab import FACTOR_STEP, INVERSE_STEP, PLAIN_STEP, StepKind


@dataclass(frozen=True)
class CycleStep:
    """A kind of step, its step number in the cycle, and how many steps of a cycle it is."""

    kind: StepKind
    step: int
    weight: int


def cycle(factor_interval: int, inverse_interval: int, *, kfac: bool = True) -> list[CycleStep]:
    """The distinct kinds of step of one cycle, in step order (an SGD step has one kind);
    each is the kind :func:`kfacperf.vocab.step_kind` gives its step."""
    S.check_intervals(factor_interval, inverse_interval)
    if not kfac:
        return [CycleStep(PLAIN_STEP, 0, 1)]
    n_f = inverse_interval // factor_interval
    out = [CycleStep(INVERSE_STEP, 0, 1)]
    if factor_interval > 1:
        out.append(CycleStep(PLAIN_STEP, 1, inverse_interval - n_f))
    if n_f > 1:
        out.append(CycleStep(FACTOR_STEP, factor_interval, n_f - 1))
    return sorted(out, key=lambda c: c.step)


@dataclass(frozen=True)
class ClassTimes:
    """Busy times of one class in one step (us)."""

    step_us: float
    compute_us: float
    comm_us: float
    exposed_comm_us: float


def class_times(res: StepResult, ci: int) -> ClassTimes:
    dur = res.compute_durations(ci)
    _, c_start, c_dur = res.comm_times(ci)
    comm = float(c_dur.sum())
    hidden = covered_length(res.compute_start[ci], dur, c_start, c_dur)
    return ClassTimes(float(res.class_end[ci]), float(dur.sum()), comm, comm - hidden)


def stage_sums(res: StepResult, ci: int) -> dict[tuple[str, str], float]:
    """Time per ``(stage, layer)`` on class ``ci`` in one step (comm: collective durations)."""
    out: dict[tuple[str, str], float] = {}
    prog = res.graph.programs[ci]
    for st, layer, d in zip(prog.stage, prog.layer, prog.dur):
        if st != UNSTAGED:
            out[(st, layer)] = out.get((st, layer), 0.0) + d
    for k, _ in res.graph.comm[ci]:
        c = res.graph.collectives[k]
        out[(c.stage, c.layer)] = out.get((c.stage, c.layer), 0.0) + c.cost_us
    out[(S.STEP, "")] = float(res.class_end[ci])
    return out


@dataclass(frozen=True)
class PointSummary:
    """Steady-state numbers of one (strategy, GPU count)."""

    step_us: float
    compute_us: float
    comm_us: float
    exposed_comm_us: float
    kind_step_us: dict[str, float]
    classes: int
    stage_times: dict[tuple[str, str], float]


def summarize_point(steps: list[tuple[CycleStep, StepResult]]) -> PointSummary:
    """Weighted means over a cycle, on the slowest class of each kind of step."""
    total = sum(cs.weight for cs, _ in steps)
    acc = np.zeros(4)
    stages: dict[tuple[str, str], float] = {}
    kinds: dict[str, float] = {}
    classes = 0
    for cs, res in steps:
        w = cs.weight / total
        ci = res.slowest_class
        t = class_times(res, ci)
        acc += w * np.array([res.step_us, t.compute_us, t.comm_us, t.exposed_comm_us])
        for key, v in stage_sums(res, ci).items():
            stages[key] = stages.get(key, 0.0) + w * v
        kinds[cs.kind.name] = res.step_us
        classes = max(classes, len(res.graph.classes))
    return PointSummary(float(acc[0]), float(acc[1]), float(acc[2]), float(acc[3]), kinds,
                        classes, stages)


_STAGE_CODE = {name: i for i, name in enumerate(S.STAGE_NAMES)}
_UNSTAGED_CODE = -1
_STAGE_CODE[UNSTAGED] = _UNSTAGED_CODE
_COMPUTE, _COMM = S.LANES.index(S.COMPUTE), S.LANES.index(S.COMM)


class EventColumns:
    """Event rows of simulated steps, gathered as arrays (stage, layer, lane as codes into
    :data:`kfacperf.vocab.STAGE_NAMES`, :attr:`layers` and :data:`kfacperf.vocab.LANES`)."""

    FIELDS = ("rank", "step", "stage", "layer", "lane", "start", "dur", "nbytes", "flops")

    def __init__(self) -> None:
        self.parts: dict[str, list[np.ndarray]] = {f: [] for f in self.FIELDS}
        self.layer_index: dict[str, int] = {}
        self.rows = 0

    @property
    def layers(self) -> list[str]:
        return list(self.layer_index)

    def _layer_codes(self, names: list[str]) -> np.ndarray:
        idx = self.layer_index
        return np.fromiter((idx.setdefault(x, len(idx)) for x in names), dtype=np.int32,
                           count=len(names))

    def _task_codes(self, stages: list[str], layers: list[str]) -> tuple[np.ndarray, np.ndarray]:
        st = np.fromiter((_STAGE_CODE[x] for x in stages), dtype=np.int16, count=len(stages))
        return st, self._layer_codes(layers)

    def add_step(self, res: StepResult, step: int, offset_us: float) -> int:
        """Every class's rows of one simulated step, shifted to start at ``offset_us``;
        returns the number of rows added."""
        g = res.graph
        n_pc = g.prefix[0]
        colls = g.collectives
        c_cost = np.fromiter((c.cost_us for c in colls), dtype=np.float64, count=len(colls))
        c_bytes = np.fromiter((c.payload for c in colls), dtype=np.int64, count=len(colls))
        c_stage, c_layer = self._task_codes([c.stage for c in colls], [c.layer for c in colls])
        head = g.programs[0]
        h_stage, h_layer = self._task_codes(head.stage[:n_pc], head.layer[:n_pc])
        h_dur = np.asarray(head.dur[:n_pc], dtype=np.float64)
        h_flops = np.asarray(head.flops[:n_pc], dtype=np.float64)
        step_code = np.asarray([_STAGE_CODE[S.STEP]], dtype=np.int16)
        empty_layer = self._layer_codes([""])
        p = self.parts
        added = 0
        for ci, cls in enumerate(g.classes):
            prog = g.programs[ci]
            ks = np.fromiter((k for k, _ in g.comm[ci]), dtype=np.int64, count=len(g.comm[ci]))
            t_stage, t_layer = self._task_codes(prog.stage[n_pc:], prog.layer[n_pc:])
            n_c, n_m = len(prog.dur), len(ks)
            n = n_c + n_m + 1
            lane = np.full(n, _COMPUTE, dtype=np.int8)
            lane[n_c:n_c + n_m] = _COMM
            fields = {
                "rank": np.full(n, cls.rank, dtype=np.int32),
                "step": np.full(n, step, dtype=np.int32),
                "stage": np.concatenate((h_stage, t_stage, c_stage[ks], step_code)),
                "layer": np.concatenate((h_layer, t_layer, c_layer[ks], empty_layer)),
                "lane": lane,
                "start": np.concatenate((res.compute_start[ci], res.coll_start[ks], [0.0]))
                + offset_us,
                "dur": np.concatenate((h_dur, np.asarray(prog.dur[n_pc:], dtype=np.float64),
                                       c_cost[ks], [res.class_end[ci]])),
                "nbytes": np.concatenate((np.zeros(n_c, dtype=np.int64), c_bytes[ks],
                                          np.zeros(1, dtype=np.int64))),
                "flops": np.concatenate((h_flops, np.asarray(prog.flops[n_pc:], dtype=np.float64),
                                         np.zeros(n_m + 1))),
            }
            keep = fields["stage"] != _UNSTAGED_CODE  # host work between stages: no row
            if not keep.all():
                fields = {k: v[keep] for k, v in fields.items()}
                n = int(keep.sum())
            for k, v in fields.items():
                p[k].append(v)
            added += n
        self.rows += added
        return added

    def column(self, name: str, dtype: str) -> np.ndarray:
        parts = self.parts[name]
        return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)

    def __len__(self) -> int:
        return self.rows
