"""The discrete-event engine: runs a :class:`~kfacperf.sim.graphs.graph.StepGraph` on SimPy.

Each simulated class gets two SimPy processes, its compute stream and its comm stream.  A
stream is a capacity-one server that takes its work strictly in issue order (a CUDA stream, an
NCCL communicator), so a process walking its task list plays the role of a one-slot resource
whose requests arrive in program order — without paying for a request/release per task.

* Compute runs of tasks that nobody outside the stream waits for, and that wait for nothing,
  are one timeout (their individual start times are recovered afterwards from the durations),
  so a step costs a few SimPy events per collective rather than per kernel.
* A collective keeps a counter of arrived member classes and one shared completion event:
  each arrival is O(1); the last one to arrive starts it, waits its cost and fires the event.
* A collective with a :attr:`~kfacperf.sim.graphs.graph.Collective.straggle` ``s`` starts at the
  latest over its members of (arrival + ``s`` x the compute that member ran since its previous
  collective): the expected wait for the slowest of ranks that are uneven (the measured trace
  charges that wait to no stage).  "The compute since its previous collective" is the busy
  time of the member's compute stream between the two launches (the durations of the compute
  tasks issued after the previous collective's launch and up to this one's, from the step's
  start for the first), not the wall time between them: waiting on communication is no compute
  and makes ranks no more uneven.  Every start is then a maximum over finish times plus fixed
  delays, so a slower network (a longer collective) delays nothing less.
* If the run ends with a collective that never started, the graph deadlocked (two classes
  issued collectives in different orders, or a member never launches one): that is an error
  naming the collective, as a real job would hang there.
"""
from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import simpy

from kfacperf.sim.graphs.graph import StepGraph


@dataclass(frozen=True)
class _Segment:
    waits: tuple[int, ...]
    total: float
    signal: int  # compute count whose completion this segment announces, 0 for none


@dataclass
class _Plan:
    segments: list[_Segment]
    seg_of: npt.NDArray[np.int64]
    offset: npt.NDArray[np.float64]


def _plan(durs: list[float], waits: list[tuple[int, ...]], observed: set[int]) -> _Plan:
    segs: list[_Segment] = []
    n = len(durs)
    seg_of = np.empty(n, dtype=np.int64)
    offset = np.empty(n, dtype=np.float64)
    cur_waits: tuple[int, ...] = ()
    total = 0.0
    open_seg = False
    for t in range(n):
        if open_seg and waits[t]:
            segs.append(_Segment(cur_waits, total, 0))
            open_seg = False
        if not open_seg:
            cur_waits, total, open_seg = waits[t], 0.0, True
        seg_of[t] = len(segs)
        offset[t] = total
        total += durs[t]
        if (t + 1) in observed:
            segs.append(_Segment(cur_waits, total, t + 1))
            open_seg = False
    if open_seg:
        segs.append(_Segment(cur_waits, total, 0))
    return _Plan(segs, seg_of, offset)


@dataclass
class StepResult:
    """Times of one simulated step (microseconds from the step's start)."""

    graph: StepGraph
    compute_start: list[np.ndarray]
    """Per class: start of each compute task."""
    coll_start: np.ndarray
    """Per collective: when its last member arrived."""
    class_end: np.ndarray
    """Per class: when its last task (compute or comm) finished."""

    @property
    def step_us(self) -> float:
        return float(self.class_end.max()) if len(self.class_end) else 0.0

    @property
    def slowest_class(self) -> int:
        """The class that bounds the step: of those whose work ends last (a closing
        collective ends every rank together), the one with the most compute, i.e. the one
        the others waited for, not one that waited."""
        if not len(self.class_end):
            return 0
        end = float(self.class_end.max())
        last = np.flatnonzero(self.class_end >= end - 1e-9 * max(end, 1.0))
        if not len(last):  # not finite: the caller refuses such a step
            return int(np.argmax(self.class_end))
        busy = [float(np.sum(self.compute_durations(int(ci)))) for ci in last]
        return int(last[int(np.argmax(busy))])

    def compute_durations(self, ci: int) -> np.ndarray:
        return np.asarray(self.graph.programs[ci].dur, dtype=np.float64)

    def comm_times(self, ci: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(collective indices, starts, durations)`` on class ``ci``'s comm stream."""
        ks = np.fromiter((k for k, _ in self.graph.comm[ci]), dtype=np.int64,
                         count=len(self.graph.comm[ci]))
        cost = np.fromiter((c.cost_us for c in self.graph.collectives), dtype=np.float64,
                           count=len(self.graph.collectives))
        return ks, self.coll_start[ks], cost[ks]


def run_step(graph: StepGraph) -> StepResult:
    """Simulate one step of ``graph``; every stream starts idle at time 0.

    With a shared prefix (:attr:`StepGraph.prefix`) the prefix runs once, as a stand-in for
    every class (its collectives have that one member); each class then starts its compute
    stream when the prefix's compute is done and its comm stream when the prefix's comm is
    done (its own launches follow the prefix's compute in issue order, so they wait for it).
    """
    return _StepRun(graph).run()


class _Collectives:
    """Per collective of a graph: who has arrived, what it costs, when it started and done."""

    def __init__(self, graph: StepGraph, env: simpy.Environment) -> None:
        colls = graph.collectives
        self.arrived = [0] * len(colls)
        self.members = [len(c.members) for c in colls]
        self.cost = [c.cost_us for c in colls]
        self.straggle = [c.straggle for c in colls]
        self.start = [float("nan")] * len(colls)
        self.ready = [0.0] * len(colls)  # latest (arrival + straggle x compute) so far
        self.done = [env.event() for _ in colls]

    def check_all_ran(self, graph: StepGraph) -> None:
        """A collective that never started means the graph deadlocked: say which."""
        stuck = [k for k, ev in enumerate(self.done) if not ev.triggered]
        if not stuck:
            return
        k = stuck[0]
        c = graph.collectives[k]
        waiting = [graph.classes[m].rank for m in c.members]
        raise RuntimeError(
            f"step graph deadlocked: collective {c.op} ({c.stage} {c.layer!r}) never started; "
            f"{self.arrived[k]} of {self.members[k]} member classes arrived (member ranks "
            f"{waiting[:8]}{'...' if len(waiting) > 8 else ''}); {len(stuck)} collective(s) "
            "stuck in all"
        )


@dataclass
class _Program:
    """One compute+comm program to start: a class's own tasks, or the shared prefix."""

    durs: list[float]
    waits: list[tuple[int, ...]]
    items: list[tuple[int, int]]
    shift: int  # compute tasks that precede it (the prefix's, for a class after one)
    lead: float = 0.0  # compute before its first task since the last collective's launch


class _StepRun:
    """The SimPy processes of one step: a compute and a comm stream per simulated class."""

    def __init__(self, graph: StepGraph) -> None:
        self.graph = graph
        self.env = simpy.Environment()
        self.colls = _Collectives(graph, self.env)
        ncls = len(graph.classes)
        self.compute_end = [0.0] * ncls
        self.comm_end = [0.0] * ncls

    def run(self) -> StepResult:
        graph = self.graph
        n_pc, n_pl = graph.prefix
        shared = n_pc + n_pl > 0
        pre_end: tuple[list[float], list[float]] = ([0.0], [0.0])
        pre: tuple[_Plan, list[float]] | None = None
        first_c: simpy.Event | None = None
        first_m: tuple[simpy.Event, ...] = ()
        if shared:  # the prefix, once: each of its collectives has that one member
            for k, _ in graph.comm[0][:n_pl]:
                self.colls.members[k] = 1
            first_c, pre_m = self.env.event(), self.env.event()
            first_m = (pre_m, first_c)
            prefix = _Program(graph.programs[0].dur[:n_pc], graph.waits[0][:n_pc],
                              graph.comm[0][:n_pl], 0)
            pre = self._start(prefix, None, (), pre_end, 0, (first_c, pre_m))
        # the prefix's compute after its last collective's launch precedes a class's first one
        last = max((after for _, after in graph.comm[0][:n_pl]), default=0)
        lead = float(sum(graph.programs[0].dur[min(last, n_pc):n_pc])) if shared else 0.0
        plans = [self._start(_Program(graph.programs[ci].dur[n_pc:], graph.waits[ci][n_pc:],
                                      graph.comm[ci][n_pl:], n_pc, lead),
                             first_c, first_m, (self.compute_end, self.comm_end), ci)
                 for ci in range(len(graph.classes))]
        self.env.run()
        self.colls.check_all_ran(graph)
        head = _starts(*pre) if pre is not None else np.zeros(0)
        compute_start = [np.concatenate((head, _starts(*plan))) if shared else _starts(*plan)
                         for plan in plans]
        class_end = np.maximum(np.asarray(self.compute_end), np.asarray(self.comm_end))
        if shared:
            class_end = np.maximum(class_end, max(pre_end[0][0], pre_end[1][0]))
        return StepResult(graph=graph, compute_start=compute_start,
                          coll_start=np.asarray(self.colls.start, dtype=np.float64),
                          class_end=class_end)

    def _start(self, prog: _Program, first_c: simpy.Event | None,
               first_m: tuple[simpy.Event, ...], ends: tuple[list[float], list[float]], ci: int,
               finished: tuple[simpy.Event | None, simpy.Event | None] = (None, None)
               ) -> tuple[_Plan, list[float]]:
        """The compute and comm processes of ``prog``; returns its plan and the list its
        compute segments' start times land in."""
        local = [(k, after - prog.shift if after > prog.shift else 0) for k, after in prog.items]
        observed = {after for _, after in local if after}
        plan = _plan(prog.durs, prog.waits, observed)
        starts = [0.0] * len(plan.segments)
        signals = {k: self.env.event() for k in observed}
        self.env.process(self._compute_stream(plan.segments, starts, signals, first_c, ends[0],
                                              ci, finished[0]))
        self.env.process(self._comm_stream(local, _compute_between(prog, local), signals,
                                           first_m, ends[1], ci, finished[1]))
        return plan, starts

    def _compute_stream(self, segs: list[_Segment], starts: list[float],
                        signals: dict[int, simpy.Event], first: simpy.Event | None,
                        end: list[float], ci: int, finished: simpy.Event | None
                        ) -> Generator[simpy.Event, Any, None]:
        """Runs compute segments in order: each after the collectives it waits for, one
        timeout each, announcing the launches that follow it."""
        env, done = self.env, self.colls.done
        if first is not None and first.callbacks is not None:
            yield first
        for si, seg in enumerate(segs):
            for k in seg.waits:
                ev = done[k]
                if ev.callbacks is not None:
                    yield ev
            starts[si] = env.now
            if seg.total > 0:
                yield env.timeout(seg.total)
            if seg.signal:
                signals[seg.signal].succeed()
        end[ci] = env.now
        if finished is not None:
            finished.succeed()

    def _comm_stream(self, items: list[tuple[int, int]], work: list[float],
                     signals: dict[int, simpy.Event], first: tuple[simpy.Event, ...],
                     end: list[float], ci: int, finished: simpy.Event | None
                     ) -> Generator[simpy.Event, Any, None]:
        """Joins collectives in issue order, each once its launch's compute is done; each
        member raises the collective's ready time to its arrival plus the straggle of its own
        compute since its previous collective (``work``); the last member to arrive waits until
        then, runs the collective and wakes the others."""
        env, c = self.env, self.colls
        arrived, members, cost, straggle, done = c.arrived, c.members, c.cost, c.straggle, c.done
        ready = c.ready
        for ev in first:
            if ev.callbacks is not None:
                yield ev
        for (k, after), w in zip(items, work):
            if after:
                ev = signals[after]
                if ev.callbacks is not None:
                    yield ev
            a = arrived[k] + 1
            arrived[k] = a
            r = env.now + straggle[k] * w
            if a == 1 or r > ready[k]:
                ready[k] = r
            if a == members[k]:
                late = ready[k] - env.now
                if late > 0:
                    yield env.timeout(late)
                c.start[k] = env.now
                if cost[k] > 0:
                    yield env.timeout(cost[k])
                done[k].succeed()
            else:
                ev = done[k]
                if ev.callbacks is not None:
                    yield ev
        end[ci] = env.now
        if finished is not None:
            finished.succeed()


def _compute_between(prog: _Program, local: list[tuple[int, int]]) -> list[float]:
    """Per collective of ``prog`` (in issue order): the compute its stream runs after the
    previous collective's launch and before this one's (``prog.lead`` before the first)."""
    done = np.concatenate(([0.0], np.cumsum(np.asarray(prog.durs, dtype=np.float64))))
    out: list[float] = []
    prev, carry = 0, prog.lead
    for _, after in local:
        if after > prev:
            out.append(carry + float(done[after] - done[prev]))
            prev, carry = after, 0.0
        else:  # launched right after the previous one: no compute in between
            out.append(carry)
            carry = 0.0
    return out


def _starts(plan: _Plan, seg_starts: list[float]) -> npt.NDArray[np.float64]:
    if not len(plan.seg_of):
        return np.zeros(0)
    return np.asarray(seg_starts, dtype=np.float64)[plan.seg_of] + plan.offset
