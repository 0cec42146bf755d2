"""The demo's headline numbers: measured step times, predicted vs measured for the runs the
1-process calibration predicts, and the K-FAC overhead over SGD, measured here and predicted
on the cluster presets.

Every number is read from a trace summary (:func:`kfacperf.trace.summary.summarize`, whose
step time is :mod:`kfacperf.trace.measure`'s), from :func:`kfacperf.validation.validate`'s
per-run table, or from a prediction's ``summary`` table; nothing is computed here a second
way.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kfacperf import vocab as S
from kfacperf.safety import json_ready

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

CALIBRATION = "calibration"
HELD_OUT = "held out"


@dataclass(frozen=True, kw_only=True)
class RunHeadline:
    """One measured run, as its trace summary gives it."""

    name: str
    strategy: str
    nproc: int
    role: str  # CALIBRATION (1 process: the fit's own data) or HELD_OUT
    trace: str
    measured_step_us: float  # kfacperf.trace.measure: median per kind of step, weighted
    measured_overhead: float  # over the SGD run with as many processes (NaN for SGD)


@dataclass(frozen=True, kw_only=True)
class HeldOutHeadline:
    """A held-out run predicted from the 1-process calibration (:mod:`kfacperf.validation`)."""

    name: str
    strategy: str
    nproc: int
    measured_step_us: float
    predicted_step_us: float
    error_pct: float  # signed, (predicted - measured) / measured
    worst_stage: str  # among stages above 5% of the step ("" if none)
    worst_stage_error_pct: float


@dataclass(frozen=True, kw_only=True)
class ScaleHeadline:
    """One strategy at the largest simulated GPU count of one cluster preset."""

    workload: str
    cluster: str
    device: str
    strategy: str
    gpus: int
    batch_per_gpu: int
    factor_interval: int
    inverse_interval: int
    step_us: float
    kfac_overhead: float
    scaling_efficiency: float
    prediction: str


@dataclass(frozen=True, kw_only=True)
class DemoResult:
    report: Path
    root: Path
    workload: str
    batch_per_rank: int
    steps: int
    intervals: tuple[int, int]  # factor, inverse of the local K-FAC runs
    runs: tuple[RunHeadline, ...]
    held_out: tuple[HeldOutHeadline, ...]
    scale: tuple[ScaleHeadline, ...]
    phases: tuple[Any, ...]  # PhaseTime
    wall_s: float
    load_average: tuple[float, ...] | None
    plan: Any = None  # kfacperf.plan.PlanResult, when the demo planned
    plan_path: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "report": str(self.report), "root": str(self.root), "workload": self.workload,
            "batch_per_rank": self.batch_per_rank, "steps": self.steps,
            "intervals": list(self.intervals),
            "runs": [asdict(r) for r in self.runs],
            "held_out": [asdict(r) for r in self.held_out],
            "scale": [asdict(s) for s in self.scale],
            "phases": [asdict(p) for p in self.phases], "wall_s": self.wall_s,
            "load_average": list(self.load_average) if self.load_average else None,
            "plan": str(self.plan_path) if self.plan_path is not None else None,
        }
        ready: dict[str, Any] = json_ready(out)
        return ready

    def text(self) -> str:
        return format_result(self)


def run_headlines(measured: Mapping[tuple[str, int], tuple[str, str, float]]
                  ) -> tuple[RunHeadline, ...]:
    """``measured`` maps (strategy, nproc) to (run name, trace path, measured step µs)."""
    out = []
    for (strategy, nproc), (name, trace, step_us) in measured.items():
        base = measured.get((S.SGD, nproc))
        over = (step_us / base[2] if strategy != S.SGD and base and base[2] > 0 else math.nan)
        out.append(RunHeadline(name=name, strategy=strategy, nproc=nproc,
                               role=CALIBRATION if nproc == 1 else HELD_OUT, trace=trace,
                               measured_step_us=step_us, measured_overhead=over))
    return tuple(out)


def held_out_headlines(runs: pd.DataFrame, strategies: Mapping[str, str],
                       nprocs: Mapping[str, int]) -> tuple[HeldOutHeadline, ...]:
    """From :class:`kfacperf.validation.ValidationResult` ``.runs``; ``strategies`` and
    ``nprocs`` map a run's name to the demo's strategy and process count."""
    return tuple(HeldOutHeadline(
        name=str(r["run"]), strategy=strategies[str(r["run"])], nproc=nprocs[str(r["run"])],
        measured_step_us=float(r["measured_step_us"]),
        predicted_step_us=float(r["predicted_step_us"]), error_pct=float(r["error_pct"]),
        worst_stage=str(r["worst_stage"] or ""),
        worst_stage_error_pct=float(r["worst_stage_error_pct"]),
    ) for _, r in runs.iterrows())


def scale_headlines(predictions: Sequence[tuple[str, Mapping[str, Any], pd.DataFrame]]
                    ) -> tuple[ScaleHeadline, ...]:
    """``predictions``: (path, meta, summary) per cluster preset; one headline per strategy
    at the largest GPU count."""
    out = []
    for path, meta, summary in predictions:
        gpus = int(summary["gpus"].astype(int).max())
        at = summary[summary["gpus"].astype(int) == gpus]
        for _, row in at.iterrows():
            out.append(ScaleHeadline(
                workload=str(meta["workload"]), cluster=str(meta["cluster"]),
                device=str(meta["device"]), strategy=str(row["strategy"]), gpus=gpus,
                batch_per_gpu=int(row["batch_per_gpu"]),
                factor_interval=int(meta["factor_interval"]),
                inverse_interval=int(meta["inverse_interval"]), step_us=float(row["step_us"]),
                kfac_overhead=float(row["kfac_overhead"]),
                scaling_efficiency=float(row["scaling_efficiency"]), prediction=path,
            ))
    return tuple(out)


def _ms(us: float) -> str:
    return "n/a" if not math.isfinite(us) else f"{us / 1e3:,.1f} ms"


def _pct(p: float) -> str:
    return "n/a" if not math.isfinite(p) else f"{p:+.1f}%"


def _x(r: float) -> str:
    return "n/a" if not math.isfinite(r) else f"{r:.2f}x"


def plan_lines(plan: Any) -> list[str]:
    """The plan's best SGD and K-FAC per GPU count, and the two ends of its Pareto front."""
    from kfacperf.plan.result import OPTIMIZER_NAMES
    from kfacperf.plan.text import best_table, config_text, fmt_duration

    i = plan.inputs
    names = ", ".join(f"{OPTIMIZER_NAMES.get(k, k)} {v['name']}"
                      for k, v in plan.convergence.items())
    lines = [f"plan for {i['workload']} on {i['cluster']} / {i['device']} (kfacperf plan; time "
             f"to the target, steps from {names}; * extrapolated):"]
    lines += ["  " + ln for ln in best_table(plan)]
    front = plan.pareto()
    if front:
        def point(c: Any) -> str:
            return (f"{c.gpus:,} GPUs, {config_text(c)}: {fmt_duration(c.time_s)}, "
                    f"{c.gpu_hours:,.1f} GPU-h")

        lines.append(f"  fastest: {point(front[0])}")
        if len(front) > 1:
            lines.append(f"  fewest GPU-hours: {point(front[-1])}")
    return lines


def format_result(result: DemoResult) -> str:
    """The text ``kfacperf demo`` prints at the end."""
    fi, ii = result.intervals
    lines = [f"report: {result.report}", ""]
    lines.append(f"{result.workload}, batch {result.batch_per_rank} per rank, one thread per "
                 f"rank, K-FAC factor/inverse interval {fi}/{ii}")
    lines.append(f"measured step time (of {result.steps} steps, the median per kind of step, "
                 "weighted by the mix):")
    w = max([20, *(len(r.name) + 1 for r in result.runs),
             *(len(h.name) + 1 for h in result.held_out)])  # run names of a user's model
    lines.append(f"  {'run':<{w}}{'procs':>5}{'step':>13}{'K-FAC/SGD':>11}")
    for r in result.runs:
        over = "" if r.strategy == S.SGD else f"{_x(r.measured_overhead):>11}"
        lines.append(f"  {r.name:<{w}}{r.nproc:>5}{_ms(r.measured_step_us):>13}{over}")
    if result.held_out:
        lines.append("")
        lines.append("held-out runs predicted from the 1-process calibration and commbench "
                     "(as kfacperf validate):")
        lines.append(f"  {'run':<{w}}{'measured':>13}{'predicted':>13}{'error':>9}"
                     "   worst stage (>5% of the step)")
        for h in result.held_out:
            worst = (f"{h.worst_stage} {_pct(h.worst_stage_error_pct)}" if h.worst_stage
                     else "-")
            lines.append(f"  {h.name:<{w}}{_ms(h.measured_step_us):>13}"
                         f"{_ms(h.predicted_step_us):>13}{_pct(h.error_pct):>9}   {worst}")
        errs = [abs(h.error_pct) for h in result.held_out if math.isfinite(h.error_pct)]
        if errs:
            lines.append(f"  |error| median {statistics.median(errs):.1f}%, worst "
                         f"{max(errs):.1f}%")
    if result.scale:
        s0 = result.scale[0]
        lines.append("")
        lines.append(f"K-FAC overhead over SGD predicted at {s0.gpus:,} GPUs ({s0.workload}, "
                     f"batch {s0.batch_per_gpu} per GPU, factor/inverse interval "
                     f"{s0.factor_interval}/{s0.inverse_interval}):")
        for cluster in dict.fromkeys((s.cluster, s.device) for s in result.scale):
            rows = [s for s in result.scale if (s.cluster, s.device) == cluster]
            sgd = next((s for s in rows if s.strategy == S.SGD), None)
            parts = [f"{s.strategy} {_x(s.kfac_overhead)}" for s in rows if s.strategy != S.SGD]
            base = f" (sgd step {_ms(sgd.step_us)})" if sgd else ""
            lines.append(f"  {cluster[0]} / {cluster[1]}: " + ", ".join(parts) + base)
    if result.plan is not None:
        lines += [""] + plan_lines(result.plan)
    lines.append("")
    load = (f"; load average at the start {result.load_average[0]:.2f}"
            if result.load_average else "")
    lines.append(f"demo finished in {result.wall_s:.0f} s{load}; files in {result.root}")
    return "\n".join(lines)
