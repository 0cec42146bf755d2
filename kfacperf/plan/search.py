"""The search: for each GPU count and optimizer (SGD; K-FAC over its strategies), the
configuration with the least time to solution, simulating as little as the answer allows.

Time to solution of a configuration = steps to the target at its global batch (the
convergence model) x its mean step time (the simulator, over a cycle of step kinds).  Per GPU
count and optimizer the search runs best first over *settings* (configurations without their
intervals, :mod:`kfacperf.plan.space`), in this order of rules:

1. **Merge what is identical** (:mod:`kfacperf.plan.space`): settings whose step is the same
   by construction are simulated once.
2. **Memory first**: a setting whose memory per GPU (:func:`kfacperf.plan.memory.memory_per_gpu`)
   exceeds the usable device memory is dropped before anything else is computed for it.
3. **Statistics no staler than the data**: interval pairs staler than the convergence
   model's at that batch are dropped (and, on request, batches outside the data).
4. **Simulate each kind of step once**: a cycle of intervals F/I is one *inverse* step,
   ``I/F - 1`` *factor* steps and the rest *plain* steps, and its mean step time is their
   weighted mean, so every interval pair of a setting comes from at most three simulated
   steps.  A plain step communicates no factors, so it is simulated once for all factor
   precisions and packings of a setting; layer costs and placements are cached per GPU
   count and batch.
5. **Prune by a lower bound**: each setting has a lower bound on its best time to solution,
   and the settings wait in a priority queue ordered by (bound, grid order).  The first is
   refined — its next kind of step simulated, plain before factor before inverse — and put
   back with the tighter bound; once all its kinds are simulated the bound is exact.  The
   first exact setting to leave the queue is the optimum: every other setting's bound, hence
   its true time, is at least as large (ties go to the earlier setting in the grid, as an
   exhaustive search in grid order would choose).  A kind of step not yet simulated is
   bounded below by

   * the compute every rank runs in series on its compute stream: forward and backward
     (slower on factor steps by the statistics capture), the update and the optimizer's
     host work, every layer's batch statistics on factor and inverse steps, and the
     inversions and preconditioning of the most loaded rank (every rank runs all of these
     in the simulator's step graphs, one after another);
   * and, where no rank waits on a straggler (the cluster's straggler is 0), by the
     simulated time of a kind that does a subset of its work: a factor step is a plain step
     with tasks added and forward/backward no shorter, an inverse step a factor step with
     tasks added.  In the engine every start is a maximum over finish times of what
     precedes it (its stream, its dependencies, a collective's members), so adding tasks or
     lengthening them delays nothing less.  A straggler's delay depends on the compute a
     rank ran since its previous collective, which added collectives split, so this rule
     is off then.

Only the best configuration per GPU count and optimizer is kept (ask for one strategy to get
its own best).  The Pareto front of time
against GPU-hours needs no more: at one GPU count GPU-hours are proportional to time, so only
the fastest configuration of a GPU count can lie on the front.
"""
from __future__ import annotations

import heapq
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kfacperf import vocab as S
from kfacperf.plan.convergence import ConvergenceModel, StepsEstimate, optimizer_of
from kfacperf.plan.memory import GB, MemoryBreakdown, memory_per_gpu, placement_for
from kfacperf.plan.space import PlanSpace, Setting, settings
from kfacperf.sim.engine import run_step
from kfacperf.sim.graphs.layer_costs import layer_costs
from kfacperf.sim.graphs.placement import Placement
from kfacperf.sim.graphs.strategies import StrategySpec, build_graph, make_step
from kfacperf.sim.graphs.strategies.common import (
    CommSettings,
    LayerCosts,
    StepSpec,
    comm_settings,
)
from kfacperf.sim.summary import cycle
from kfacperf.vocab import FACTOR_STEP, INVERSE_STEP, PLAIN_STEP, StepKind

_StepKey = tuple[str, int, int, float | None, tuple[str | None, bool | None] | None, str]

KIND_ORDER: tuple[StepKind, ...] = (PLAIN_STEP, FACTOR_STEP, INVERSE_STEP)


@dataclass
class SearchStats:
    """How many configurations the search met, and what became of them.

    ``configurations = identical + over_memory + beyond_data + evaluated + bounded``:
    merged into another, dropped for memory, staler than (or, on request, outside) the
    convergence data, evaluated exactly, or never simulated in full because their lower
    bound could not beat the best.  ``simulated_steps`` counts engine runs.
    """

    configurations: int = 0
    identical: int = 0
    over_memory: int = 0
    beyond_data: int = 0
    bounded: int = 0
    evaluated: int = 0
    simulated_steps: int = 0
    seconds: float = 0.0

    def add(self, other: SearchStats) -> None:
        for key in self.__dataclass_fields__:
            setattr(self, key, getattr(self, key) + getattr(other, key))


@dataclass(frozen=True, kw_only=True)
class Evaluated:
    """The best interval pair of one setting, exactly."""

    setting: Setting
    world_size: int
    intervals: tuple[int, int] | None  # None for SGD
    step_us: float
    kind_step_us: dict[str, float]
    estimate: StepsEstimate
    memory: MemoryBreakdown

    @property
    def time_s(self) -> float:
        return self.estimate.steps * self.step_us / 1e6


@dataclass
class _Candidate:
    """A setting in the queue: what is known about its kinds of step."""

    index: int
    setting: Setting
    estimate: StepsEstimate
    memory: MemoryBreakdown
    pairs: list[tuple[int, int]]  # allowed intervals (one dummy pair for SGD)
    needed: list[StepKind]
    known: dict[str, float] = field(default_factory=dict)

    @property
    def exact(self) -> bool:
        return all(k.name in self.known for k in self.needed)


def mean_step_us(times: dict[str, float], factor_interval: int, inverse_interval: int) -> float:
    """The mean step over a cycle, from the time of each kind of step."""
    steps = cycle(factor_interval, inverse_interval)
    return sum(cs.weight * times[cs.kind.name] for cs in steps) / inverse_interval


class GpuCountSearch:
    """Everything one GPU count's search shares: cost model, layer costs, placements, steps."""

    def __init__(self, *, workload: Any, cost: Any, gpus_per_node: int, world_size: int,
                 space: PlanSpace, convergence: dict[str, ConvergenceModel],
                 capacity_bytes: float, dtype: str, inverse_method: str, extrapolate: bool,
                 prune: bool = True) -> None:
        self.workload, self.space, self.world_size = workload, space, world_size
        self.convergence, self.capacity = convergence, capacity_bytes
        self.dtype, self.inverse_method, self.extrapolate = dtype, inverse_method, extrapolate
        self.prune = prune
        self.gpus_per_node = gpus_per_node
        self.cost = cost.for_gpus(world_size) if hasattr(cost, "for_gpus") else cost
        self.bn_blocks: str = self.cost.bn_blocks  # the Fisher blocks of the step graphs
        self.straggle = cost.host.straggle
        self.monotone = self.straggle(2) == 0.0
        self._layer_costs: dict[int, LayerCosts] = {}
        self._placements: dict[tuple[str, int], Placement | None] = {}
        # (strategy, grad workers, batch per GPU, bucket MB, (comm dtype, symmetric), step kind)
        self._steps: dict[_StepKey, float] = {}
        self._dropped = {"memory": 0, "data": 0}
        self._least_memory: tuple[float, str] | None = None  # (bytes, label) over capacity
        self.stats = SearchStats()
        self.reasons: dict[str, str] = {}

    # ---------------------------------------------------------------- cached pieces
    def layer_costs(self, batch: int) -> LayerCosts:
        lc = self._layer_costs.get(batch)
        if lc is None:
            lc = self._layer_costs[batch] = layer_costs(self.cost, self.workload, batch=batch)
        return lc

    def placement(self, s: Setting) -> Placement | None:
        key = (s.strategy, s.grad_workers)
        if key not in self._placements:
            self._placements[key] = placement_for(
                self.workload, s.strategy, self.world_size, s.grad_workers or 1,
                bn_blocks=self.bn_blocks, placement=self.comm(s).placement)
        return self._placements[key]

    def comm(self, s: Setting) -> CommSettings:
        bucket = s.bucket_mb if s.bucket_mb is not None else self.space.bucket_mb[0]
        return comm_settings(self.cost.options, bucket_mb=bucket,
                             factor_dtype=s.comm_dtype or "fp32", symmetric=bool(s.symmetric),
                             inverse_method=self.inverse_method)

    def step_us(self, s: Setting, kind: StepKind) -> float:
        """One simulated step of ``kind`` (cached; a plain step for every comm setting)."""
        comm_key = None if kind is PLAIN_STEP else (s.comm_dtype, s.symmetric)
        key = (s.strategy, s.grad_workers, s.batch_per_gpu, s.bucket_mb, comm_key, kind.name)
        t = self._steps.get(key)
        if t is None:
            p = self.world_size
            spec = (StrategySpec(S.KAISA, s.grad_workers / p) if s.strategy == S.KAISA
                    else StrategySpec(s.strategy))
            step = make_step(spec, StepSpec(costs=self.layer_costs(s.batch_per_gpu),
                                            world_size=p, gpus_per_node=self.gpus_per_node,
                                            kind=kind, comm=self.comm(s)))
            cost = self.cost

            def coll(op: str, nbytes: Any, size: int, nodes: int) -> float:
                return float(cost.collective_us(op, nbytes, group_size=size, nodes=nodes))

            t = self._steps[key] = run_step(build_graph(step, coll, straggle=self.straggle)).step_us
            self.stats.simulated_steps += 1
        return t

    # ---------------------------------------------------------------- bounds
    def compute_bound(self, s: Setting, kind: StepKind) -> float:
        """The compute every rank runs in series in a step of ``kind`` (a lower bound)."""
        lc = self.layer_costs(s.batch_per_gpu)
        fwd, bwd = sum(lc.fwd), sum(lc.bwd)
        if s.strategy == S.SGD:
            return fwd + bwd + lc.update
        base = lc.update + lc.grad_load + lc.grad_write
        if kind.factor:
            base += fwd * lc.fwd_capture + bwd * lc.bwd_capture + sum(lc.factor)
        else:
            base += fwd + bwd
        pl = self.placement(s)
        assert pl is not None
        pre: dict[int, float] = {}
        for l, c in enumerate(pl.column):
            pre[c] = pre.get(c, 0.0) + lc.precond[l]
        worst = max(pre.values(), default=0.0)
        if kind.inverse:
            inv: dict[int, float] = {}
            for l, r in enumerate(pl.inverse_worker):
                inv[r] = inv.get(r, 0.0) + lc.inverse[l]
            cols = pl.cols
            worst = max([worst] + [t + pre.get(r % cols, 0.0) for r, t in inv.items()])
        return base + worst

    def kind_bound(self, c: _Candidate, kind: StepKind) -> float:
        if kind.name in c.known:
            return c.known[kind.name]
        bound = self.compute_bound(c.setting, kind)
        if self.monotone:
            for smaller in KIND_ORDER[:KIND_ORDER.index(kind)]:
                if smaller.name in c.known:
                    bound = max(bound, c.known[smaller.name])
        return bound

    def time_bound(self, c: _Candidate) -> tuple[float, tuple[int, int] | None]:
        """(lower bound on the best time to solution, its interval pair): exact once every
        needed kind is simulated."""
        times = {k.name: self.kind_bound(c, k) for k in c.needed}
        if c.setting.strategy == S.SGD:
            return c.estimate.steps * times[PLAIN_STEP.name] / 1e6, None
        best = min(c.pairs, key=lambda p: (mean_step_us(times, *p), c.pairs.index(p)))
        return c.estimate.steps * mean_step_us(times, *best) / 1e6, best

    # ---------------------------------------------------------------- the search
    def candidates(self, strategy: str, first_index: int) -> list[_Candidate]:
        """Every setting of ``strategy`` that fits and has allowed intervals, counted."""
        model = self.convergence[optimizer_of(strategy)]
        out: list[_Candidate] = []
        st = self.stats
        for s in settings(self.space, strategy, self.world_size):
            est = model.at(self.world_size * s.batch_per_gpu)
            pairs = self._pairs(strategy, est)
            st.configurations += s.stands_for * len(pairs)
            st.identical += (s.stands_for - 1) * len(pairs)
            mem = memory_per_gpu(self.workload, strategy=strategy, world_size=self.world_size,
                                 batch_per_gpu=s.batch_per_gpu, grad_workers=s.grad_workers or 1,
                                 comm=self.comm(s), dtype=self.dtype, placement=self.placement(s),
                                 bn_blocks=self.bn_blocks)
            if mem.total > self.capacity:
                st.over_memory += len(pairs)
                self._dropped["memory"] += 1
                if self._least_memory is None or mem.total < self._least_memory[0]:
                    self._least_memory = (mem.total, f"{s.label(self.world_size)} "
                                                     f"b{s.batch_per_gpu}")
                continue
            allowed = [p for p in pairs if est.allows(*p)]
            if not allowed or (est.extrapolated and not self.extrapolate):
                st.beyond_data += len(pairs)
                self._dropped["data"] += 1
                continue
            if not est.usable:
                raise ValueError(
                    f"convergence model {model.name!r} gives {est.steps:.3g} steps at global "
                    f"batch {est.global_batch:,} (its power law through batches "
                    f"{', '.join(f'{b:,}' for b in est.basis)}"
                    f"{', extrapolated' if est.extrapolated else ''}), not a usable number of "
                    "steps (fewer than one, or too many); add a point nearer that batch, or "
                    "plan with --no-extrapolate")
            st.beyond_data += len(pairs) - len(allowed)
            needed = ([PLAIN_STEP] if strategy == S.SGD else
                      [k for k in KIND_ORDER if any(cs.kind == k for p in allowed
                                                    for cs in cycle(*p))])
            out.append(_Candidate(index=first_index + len(out), setting=s, estimate=est,
                                  memory=mem, pairs=allowed, needed=needed))
        return out

    def _pairs(self, strategy: str, est: StepsEstimate) -> list[tuple[int, int]]:
        """The grid's interval pairs, plus the data's own stalest pair at this batch."""
        if strategy == S.SGD:
            return [(1, 1)]
        pairs = list(self.space.intervals)
        f, i = est.max_factor_interval, est.max_inverse_interval
        if f is not None and i is not None:
            own = (f, f * (i // f))
            if own not in pairs:
                pairs.append(own)
        return pairs

    def _none_left_reason(self) -> str:
        """Why no configuration is left; over memory, what the smallest one needed."""
        if not self._dropped["memory"]:
            return ("no configuration within the convergence data (batch, or statistics "
                    "staler than measured)")
        need = ""
        if self._least_memory is not None:
            total, label = self._least_memory
            need = (f": the smallest, {label}, needs {total / GB:.3g} GB per GPU where "
                    f"{self.capacity / GB:.3g} GB may be used (a smaller --batch-per-gpu, "
                    "--dtype bf16, or --memory-gb / --memory-fraction)")
        where = " within the convergence data" if self._dropped["data"] else ""
        return f"nothing fits in memory{where}{need}"

    def best(self, optimizer: str) -> Evaluated | None:
        """The configuration of ``optimizer``'s strategies (``sgd``, or ``spngd`` and
        ``kaisa`` for ``kfac``) with the least time to solution; None, with
        :attr:`reasons` saying why, when no configuration is left."""
        self._dropped, self._least_memory = {"memory": 0, "data": 0}, None
        queue: list[_Candidate] = []
        for strategy in self.space.strategies:
            if optimizer_of(strategy) == optimizer:
                queue += self.candidates(strategy, len(queue))
        if not queue:
            self.reasons[optimizer] = self._none_left_reason()
            return None
        if not self.prune:
            for c in queue:
                for k in c.needed:
                    c.known[k.name] = self.step_us(c.setting, k)
        heap = [(self.time_bound(c)[0], c.index, c) for c in queue]
        heapq.heapify(heap)
        while True:
            _, _, c = heapq.heappop(heap)
            if c.exact:
                rest = [x for _, _, x in heap]
                self.stats.evaluated += len(c.pairs) + sum(len(x.pairs) for x in rest if x.exact)
                self.stats.bounded += sum(len(x.pairs) for x in rest if not x.exact)
                return self._evaluated(c)
            kind = next(k for k in c.needed if k.name not in c.known)
            c.known[kind.name] = self.step_us(c.setting, kind)
            heapq.heappush(heap, (self.time_bound(c)[0], c.index, c))

    def _evaluated(self, c: _Candidate) -> Evaluated:
        _, pair = self.time_bound(c)
        times = dict(c.known)
        step = times[PLAIN_STEP.name] if pair is None else mean_step_us(times, *pair)
        if pair is not None:  # only the kinds of step the chosen intervals' cycle has
            kinds = {k.kind.name for k in cycle(*pair)}
            times = {name: t for name, t in times.items() if name in kinds}
        return Evaluated(setting=c.setting, world_size=self.world_size, intervals=pair,
                         step_us=step, kind_step_us=times, estimate=c.estimate,
                         memory=c.memory)


def search(*, workload: Any, cost: Any, gpus_per_node: int, space: PlanSpace,
           convergence: dict[str, ConvergenceModel], capacity_bytes: float, dtype: str,
           inverse_method: str, extrapolate: bool = True, prune: bool = True,
           progress: Callable[[str], None] | None = None,
           ) -> tuple[dict[tuple[int, str], Evaluated | str], SearchStats]:
    """The best configuration per (GPU count, optimizer) over ``space`` (see the module
    docstring), or why there is none; ``convergence`` maps each optimizer family of the
    space's strategies to its convergence model."""
    out: dict[tuple[int, str], Evaluated | str] = {}
    total = SearchStats()
    start = time.perf_counter()
    optimizers = list(dict.fromkeys(optimizer_of(s) for s in space.strategies))
    for n, p in enumerate(space.gpus, 1):
        t0 = time.perf_counter()
        g = GpuCountSearch(workload=workload, cost=cost, gpus_per_node=gpus_per_node,
                           world_size=p, space=space, convergence=convergence,
                           capacity_bytes=capacity_bytes, dtype=dtype,
                           inverse_method=inverse_method, extrapolate=extrapolate, prune=prune)
        for optimizer in optimizers:
            found = g.best(optimizer)
            out[(p, optimizer)] = found if found is not None else g.reasons[optimizer]
        total.add(g.stats)
        if progress is not None:
            progress(f"plan: {p:,} GPUs ({n}/{len(space.gpus)}): "
                     f"{g.stats.configurations:,} configurations, "
                     f"{g.stats.simulated_steps} steps simulated, "
                     f"{time.perf_counter() - t0:.1f} s "
                     f"(total {time.perf_counter() - start:.1f} s)")
    total.seconds = time.perf_counter() - start
    return out, total
