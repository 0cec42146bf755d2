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
elsewhere) is an error.  Within the calibration or the held-out traces a directory given
twice (itself and in its folder, say) counts once, and two copies of one recorded run are
an error (:func:`~kfacperf.validation.inputs.distinct_traces`).

**Measured times.**  A calibration trace's per-layer times (``[[measured]]``) price the same
workload model only (its name, options included, and fingerprint); a held-out run of any
other model, a user's model of the same file and function name among them, is predicted
from the fitted efficiencies alone, and a note says so.

**Repeated recordings.**  Held-out traces of one configuration (equal settings, same device:
:mod:`kfacperf.validation.pooling`) are one held-out run: predicted once, and measured as the
mean of the recordings (each recording's per-kind medians count once).  ``spread_pct`` says
how far the recordings disagree with each other, the noise floor under ``error_pct``.

**What is compared.**  A run's step time and each stage's time as
:mod:`kfacperf.trace.measure` defines them (per kind of step the median, weighted by the
measured mix of kinds; compute stages exclusive of what nests inside them; a collective from
its last member's start to its last member's completion), against the simulated step of
each kind weighted by the same mix (:mod:`kfacperf.trace.compare`).  The report compares a
run with a prediction the same way, so both print the same errors.

This module never imports torch.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kfacperf import vocab as S
from kfacperf.safety import json_records
from kfacperf.trace.compare import check_kinds, compare, error_pct
from kfacperf.trace.coverage import check_stage_spans
from kfacperf.trace.measure import KINDS, Measured, measure, run_step_kind, weighted
from kfacperf.trace.missing import incomplete_note
from kfacperf.validation.inputs import (
    TraceInputs,
    check_disjoint,
    device_key,
    distinct_traces,
    expand_trace_paths,
    load_traces,
    trace_label,
    trace_workload_models,
)
from kfacperf.validation.model import (
    Calibration,
    ClusterInput,
    Predicted,
    SearchInput,
    WorkloadFinder,
    calibrate,
    predict,
    resolve_cluster,
    simulate_run,
    strategy_of,
)
from kfacperf.validation.pooling import group_recordings, pool, pooled_labels, spread_pct

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = [
    "KINDS", "Calibration", "Measured", "Predicted", "ValidationResult", "calibrate",
    "check_disjoint", "error_pct", "expand_trace_paths", "load_traces", "measure", "predict",
    "resolve_cluster", "run_step_kind", "simulate_run", "strategy_of", "validate", "weighted",
]

STEP_TARGET_MEDIAN_PCT = 5.0
STEP_TARGET_WORST_PCT = 10.0
STAGE_TARGET_PCT = 15.0
STAGE_MIN_SHARE_PCT = 5.0
"""Per-stage errors are held to :data:`STAGE_TARGET_PCT` for stages above this share of the step."""

RUN_COLUMNS: tuple[str, ...] = (
    "run", "workload", "strategy", "world_size", "batch_per_rank", "intervals",
    "measured_step_us", "predicted_step_us", "error_pct", "worst_stage", "worst_stage_error_pct",
    "steps", "recordings", "spread_pct", "trace",
)
STAGE_COLUMNS: tuple[str, ...] = (
    "run", "stage", "measured_us", "predicted_us", "error_pct", "share_pct",
)


@dataclass(frozen=True, kw_only=True)
class ValidationResult:
    """Per held-out run and per (run, stage): measured, predicted, error."""

    runs: pd.DataFrame
    stages: pd.DataFrame
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

    def checked_stages(self) -> pd.DataFrame:
        """The stages the per-stage target applies to (above the minimum share)."""
        return self.stages[self.stages["share_pct"] > STAGE_MIN_SHARE_PCT]

    def target_misses(self) -> list[str]:
        """The accuracy targets this result misses (empty: it meets them all)."""
        misses = []
        if not self.median_abs_error_pct <= STEP_TARGET_MEDIAN_PCT:
            misses.append(f"median |error| {self.median_abs_error_pct:.1f}% > "
                          f"{STEP_TARGET_MEDIAN_PCT:g}%")
        if not self.worst_abs_error_pct <= STEP_TARGET_WORST_PCT:
            misses.append(f"worst |error| {self.worst_abs_error_pct:.1f}% > "
                          f"{STEP_TARGET_WORST_PCT:g}%")
        checked = self.checked_stages()
        worst = float(checked["error_pct"].abs().max()) if len(checked) else 0.0
        if not worst <= STAGE_TARGET_PCT:
            misses.append(f"worst stage |error| {worst:.1f}% > {STAGE_TARGET_PCT:g}%")
        return misses

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: calibration, runs, stages, targets, then median and worst error."""
        import numpy as np

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
            "runs": json_records(self.runs),
            "stages": json_records(self.stages),
            "targets": {"median_abs_error_pct": STEP_TARGET_MEDIAN_PCT,
                        "worst_abs_error_pct": STEP_TARGET_WORST_PCT,
                        "stage_abs_error_pct": STAGE_TARGET_PCT,
                        "stage_min_share_pct": STAGE_MIN_SHARE_PCT},
            "worst_stage_abs_error_pct": worst_stage if math.isfinite(worst_stage) else None,
            "worst_run": str(worst_run["run"]),
            "median_abs_error_pct": self.median_abs_error_pct,
            "worst_abs_error_pct": self.worst_abs_error_pct,
        }


def validate(
    calibration_traces: TraceInputs, holdout_traces: TraceInputs, *,
    cluster: ClusterInput = None, workload_search: SearchInput = (),
    device_name: str = "calibrated",
) -> ValidationResult:
    """Calibrate on ``calibration_traces`` only, then predict every held-out trace.

    Each of the two is a trace directory, a folder of trace directories or a loaded trace,
    or a list of them; ``cluster`` is what :func:`resolve_cluster` takes."""
    import pandas as pd

    cal_loaded = distinct_traces(load_traces(calibration_traces, what="calibration traces"),
                                 "calibration")
    held = distinct_traces(load_traces(holdout_traces, what="held-out traces"), "held-out")
    if not held:
        raise ValueError("no held-out traces given")
    check_disjoint(cal_loaded, held)
    for t in held:  # a stage longer than its step: no measurement to compare with
        check_stage_spans(t)
    cal = calibrate(cal_loaded, cluster=cluster, workload_search=workload_search,
                    device_name=device_name)
    notes = list(cal.fit.notes)
    notes.extend(note for note in (incomplete_note(t, f"calibration trace {trace_label(t)}")
                                   for t in cal_loaded) if note)
    devices = {device_key(t) for t in cal_loaded}
    workloads = WorkloadFinder([*cal.workload_search, *trace_workload_models(held)])
    run_rows, stage_rows = [], []
    groups = group_recordings(held)
    for group, label in zip(groups, pooled_labels(groups)):
        t = group[0]
        run = t.run
        for g in group:
            if device_key(g) not in devices:
                raise ValueError(f"{g.path}: ran on {device_key(g)}, but the calibration traces "
                                 f"ran on {', '.join(sorted(devices))}")
            note = incomplete_note(g, trace_label(g))
            if note:
                notes.append(note)
        if "batch_per_rank" not in run:
            raise ValueError(f"{t.path}: run.json has no 'batch_per_rank'")
        note = _workload_note(workloads(run, label), cal, label, run)
        if note:
            notes.append(note)
        recordings = [measure(g) for g in group]
        m = pool(recordings)
        p = predict(run, cal, label=label, workloads=workloads)
        try:
            check_kinds(m, p, label=label)
        except ValueError:
            missing = next(k for k in m.kinds if k not in p.step_us)
            raise ValueError(f"{label}: measured {missing} steps that the simulated cycle of "
                             f"intervals {run.get('factor_interval')}/"
                             f"{run.get('inverse_interval')} does not have") from None
        cmp = compare(m, p, label=label)
        meas, pred = cmp.measured_step_us, cmp.predicted_step_us
        worst = ("", math.nan)
        for st, ms, ps, err, share in cmp.stages.itertuples(index=False):
            stage_rows.append((label, st, ms, ps, err, share))
            if share > STAGE_MIN_SHARE_PCT and not abs(err) <= abs(worst[1]):
                worst = (st, err)
        run_rows.append((
            label, str(run.get("workload")), _strategy_text(run), int(run.get("world_size") or 1),
            int(run["batch_per_rank"]), f"{run.get('factor_interval', 1)}/"
            f"{run.get('inverse_interval', 1)}" if run.get("optimizer") != S.SGD else "-",
            meas, pred, error_pct(pred, meas), worst[0], worst[1], sum(m.kinds.values()),
            len(group), spread_pct(recordings), ", ".join(str(g.path) for g in group),
        ))
    runs = pd.DataFrame(run_rows, columns=list(RUN_COLUMNS))
    stages_df = pd.DataFrame(stage_rows, columns=list(STAGE_COLUMNS))
    return ValidationResult(runs=runs, stages=stages_df, calibration=cal, notes=tuple(notes))


def _workload_note(w: Any, cal: Calibration, label: str, run: Mapping[str, Any]) -> str:
    """A note when the run's workload model is none of the calibration runs' (then no
    ``[[measured]]`` time applies to it: they are keyed by the same identity); "" else."""
    from kfacperf.sim.models.device import workload_key

    key = workload_key(w)
    if key in cal.workloads:
        return ""
    text = f"{label}: workload {run.get('workload')!r} is not in the calibration runs"
    if any(name == key[0] for name, _ in cal.workloads):
        text += (f" (a calibration run's {key[0]!r} is another model: another file or "
                 f"version, fingerprint {key[1][:12] or '(none)'} here)")
    return text + "; predicted from the fitted efficiencies alone"


def _strategy_text(run: Mapping[str, Any]) -> str:
    if run.get("optimizer") == S.SGD:
        return S.SGD
    name = str(run.get("strategy"))
    if name == S.KAISA:
        return f"kaisa:{float(run.get('grad_worker_fraction', 1.0)):g}"
    return name
