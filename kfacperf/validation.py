"""Prediction accuracy: calibrate on some measured runs, predict others, compare.

::

    from kfacperf.validation import validate
    result = validate(["traces/reference/p1/..."], ["traces/reference/p2/..."],
                      cluster="models/clusters/local-cpu.toml")
    result.runs                # one row per held-out run: measured, predicted, error_pct
    result.stages              # one row per (held-out run, stage)
    result.median_abs_error_pct, result.worst_abs_error_pct

**No leaks.**  The device model is fitted by :func:`calibrate`, which is given the
calibration traces and the cluster model and nothing else; the held-out traces are only read
afterwards, to take each run's settings (workload, world size, batch per rank, strategy,
grad_worker_fraction, intervals, communication options) and its measurements.  A trace given
as both calibration and held-out run (same directory, or the same recorded run copied
elsewhere) is an error.

**What is compared.**  A run repeats steps of up to three kinds (the optimizer's rule: step
``k`` recomputes inverses iff ``k % inverse_interval == 0``, else factors iff ``k %
factor_interval == 0``; SGD steps are all plain).  The measured steps of a run are a window
that need not be a whole cycle (a 10/100 run of 20 steps has no inverse step in it), so the
prediction is weighted by the same mix of kinds as the measured window:

* measured step time: per kind, the median over the measured steps of that kind of the step
  time (the slowest rank's ``step`` row), weighted by the kind's number of steps; medians
  keep a burst of load from elsewhere on the machine out of the number;
* predicted step time: the simulated step time of each kind, weighted alike;
* per stage, per step, averaged over ranks: compute stages as *exclusive* time (the factor
  statistics computed in backward hooks are nested in the measured ``backward``; the
  simulator's backward excludes them, see :func:`kfacperf.sim.calibration.exclusive_compute_times`);
  communication stages as the time of each collective from its last member's issue to
  completion (the shortest issue-to-completion over ranks; time a rank waits for a late
  peer is not the collective's cost), which is what the simulator reports for a collective.

This module never imports torch.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from kfacperf import stages as S

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from kfacperf.sim.calibration import DeviceCalibration
    from kfacperf.sim.cluster_model import ClusterModel
    from kfacperf.traces import Trace

KINDS: tuple[str, ...] = ("inverse", "factor", "plain")
STEP_TARGET_MEDIAN_PCT = 5.0
STEP_TARGET_WORST_PCT = 10.0
STAGE_TARGET_PCT = 15.0
STAGE_MIN_SHARE_PCT = 5.0
"""Per-stage errors are held to :data:`STAGE_TARGET_PCT` for stages above this share of the step."""

RUN_COLUMNS: tuple[str, ...] = (
    "run", "workload", "strategy", "world_size", "batch_per_rank", "intervals",
    "measured_step_us", "predicted_step_us", "error_pct", "worst_stage", "worst_stage_error_pct",
    "steps", "trace",
)
STAGE_COLUMNS: tuple[str, ...] = (
    "run", "stage", "measured_us", "predicted_us", "error_pct", "share_pct",
)


# --------------------------------------------------------------------------- inputs
def expand_trace_paths(items: Iterable[str | os.PathLike[str] | "Trace"]) -> list[Any]:
    """Trace directories, with a folder of traces (no ``run.json`` of its own, trace
    directories inside) standing for its traces in name order."""
    from kfacperf.traces import RUN_FILE

    out: list[Any] = []
    for item in items:
        if not isinstance(item, (str, os.PathLike)):
            out.append(item)
            continue
        p = Path(item)
        if p.is_dir() and not (p / RUN_FILE).exists():
            inner = sorted(c for c in p.iterdir() if (c / RUN_FILE).is_file())
            if not inner:
                raise FileNotFoundError(f"{p}: neither a trace directory (no {RUN_FILE}) nor a "
                                        "folder of trace directories")
            out.extend(inner)
        else:
            out.append(p)
    return out


def _load(items: Iterable[Any]) -> list["Trace"]:
    from kfacperf.traces import load_trace

    return [it if hasattr(it, "events") else load_trace(it) for it in expand_trace_paths(items)]


def _label(trace: "Trace") -> str:
    path = getattr(trace, "path", None)
    return Path(path).name if path else str(trace.run.get("workload", "run"))


def _identity(trace: "Trace") -> tuple[str, str]:
    run = trace.run
    return (str(run.get("start_time", "")), str(run.get("command", "")))


def check_disjoint(calibration: Sequence["Trace"], holdout: Sequence["Trace"]) -> None:
    """A held-out run must not also be a calibration run (same directory, or a copy)."""
    cal_paths = {Path(t.path).resolve(): t for t in calibration if getattr(t, "path", None)}
    cal_ids = {_identity(t): t for t in calibration if all(_identity(t))}
    for t in holdout:
        path = Path(t.path).resolve() if getattr(t, "path", None) else None
        if path is not None and path in cal_paths:
            raise ValueError(f"{t.path} is given both for calibration and as a held-out run; "
                             "a held-out run must not be calibrated on")
        if any(_identity(t)) and _identity(t) in cal_ids:
            other = cal_ids[_identity(t)]
            raise ValueError(f"held-out run {t.path} is the same recorded run (start_time and "
                             f"command) as calibration trace {other.path}")
        if any(o is t for o in calibration):
            raise ValueError(f"{_label(t)}: the same trace is given for calibration and held out")


def resolve_cluster(cluster: Any) -> "ClusterModel":
    """A cluster model from a ClusterModel, a commbench result, a preset name or a TOML path
    (``None``: the committed ``local-cpu`` model)."""
    from kfacperf.sim.models import load_cluster

    if cluster is None:
        try:
            return load_cluster("local-cpu")
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"no cluster model given and no local-cpu preset ({exc}); "
                                    "run kfacperf commbench --out models/clusters/local-cpu.toml"
                                    ) from None
    if hasattr(cluster, "gpus_per_node"):
        return cluster
    if hasattr(cluster, "points") and hasattr(cluster, "backend"):  # a CommbenchResult
        from kfacperf.commbench import fit_cluster

        return fit_cluster(cluster, name="local")[0]
    return load_cluster(cluster)


# --------------------------------------------------------------------------- calibration
@dataclass(frozen=True, kw_only=True)
class Calibration:
    """What the predictions use: the fitted device, the cluster, and how to find workloads."""

    device: Any
    cluster: "ClusterModel"
    fit: "DeviceCalibration"
    traces: tuple[str, ...]
    workload_search: tuple[str, ...] = ()


class _Workloads:
    """Workload models matched to runs by registry name and options (cached)."""

    def __init__(self, search: Sequence[str | os.PathLike[str]]) -> None:
        self.search = [str(s) for s in search]
        self.cache: dict[str, Any] = {}

    def __call__(self, run: Mapping[str, Any], label: str = "") -> Any:
        import json

        from kfacperf.sim.models import workload_for_run

        name = run.get("workload")
        if not name:
            raise ValueError(f"{label or 'run'}: run.json has no 'workload'")
        options = run.get("workload_options") or {}
        key = json.dumps([name, options], sort_keys=True, default=str)
        if key not in self.cache:
            try:
                self.cache[key] = workload_for_run(str(name), options, search=self.search)
            except ValueError as exc:
                raise ValueError(f"{label or 'run'}: {exc}") from None
        return self.cache[key]


def calibrate(
    traces: Sequence[Any], *, cluster: Any = None, workload_search: Sequence[str] = (),
    device_name: str = "calibrated",
) -> Calibration:
    """Fit the device model to ``traces`` (paths or loaded traces) only."""
    from kfacperf.sim.calibration import fit_device_model

    loaded = _load(traces)
    if not loaded:
        raise ValueError("no calibration traces given")
    workloads = _Workloads(workload_search)
    fit = fit_device_model(loaded, workloads=lambda run: workloads(run), name=device_name)
    return Calibration(device=fit.device, cluster=resolve_cluster(cluster), fit=fit,
                       traces=tuple(str(getattr(t, "path", _label(t))) for t in loaded),
                       workload_search=tuple(workloads.search))


# --------------------------------------------------------------------------- measurements
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


def measure(trace: "Trace") -> Measured:
    """Step and stage times of a trace's measured steps, per kind of step."""
    import numpy as np
    import pandas as pd

    from kfacperf.sim.calibration import exclusive_compute_times

    run, label = trace.run, _label(trace)
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
    comp = comp.groupby(["step", "stage"], as_index=False)["dur_us"].sum()
    comp["dur_us"] /= world  # mean over ranks (ranks without the stage count as 0)
    comm = ev.loc[ev["lane"].astype(str) == S.COMM, ["rank", "step", "stage", "layer",
                                                      "start_us", "dur_us"]].copy()
    if len(comm):
        comm["stage"] = comm["stage"].astype(str)
        comm["layer"] = comm["layer"].astype(str)
        comm = comm.sort_values(["rank", "start_us"])
        comm["occ"] = comm.groupby(["rank", "step", "stage", "layer"]).cumcount()
        per = comm.groupby(["step", "stage", "layer", "occ"], as_index=False)["dur_us"].min()
        per = per.groupby(["step", "stage"], as_index=False)["dur_us"].sum()
    else:
        per = pd.DataFrame(columns=["step", "stage", "dur_us"])
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


def weighted(per_kind: Mapping[str, float], kinds: Mapping[str, int]) -> float:
    n = sum(kinds.values())
    return sum(per_kind.get(k, 0.0) * c for k, c in kinds.items()) / n


# --------------------------------------------------------------------------- prediction
def strategy_of(run: Mapping[str, Any], label: str) -> Any:
    from kfacperf.sim.strategies import StrategySpec

    world = int(run.get("world_size") or 1)
    if run.get("optimizer") == "sgd":
        return StrategySpec("sgd")
    name = str(run.get("strategy"))
    if run.get("fused"):
        raise ValueError(f"{label}: fused SP-NGD (one fused all-reduce) is not modelled by the "
                         "simulator")
    if name == "local":
        if world != 1:
            raise ValueError(f"{label}: strategy 'local' with world_size {world}")
        return StrategySpec("spngd")  # the same work as any strategy on one process
    if name == "spngd":
        return StrategySpec("spngd")
    if name == "kaisa":
        f = float(run.get("grad_worker_fraction", 1.0))
        return StrategySpec("kaisa", f, f"kaisa:{f:g}")
    raise ValueError(f"{label}: strategy {name!r} is not modelled (sgd, spngd, kaisa, local)")


@dataclass(frozen=True, kw_only=True)
class Predicted:
    step_us: dict[str, float]
    stage_us: dict[str, dict[str, float]]


def predict(run: Mapping[str, Any], calibration: Calibration, *, label: str = "run",
            workloads: _Workloads | None = None) -> Predicted:
    """Simulate the run described by ``run`` (a run.json) on the calibrated models."""
    from kfacperf.sim.costs import CostModel
    from kfacperf.sim.strategies.common import CommSettings
    from kfacperf.sim.summary import cycle
    from kfacperf.sim.sweep import simulate_with_costs

    workloads = workloads or _Workloads(calibration.workload_search)
    w = workloads(run, label)
    spec = strategy_of(run, label)
    world = int(run.get("world_size") or 1)
    batch = int(run["batch_per_rank"])
    fi, ii = int(run.get("factor_interval") or 1), int(run.get("inverse_interval") or 1)
    method = str(run.get("inverse_method") or "eigen")
    dtype = str(run.get("comm_dtype") or "fp32")
    symmetric = bool(run.get("symmetric", False))
    cap = float(run.get("bucket_cap_mb", 25.0))
    cost = CostModel(workload=w, device=calibration.device, cluster=calibration.cluster,
                     inverse_method=method, comm_dtype=dtype, symmetric_factors=symmetric,
                     threads_per_rank=int(run.get("threads_per_rank") or 1))
    comm = CommSettings(factor_dtype=dtype, symmetric=symmetric, inverse_method=method,
                        factor_bucket_mb=cap, ddp_bucket_mb=cap or 25.0,
                        ddp_first_bucket_mb=cap or 25.0)
    pred = simulate_with_costs(w, cost, gpus_per_node=calibration.cluster.gpus_per_node,
                               strategies=[spec], gpus=[world], batch_per_gpu=batch,
                               factor_interval=fi, inverse_interval=ii, comm=comm)
    row = pred.summary.iloc[0]
    ev, classes = pred.events, pred.classes
    ranks = {(int(s), int(r)): int(n) for s, r, n in
             zip(classes["step"], classes["rank"], classes["ranks"])}
    step_us: dict[str, float] = {}
    stage_us: dict[str, dict[str, float]] = {}
    for cs in cycle(fi, ii, kfac=spec.name != "sgd"):
        kind = cs.kind.name
        step_us[kind] = float(row[f"{kind}_step_us"])
        sel = ev[(ev["step"] == cs.step) & (ev["stage"].astype(str) != S.STEP)]
        sums = sel.groupby(["rank", sel["stage"].astype(str)])["dur_us"].sum()
        acc: dict[str, float] = {}
        for (rank, st), t in sums.items():
            acc[st] = acc.get(st, 0.0) + t * ranks[(cs.step, int(rank))] / world
        stage_us[kind] = acc
    return Predicted(step_us=step_us, stage_us=stage_us)


# --------------------------------------------------------------------------- result
def error_pct(predicted: float, measured: float) -> float:
    """Signed relative error in percent (as the report computes it)."""
    if not (math.isfinite(predicted) and math.isfinite(measured)) or measured == 0:
        return math.nan
    return (predicted - measured) / measured * 100.0


@dataclass(frozen=True, kw_only=True)
class ValidationResult:
    """Per held-out run and per (run, stage): measured, predicted, error."""

    runs: "pd.DataFrame"
    stages: "pd.DataFrame"
    calibration: Calibration
    notes: tuple[str, ...] = field(default=())

    @property
    def median_abs_error_pct(self) -> float:
        import numpy as np

        return float(np.median(np.abs(self.runs["error_pct"].to_numpy(float))))

    @property
    def worst_abs_error_pct(self) -> float:
        import numpy as np

        return float(np.max(np.abs(self.runs["error_pct"].to_numpy(float))))

    def checked_stages(self) -> "pd.DataFrame":
        """The stages the per-stage target applies to (above the minimum share)."""
        return self.stages[self.stages["share_pct"] > STAGE_MIN_SHARE_PCT]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: calibration, runs, stages, targets, then median and worst error."""
        import numpy as np

        def rows(df: "pd.DataFrame") -> list[dict[str, Any]]:
            out = []
            for rec in df.to_dict(orient="records"):
                out.append({k: _json_value(v) for k, v in rec.items()})
            return out

        cal = self.calibration
        checked = self.checked_stages()
        worst_stage = float(np.max(np.abs(checked["error_pct"]))) if len(checked) else math.nan
        worst_run = self.runs.iloc[int(np.argmax(np.abs(self.runs["error_pct"].to_numpy(float))))]
        return {
            "calibration": {
                "traces": list(cal.traces), "device": cal.device.name,
                "cluster": cal.cluster.name, "cluster_source": cal.cluster.source,
                "fits": {k: {"efficiency": f.efficiency, "overhead_us": f.overhead_us,
                             "samples": f.samples, "rms_rel_error": f.rms_rel_error}
                         for k, f in cal.fit.fits.items()},
            },
            "notes": list(self.notes),
            "runs": rows(self.runs),
            "stages": rows(self.stages),
            "targets": {"median_abs_error_pct": STEP_TARGET_MEDIAN_PCT,
                        "worst_abs_error_pct": STEP_TARGET_WORST_PCT,
                        "stage_abs_error_pct": STAGE_TARGET_PCT,
                        "stage_min_share_pct": STAGE_MIN_SHARE_PCT},
            "worst_stage_abs_error_pct": _json_value(worst_stage),
            "worst_run": str(worst_run["run"]),
            "median_abs_error_pct": self.median_abs_error_pct,
            "worst_abs_error_pct": self.worst_abs_error_pct,
        }


def validate(
    calibration_traces: Sequence[Any], holdout_traces: Sequence[Any], *, cluster: Any = None,
    workload_search: Sequence[str] = (), device_name: str = "calibrated",
) -> ValidationResult:
    """Calibrate on ``calibration_traces`` only, then predict every held-out trace."""
    import pandas as pd

    cal_loaded = _load(calibration_traces)
    held = _load(holdout_traces)
    if not held:
        raise ValueError("no held-out traces given")
    check_disjoint(cal_loaded, held)
    cal = calibrate(cal_loaded, cluster=cluster, workload_search=workload_search,
                    device_name=device_name)
    notes = list(cal.fit.notes)
    devices = {_device_key(t) for t in cal_loaded}
    workloads = _Workloads(cal.workload_search)
    cal_workloads = {str(t.run.get("workload")) for t in cal_loaded}
    run_rows, stage_rows = [], []
    for t in held:
        run, label = t.run, _label(t)
        if _device_key(t) not in devices:
            raise ValueError(f"{t.path}: ran on {_device_key(t)}, but the calibration traces "
                             f"ran on {', '.join(sorted(devices))}")
        if "batch_per_rank" not in run:
            raise ValueError(f"{t.path}: run.json has no 'batch_per_rank'")
        if str(run.get("workload")) not in cal_workloads:
            notes.append(f"{label}: workload {run.get('workload')!r} is not in the calibration "
                         "runs; predicted from the fitted efficiencies alone")
        if not t.completed:
            notes.append(f"{label}: the run did not complete; its finished steps are used")
        m = measure(t)
        p = predict(run, cal, label=label, workloads=workloads)
        missing = [k for k in m.kinds if k not in p.step_us]
        if missing:
            raise ValueError(f"{label}: measured {missing[0]} steps that the simulated cycle of "
                             f"intervals {run.get('factor_interval')}/"
                             f"{run.get('inverse_interval')} does not have")
        meas = weighted(m.step_us, m.kinds)
        pred = weighted(p.step_us, m.kinds)
        stages = [s for s in S.STAGE_NAMES if s != S.STEP and (
            any(s in m.stage_us[k] for k in m.kinds) or any(s in p.stage_us[k] for k in m.kinds))]
        worst = ("", math.nan)
        for st in stages:
            ms = weighted({k: m.stage_us[k].get(st, 0.0) for k in m.kinds}, m.kinds)
            ps = weighted({k: p.stage_us[k].get(st, 0.0) for k in m.kinds}, m.kinds)
            share = 100.0 * ms / meas if meas > 0 else math.nan
            err = error_pct(ps, ms)
            stage_rows.append((label, st, ms, ps, err, share))
            if share > STAGE_MIN_SHARE_PCT and not abs(err) <= abs(worst[1]):
                worst = (st, err)
        run_rows.append((
            label, str(run.get("workload")), _strategy_text(run), int(run.get("world_size") or 1),
            int(run["batch_per_rank"]), f"{run.get('factor_interval', 1)}/"
            f"{run.get('inverse_interval', 1)}" if run.get("optimizer") != "sgd" else "-",
            meas, pred, error_pct(pred, meas), worst[0], worst[1], sum(m.kinds.values()),
            str(t.path),
        ))
    runs = pd.DataFrame(run_rows, columns=list(RUN_COLUMNS))
    stages_df = pd.DataFrame(stage_rows, columns=list(STAGE_COLUMNS))
    return ValidationResult(runs=runs, stages=stages_df, calibration=cal, notes=tuple(notes))


def _json_value(v: Any) -> Any:
    """Plain Python for JSON; NaN (no value) as null."""
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _strategy_text(run: Mapping[str, Any]) -> str:
    if run.get("optimizer") == "sgd":
        return "sgd"
    name = str(run.get("strategy"))
    if name == "kaisa":
        return f"kaisa:{float(run.get('grad_worker_fraction', 1.0)):g}"
    return name


def _device_key(trace: "Trace") -> str:
    dev = trace.run.get("device") or {}
    threads = int(trace.run.get("threads_per_rank") or 1)
    name = dev.get("name") or dev.get("kind") or "unknown device"
    return f"{name} ({dev.get('kind', '?')}, {threads} thread(s) per rank)"
