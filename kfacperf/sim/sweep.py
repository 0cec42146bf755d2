"""The simulator's library API: workload x device x cluster x strategies x GPU counts.

::

    from kfacperf.sim.sweep import simulate
    pred = simulate("resnet50", "h100", "dgx-h100-ndr", ["sgd", "spngd", "kaisa"],
                    gpus=[1, 8, 64, 512, 4096], batch_per_gpu=32,
                    factor_interval=10, inverse_interval=100, bandwidth_scale=0.5)
    pred.summary          # one row per (strategy, gpus)

For every (strategy, GPU count) each distinct kind of step of a cycle (inverse, factor-only,
plain) is built as a step graph over the strategy's symmetry classes and run once on the
engine; the steady state is the cycle-weighted mean (:mod:`kfacperf.sim.summary`).
Keyword arguments beyond the named ones are what-if overrides of the cost model
(:class:`kfacperf.sim.costs.model.CostOptions`: ``bandwidth_scale``, ``alpha_scale``,
``compute_scale``, ``comm_dtype``, ``symmetric_factors``, ``inverse_method``, ``dtype``,
``v_form``, ``bn_blocks``, ``fisher``, ...).  This module never imports torch.
"""
from __future__ import annotations

import datetime
import math
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kfacperf import vocab as S
from kfacperf.sim.costs.interface import StepCosts
from kfacperf.sim.engine import StepResult, run_step
from kfacperf.sim.graphs.graph import Bytes, CollectiveCost
from kfacperf.sim.graphs.layer_costs import layer_costs
from kfacperf.sim.graphs.placement import grad_workers
from kfacperf.sim.graphs.strategies import (
    StrategySpec,
    build_graph,
    make_step,
    parse_strategy,
)
from kfacperf.sim.graphs.strategies.common import (
    CommSettings,
    LayerCosts,
    StepSpec,
    comm_settings,
)
from kfacperf.sim.models.cluster import ClusterModel
from kfacperf.sim.models.device import DeviceModel
from kfacperf.sim.models.workload import WorkloadModel
from kfacperf.sim.prediction import Prediction
from kfacperf.sim.progress import SweepProgress
from kfacperf.sim.summary import CycleStep, EventColumns, cycle, summarize_point
from kfacperf.trace.arguments import one_or_many

MAX_GPUS = 2**20
"""The largest GPU count simulated (1,048,576): beyond the largest clusters built, and a
point there takes seconds and a few hundred MB (simulated memory grows with the count)."""

MAX_STEP_US = 3.15e13
"""A predicted step longer than a year (in µs) is a sign of inputs out of range, not a
result: :func:`check_summary_finite` refuses it."""


def check_gpus(gpus: Sequence[int] | int) -> list[int]:
    """Sorted distinct GPU counts (one count may be given alone); each must be an integer
    from 1 to :data:`MAX_GPUS`."""
    if isinstance(gpus, (int, np.integer)) and not isinstance(gpus, bool):
        gpus = [int(gpus)]
    if isinstance(gpus, (str, bytes)) or not isinstance(gpus, Sequence | np.ndarray):
        raise ValueError(f"GPU counts must be a list of integers, got {gpus!r}")
    if not len(gpus):
        raise ValueError("no GPU counts given")
    out = set()
    for g in gpus:
        if isinstance(g, bool) or not isinstance(g, (int, np.integer)) or g < 1:
            raise ValueError(f"number of GPUs must be a positive integer, got {g!r}")
        if g > MAX_GPUS:
            raise ValueError(f"number of GPUs {g:,} is above the largest simulated, "
                             f"{MAX_GPUS:,}")
        out.add(int(g))
    return sorted(out)


def check_summary_finite(summary: Any) -> None:
    """A ``ValueError`` naming the point when a predicted time is NaN, infinite, negative or
    above :data:`MAX_STEP_US`: such a number comes from inputs out of range (a model value
    near 0 or 1e300), and is never printed as a result."""
    for row in summary.itertuples(index=False):
        for col in ("step_us", "compute_us", "comm_us", "exposed_comm_us"):
            v = float(getattr(row, col))
            if not (math.isfinite(v) and 0 <= v <= MAX_STEP_US):
                raise ValueError(
                    f"the prediction for {row.strategy} on {int(row.gpus):,} GPUs has {col} = "
                    f"{v:g} µs, which is not a usable result (not finite, negative, or over a "
                    "year per step); check the model values and what-if flags for numbers near "
                    "0 or huge ones")


def check_strategies(strategies: Sequence[str | StrategySpec], fraction: float
                     ) -> list[StrategySpec]:
    strategies = one_or_many(strategies, (str, StrategySpec), what="strategies",
                             expected="a strategy name (sgd, spngd, kaisa:f)")
    if not strategies:
        raise ValueError("no strategy given")
    specs = [s if isinstance(s, StrategySpec) else parse_strategy(s, default_fraction=fraction)
             for s in strategies]
    seen: dict[tuple[str, float | None], str] = {}
    for s in specs:  # kaisa:0.5 and kaisa:1/2, kaisa:0 and kaisa:mem-opt are one strategy
        key = (s.name, s.fraction)
        if key in seen:
            same = s.label if seen[key] == s.label else f"{seen[key]} and {s.label}"
            raise ValueError(f"strategy given twice: {same}")
        seen[key] = s.label
    return specs


def check_fractions_fit(specs: Sequence[StrategySpec], gpus: Sequence[int]) -> None:
    """Refuse a KAISA fraction that gives no whole number of gradient workers at some of the
    GPU counts, naming those counts and the range where it fits."""
    for s in specs:
        if s.name != S.KAISA or not s.fraction:  # kaisa:mem-opt (0) fits every count
            continue
        bad = []
        for p in gpus:
            try:
                grad_workers(p, s.fraction)
            except ValueError:
                bad.append(p)
        if not bad:
            continue
        if len(bad) == len(gpus):
            grad_workers(bad[0], s.fraction)  # its own message: what is valid there
        good = [p for p in gpus if p not in bad]
        shown = ", ".join(f"{p:,}" for p in bad[:6]) + (", ..." if len(bad) > 6 else "")
        raise ValueError(
            f"strategy {s.label} (f = {s.fraction:g}) gives no whole number of gradient workers "
            f"dividing the GPUs at {shown} GPU(s) (f x GPUs must be an integer that divides "
            f"the GPU count); give --gpus counts where it fits (the first here is "
            f"{good[0]:,}), or kaisa:mem-opt, which fits every count")


class _Point:
    """One (strategy, GPU count): its cycle of simulated steps."""

    def __init__(self, spec: StrategySpec, gpus: int, steps: list[tuple[CycleStep, StepResult]],
                 memory: tuple[int, int]) -> None:
        self.spec, self.gpus, self.steps, self.memory = spec, gpus, steps, memory
        self.summary = summarize_point(steps)


class _PointRunner:
    """Simulates the points of one sweep: one workload, cost model and step settings."""

    def __init__(self, workload: WorkloadModel, cost: StepCosts, *, gpus_per_node: int,
                 batch_per_gpu: int, factor_interval: int, inverse_interval: int,
                 comm: CommSettings) -> None:
        self.workload, self.cost, self.gpus_per_node = workload, cost, gpus_per_node
        self.batch_per_gpu, self.comm = batch_per_gpu, comm
        self.factor_interval, self.inverse_interval = factor_interval, inverse_interval
        self.straggle = cost.host.straggle
        self._costs: dict[Hashable, tuple[LayerCosts, CollectiveCost]] = {}

    def costs_for(self, p: int) -> tuple[LayerCosts, CollectiveCost]:
        """Layer costs and the collective cost function on ``p`` GPUs."""
        model = self.cost.for_gpus(p)
        # models with equal options are interchangeable: reuse the first (and its caches)
        hit = self._costs.get(model.options)
        if hit is None:
            lc = layer_costs(model, self.workload, batch=self.batch_per_gpu)

            def coll(op: str, nbytes: Bytes, size: int, nodes: int,
                     _m: StepCosts = model) -> float:
                return float(_m.collective_us(op, nbytes, group_size=size, nodes=nodes))

            hit = self._costs[model.options] = (lc, coll)
        return hit

    def __call__(self, spec: StrategySpec, p: int) -> _Point:
        """Run each kind of step of the cycle of ``spec`` on ``p`` GPUs."""
        lc, coll = self.costs_for(p)
        steps, memory = [], (0, 0)
        for cs in cycle(self.factor_interval, self.inverse_interval, kfac=spec.name != S.SGD):
            step = make_step(spec, StepSpec(costs=lc, world_size=p,
                                            gpus_per_node=self.gpus_per_node, kind=cs.kind,
                                            comm=self.comm))
            steps.append((cs, run_step(build_graph(step, coll, straggle=self.straggle))))
            memory = step.memory()
        return _Point(spec, p, steps, memory)


def _single_gpu_step_us(points: Sequence[_Point], specs: Sequence[StrategySpec],
                        run: _PointRunner) -> dict[str, float]:
    """Per strategy label, its step time on one GPU: the base of its scaling efficiency.

    When 1 is not among the GPU counts the point is simulated here (KAISA with fraction 1,
    the only fraction one GPU allows)."""
    single: dict[str, float] = {}
    for s in specs:
        base = next((pt for pt in points if pt.spec == s and pt.gpus == 1), None)
        if base is None:
            one = s if s.name != S.KAISA else StrategySpec(S.KAISA, 1.0, s.label)
            base = run(one, 1)
        single[s.label] = base.summary.step_us
    return single


def _summary_row(pt: _Point, sgd: dict[int, float], single: dict[str, float],
                 batch_per_gpu: int) -> dict[str, Any]:
    """The summary row of ``pt``, given SGD's step time per GPU count and each strategy's on
    one GPU."""
    sm = pt.summary
    f = math.nan
    if pt.spec.name == S.KAISA:
        f = pt.spec.fraction if pt.spec.fraction else 1.0 / pt.gpus
    return {
        "strategy": pt.spec.label, "gpus": pt.gpus, "step_us": sm.step_us,
        "compute_us": sm.compute_us, "comm_us": sm.comm_us,
        "exposed_comm_us": sm.exposed_comm_us,
        "kfac_overhead": sm.step_us / sgd[pt.gpus] if pt.gpus in sgd else math.nan,
        "scaling_efficiency": single[pt.spec.label] / sm.step_us if sm.step_us > 0 else 1.0,
        "factor_bytes_per_gpu": pt.memory[0], "inverse_bytes_per_gpu": pt.memory[1],
        "batch_per_gpu": batch_per_gpu,
        "inverse_step_us": sm.kind_step_us.get("inverse", math.nan),
        "factor_step_us": sm.kind_step_us.get("factor", math.nan),
        "plain_step_us": sm.kind_step_us.get("plain", math.nan),
        "grad_worker_fraction": f, "classes": sm.classes,
    }


class _Tables:
    """The rows of a prediction's tables, gathered point by point."""

    def __init__(self, *, events: bool) -> None:
        self.events = events
        self.rows: list[dict[str, Any]] = []
        self.stage_rows: list[tuple[str, int, str, str, float]] = []
        self.class_rows: list[tuple[str, int, int, int, int]] = []
        self.ev = EventColumns()
        self.ev_keys: list[tuple[str, int, int]] = []

    def add(self, pt: _Point, row: dict[str, Any]) -> None:
        """Add ``pt`` with its summary ``row``; its steps' events follow one another in time."""
        self.rows.append(row)
        for (stage, layer), t in pt.summary.stage_times.items():
            self.stage_rows.append((pt.spec.label, pt.gpus, stage, layer, t))
        offset = 0.0
        for cs, res in pt.steps:
            for c in res.graph.classes:
                self.class_rows.append((pt.spec.label, pt.gpus, cs.step, c.rank, c.count))
            if self.events:
                self.ev_keys.append((pt.spec.label, pt.gpus,
                                     self.ev.add_step(res, cs.step, offset)))
            offset += res.step_us

    def frames(self) -> tuple[Any, Any, Any]:
        """The summary (checked finite), stage-time and class data frames."""
        import pandas as pd

        summary = pd.DataFrame(self.rows)
        summary["gpus"] = summary["gpus"].astype("int64")
        check_summary_finite(summary)
        stage_times = pd.DataFrame(self.stage_rows, columns=["strategy", "gpus", "stage",
                                                             "layer", "time_us"])
        stage_times["gpus"] = stage_times["gpus"].astype("int64")
        classes = pd.DataFrame(self.class_rows,
                               columns=["strategy", "gpus", "step", "rank", "ranks"])
        return summary, stage_times, classes

    def events_frame(self) -> Any:
        return _events_frame(self.ev, self.ev_keys)


def _run_info(
    meta: dict[str, Any] | None, workload: WorkloadModel, specs: Sequence[StrategySpec], *,
    gpu_list: list[int], gpus_per_node: int, batch_per_gpu: int, factor_interval: int,
    inverse_interval: int, grad_worker_fraction: float, comm: CommSettings,
) -> dict[str, Any]:
    """``meta`` plus the settings of the run, for :attr:`Prediction.meta`."""
    info = dict(meta or {})
    info.update({
        "strategies": [{"label": s.label, "name": s.name, "grad_worker_fraction": s.fraction}
                       for s in specs],
        "gpus": gpu_list, "gpus_per_node": gpus_per_node, "batch_per_gpu": batch_per_gpu,
        "factor_interval": factor_interval, "inverse_interval": inverse_interval,
        "intervals": {"factor": factor_interval, "inverse": inverse_interval},
        "grad_worker_fraction": grad_worker_fraction,
        "comm": {"factor_dtype": comm.factor_dtype, "symmetric": comm.symmetric,
                 "inverse_method": comm.inverse_method,
                 "factor_bucket_mb": comm.factor_bucket_mb, "ddp_bucket_mb": comm.ddp_bucket_mb},
        "step_kinds": [{"kind": c.kind.name, "step": c.step, "weight": c.weight}
                       for c in cycle(factor_interval, inverse_interval)],
    })
    info.setdefault("workload", workload.name)
    return info


def simulate_with_costs(
    workload: WorkloadModel, cost: StepCosts, *, gpus_per_node: int,
    strategies: Sequence[str | StrategySpec] = (S.SGD, S.SPNGD, S.KAISA),
    gpus: Sequence[int] | int = (1,), batch_per_gpu: int = 32, factor_interval: int = 1,
    inverse_interval: int = 1, grad_worker_fraction: float = 1.0,
    comm: CommSettings | None = None, events: bool = True, meta: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Prediction:
    """:func:`simulate` with a ready cost model (:class:`~kfacperf.sim.costs.model.CostModel`
    or any other :class:`~kfacperf.sim.costs.interface.StepCosts`); ``progress`` takes a
    line now and then on a long sweep (:class:`~kfacperf.sim.progress.SweepProgress`)."""
    gpu_list = check_gpus(gpus)
    specs = check_strategies(strategies, grad_worker_fraction)
    check_fractions_fit(specs, gpu_list)
    cycle(factor_interval, inverse_interval)  # validates the intervals
    comm = comm or CommSettings()
    if isinstance(batch_per_gpu, bool) or not isinstance(batch_per_gpu, int) or batch_per_gpu < 1:
        raise ValueError(f"batch per GPU must be a positive integer, got {batch_per_gpu!r}")
    run = _PointRunner(workload, cost, gpus_per_node=gpus_per_node, batch_per_gpu=batch_per_gpu,
                       factor_interval=factor_interval, inverse_interval=inverse_interval,
                       comm=comm)

    tick = SweepProgress(progress, len(specs) * len(gpu_list))
    # inputs out of range make infinities; check_summary_finite reports them, numpy need not
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        points = [tick.done(run(s, p), s.label, p) for s in specs for p in gpu_list]
    single = _single_gpu_step_us(points, specs, run)
    sgd = {pt.gpus: pt.summary.step_us for pt in points if pt.spec.name == S.SGD}

    tables = _Tables(events=events)
    for pt in points:
        tables.add(pt, _summary_row(pt, sgd, single, batch_per_gpu))
    summary, stage_times, classes = tables.frames()
    info = _run_info(meta, workload, specs, gpu_list=gpu_list, gpus_per_node=gpus_per_node,
                     batch_per_gpu=batch_per_gpu, factor_interval=factor_interval,
                     inverse_interval=inverse_interval,
                     grad_worker_fraction=grad_worker_fraction, comm=comm)
    return Prediction(meta=info, summary=summary, stage_times=stage_times,
                      events=tables.events_frame(), classes=classes)


def _events_frame(ev: EventColumns, keys: list[tuple[str, int, int]]) -> Any:
    import pandas as pd

    from kfacperf.vocab import LANES, STAGE_NAMES

    labels = list(dict.fromkeys(k for k, _, _ in keys))
    counts = [n for _, _, n in keys]
    strategy = np.repeat(np.asarray([labels.index(k) for k, _, _ in keys], dtype=np.int32),
                         counts) if keys else np.zeros(0, dtype=np.int32)
    gpus = np.repeat(np.asarray([g for _, g, _ in keys], dtype=np.int32), counts) \
        if keys else np.zeros(0, dtype=np.int32)

    def cat(codes: np.ndarray, categories: Sequence[str]) -> Any:
        return pd.Categorical.from_codes(codes, categories=list(categories))

    return pd.DataFrame({
        "rank": ev.column("rank", "int32"), "step": ev.column("step", "int32"),
        "stage": cat(ev.column("stage", "int16"), STAGE_NAMES),
        "layer": cat(ev.column("layer", "int32"), ev.layers),
        "lane": cat(ev.column("lane", "int8"), LANES),
        "start_us": ev.column("start", "float64"), "dur_us": ev.column("dur", "float64"),
        "bytes": ev.column("nbytes", "int64"), "flops": ev.column("flops", "float64"),
        "strategy": cat(strategy, labels), "gpus": gpus,
    })


def simulate(
    workload: WorkloadModel | str | Path, device: DeviceModel | str | Path,
    cluster: ClusterModel | str | Path,
    strategies: Sequence[str | StrategySpec] = (S.SGD, S.SPNGD, S.KAISA),
    gpus: Sequence[int] | int = (1,), batch_per_gpu: int = 32, factor_interval: int = 1,
    inverse_interval: int = 1, grad_worker_fraction: float = 1.0, *,
    factor_bucket_mb: float = 25.0, ddp_bucket_mb: float = 25.0, events: bool = True,
    progress: Callable[[str], None] | None = None, **overrides: Any,
) -> Prediction:
    """Predict step times; models are objects, preset names or TOML paths."""
    from kfacperf import __version__
    from kfacperf.sim.costs.model import CostModel
    from kfacperf.sim.models import load_cluster, load_device, load_workload

    w = workload if isinstance(workload, WorkloadModel) else load_workload(workload)
    d = device if isinstance(device, DeviceModel) else load_device(device)
    c = cluster if isinstance(cluster, ClusterModel) else load_cluster(cluster)
    cost = CostModel(workload=w, device=d, cluster=c, **overrides)
    o = cost.options
    comm = comm_settings(o, bucket_mb=factor_bucket_mb, ddp_bucket_mb=ddp_bucket_mb,
                         ddp_first_bucket_mb=ddp_bucket_mb)

    def source(model: WorkloadModel | DeviceModel | ClusterModel, given: object) -> str:
        return str(given) if isinstance(given, (str, Path)) else model.source

    meta = {
        "workload": w.name, "device": d.name, "cluster": c.name,
        "models": {"workload": source(w, workload), "device": source(d, device),
                   "cluster": source(c, cluster)},
        "overrides": {k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v))
                      for k, v in sorted(overrides.items())},
        "kfacperf_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return simulate_with_costs(
        w, cost, gpus_per_node=c.gpus_per_node, strategies=strategies, gpus=gpus,
        batch_per_gpu=batch_per_gpu, factor_interval=factor_interval,
        inverse_interval=inverse_interval, grad_worker_fraction=grad_worker_fraction,
        comm=comm, events=events, meta=meta, progress=progress,
    )
