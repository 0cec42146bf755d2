"""The report's sections, each built from loaded runs/predictions into a :class:`Section`.

A section without data keeps its heading and says in one line why it is empty.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from kfacperf import vocab as S
from kfacperf.report import figures, matching, metrics, timeline
from kfacperf.report.inputs import PredictionData, RunData
from kfacperf.report.page import (
    Section,
    fmt_abs_pct,
    fmt_ms,
    fmt_pct,
    fmt_plain,
    fmt_ratio,
    fmt_share,
    heading,
    paragraph,
    table,
)
from kfacperf.trace.compare import compare, compare_layers

_RUN_FIELDS: tuple[tuple[str, str], ...] = (
    ("workload", "workload"), ("optimizer", "optimizer"), ("strategy", "strategy"),
    ("world_size", "ranks"), ("batch_per_rank", "batch/rank"),
    ("grad_worker_fraction", "grad workers"), ("factor_interval", "factor every"),
    ("inverse_interval", "inverse every"), ("damping", "damping"),
    ("inverse_method", "inverse"), ("device", "device"), ("threads_per_rank", "threads/rank"),
    ("torch_version", "torch"), ("completed", "completed"),
)


def device_text(device: Any) -> str:
    """Kind and name of the device, plus what NVML told about a GPU (memory, clock, power)."""
    if not isinstance(device, dict):
        return fmt_plain(device)
    parts = [str(device[k]) for k in ("kind", "name") if device.get(k)]
    gpu = device.get("gpu")
    if isinstance(gpu, dict):
        if gpu.get("memory_total_mib"):
            parts.append(f"{float(gpu['memory_total_mib']) / 1024:.0f} GiB")
        if gpu.get("max_sm_clock_mhz"):
            parts.append(f"SM {fmt_plain(gpu['max_sm_clock_mhz'])} MHz")
        if gpu.get("power_limit_w"):
            parts.append(f"{float(gpu['power_limit_w']):.0f} W")
        if gpu.get("driver"):
            parts.append(f"driver {gpu['driver']}")
    cpu = device.get("cpu")
    if isinstance(cpu, dict) and cpu.get("threads") and device.get("kind") != "gpu":
        parts.append(f"{cpu['threads']} CPU threads")
    return " · ".join(parts) if parts else fmt_plain(device)


def summary_section(runs: Sequence[RunData], predictions: Sequence[PredictionData],
                    head: pd.DataFrame) -> Section:
    sec = Section(key="summary", title="Summary")
    if runs:
        rows = []
        for run in runs:
            row = {"run": run.name, "steps": run.summary.measured_steps}
            for key, _ in _RUN_FIELDS:
                value = run.run.get(key)
                row[key] = device_text(value) if key == "device" else fmt_plain(value)
            rows.append(row)
        cols = [("run", "run", fmt_plain)] + [(k, h, fmt_plain) for k, h in _RUN_FIELDS] + [
            ("steps", "steps recorded", fmt_plain)]
        sec.add_html(heading("Measured runs"))
        sec.add_html(table(pd.DataFrame(rows), cols))
        for run in runs:  # a run that died: what the numbers below are of, and what is missing
            if run.summary.lacking:
                sec.add_html(paragraph(run.summary.lacking))
        sec.add_html(heading("Headline numbers"))
        sec.add_html(table(head, [
            ("run", "run", fmt_plain), ("strategy", "strategy", fmt_plain),
            ("world_size", "GPUs/ranks", fmt_plain),
            ("measured_step_us", "measured step (ms)", fmt_ms),
            ("predicted_step_us", "predicted step (ms)", fmt_ms),
            ("error_pct", "error", fmt_pct),
            ("kfac_overhead_measured", "K-FAC overhead measured", fmt_ratio),
            ("kfac_overhead_predicted", "K-FAC overhead predicted", fmt_ratio),
            ("prediction", "prediction", fmt_plain),
        ], numeric=("measured_step_us", "predicted_step_us", "error_pct", "kfac_overhead_measured",
                    "kfac_overhead_predicted"),
            caption="step time = per kind of step (inverse, factor, plain) the median over the "
                    "measured steps of the slowest rank's step, weighted by the mix of kinds "
                    "measured (the prediction by the same mix), as kfacperf validate; "
                    "K-FAC overhead = step time over the SGD run with the same workload, "
                    "ranks and batch"))
    if predictions:
        sec.add_html(heading("Predictions (simulator inputs)"))
        sec.add_html(prediction_inputs_table(predictions))
    if not sec.blocks:
        sec.note = "No traces or predictions were given."
    return sec


# Bookkeeping of the prediction file, not inputs of the prediction.
_HIDDEN_META = frozenset({"format", "step_kinds"})


def prediction_inputs_table(predictions: Sequence[PredictionData]) -> str:
    keys: list[str] = []
    for pred in predictions:
        keys.extend(k for k in pred.meta if k not in keys and k not in _HIDDEN_META)
    rows = []
    for pred in predictions:
        row = {"prediction": pred.name}
        for k in keys:
            text = fmt_plain(pred.meta.get(k))
            row[k] = text if len(text) <= 90 else text[:87] + "..."
        rows.append(row)
    cols = [("prediction", "prediction", fmt_plain)] + [(k, k, fmt_plain) for k in keys]
    return table(pd.DataFrame(rows), cols)


def breakdown_section(runs: Sequence[RunData]) -> Section:
    sec = Section(key="breakdown", title="Measured stage breakdown per rank",
                  intro="Per-step time of each stage on each rank, as kfacperf validate measures a "
                        "stage: compute without the stages nested in it, a collective from its "
                        "last member's start to its last completion (communication hatched: it "
                        "may run under compute); then how much of the time communication is in "
                        "flight is exposed. Each rank's numbers are, like the step time, per "
                        "kind of step (inverse, factor, plain) the median over the measured "
                        "steps, weighted by the measured mix of kinds.")
    for run in runs:
        breakdown = metrics.rank_stage_breakdown(run.summary)
        if breakdown.empty:
            sec.add_html(paragraph(f"{run.name}: no stage events recorded."))
            continue
        per_rank = metrics.rank_table(run.summary)
        label = f"{run.name} ({run.strategy}, {run.world_size} ranks)"
        sec.add_figure(figures.rank_breakdown_figure(breakdown, per_rank, label))
        sec.add_html(table(per_rank.reset_index(), [
            ("rank", "rank", fmt_plain), ("step_us", "step (ms)", fmt_ms),
            ("compute_us", "compute busy (ms)", fmt_ms),
            ("comm_us", "comm in flight (ms)", fmt_ms),
            ("exposed_comm_us", "exposed comm (ms)", fmt_ms),
            ("overlap_pct", "comm hidden", fmt_share), ("idle_us", "idle (ms)", fmt_ms),
        ], numeric=("step_us", "compute_us", "comm_us", "exposed_comm_us", "overlap_pct",
                    "idle_us"),
            caption=f"{label}: per rank, per kind of step the median over the measured "
                    "steps, weighted by the mix"))
    if not sec.blocks:
        sec.note = "No traces were given."
    return sec


def comparison_section(runs: Sequence[RunData], predictions: Sequence[PredictionData]) -> Section:
    sec = Section(key="comparison", title="Predicted vs measured",
                  intro="Per-step time of each stage, mean over ranks: compute stages exclusive of "
                        "the stages nested in them, a collective from its last member's start to "
                        "its last completion. Measured: per kind of step (inverse, factor, "
                        "plain) the median over the measured steps; predicted: the simulated "
                        "step of each kind; both weighted by the measured mix of kinds, as "
                        "kfacperf validate. Error = (predicted − measured) / measured.")
    unmatched = []
    for run in runs:
        match = matching.match_prediction(run, predictions)
        if match is None:
            unmatched.append(f"{run.name} ({run.strategy}, {run.world_size} GPUs)")
            continue
        predicted = match.kind_times()
        try:
            cmp = compare(run.summary.measured, predicted, label=run.name)
        except ValueError as exc:
            unmatched.append(f"{run.name} ({exc})")
            continue
        label = f"{run.name} vs {match.prediction.name} ({run.strategy}, {run.world_size} GPUs)"
        sec.add_html(heading(label))
        comp = metrics.stage_comparison(cmp)
        if not predicted.stage_us:  # simulated without events: the step alone
            comp = comp[comp["stage"] == S.STEP].reset_index(drop=True)
        sec.add_html(table(comp, [
            ("stage", "stage", fmt_plain), ("measured_us", "measured (ms)", fmt_ms),
            ("predicted_us", "predicted (ms)", fmt_ms), ("error_pct", "error", fmt_pct),
        ], numeric=("measured_us", "predicted_us", "error_pct")))
        if not predicted.stage_us:
            sec.add_html(paragraph(f"{match.prediction.name} has no events for this point "
                                   "(simulated without them), so no predicted stage times: "
                                   "the step alone."))
        sec.add_figure(figures.comparison_figure(
            comp, "per-step time by stage: measured vs predicted"))
        layers = compare_layers(run.summary.measured, predicted)
        if not layers.empty:
            sec.add_html("<details><summary>per layer</summary>" + table(layers, [
                ("stage", "stage", fmt_plain), ("layer", "layer", fmt_plain),
                ("measured_us", "measured (ms)", fmt_ms),
                ("predicted_us", "predicted (ms)", fmt_ms),
                ("error_pct", "error", fmt_pct),
            ], numeric=("measured_us", "predicted_us", "error_pct")) + "</details>")
    if not sec.blocks:
        sec.note = ("No prediction matches a measured run (same strategy, GPU count = world size, "
                    "workload and batch)." if runs and predictions else
                    "Needs both traces and predictions.")
    elif unmatched:
        sec.add_html(paragraph("No matching prediction for: " + "; ".join(unmatched) + "."))
    return sec


def scaling_section(groups: Sequence[Sequence[PredictionData]]) -> Section:
    sec = Section(key="scaling", title="Scaling",
                  intro="Predicted step time, scaling efficiency and K-FAC overhead over SGD "
                        "against the GPU count, per strategy; below, the predicted per-stage "
                        "time by GPU count.")
    for group in groups:
        pred = group[0]
        if pred.summary.empty:
            continue
        label = f"{pred.name}: {matching.prediction_workload(pred) or 'workload ?'}"
        sec.add_html(heading(label))
        sec.add_figure(figures.scaling_figure(pred.summary, label))
        for strategy in sorted(pred.stage_times["strategy"].astype(str).unique()):
            sec.add_figure(figures.stage_scaling_figure(pred.stage_times, strategy,
                                                        f"{label}: {strategy}, time per stage"))
    if not sec.blocks:
        sec.note = "No predictions were given."
    return sec


def _nearest(available: Sequence[int], wanted: int) -> int:
    return min(available, key=lambda g: (abs(math.log(g) - math.log(max(wanted, 1))), g))


def timeline_section(runs: Sequence[RunData], groups: Sequence[Sequence[PredictionData]], *,
                     step: int | None, gpus: int | None) -> Section:
    sec = Section(key="timelines", title="Timelines of one step",
                  intro="Every stage of one step on a millisecond axis, one lane per rank and "
                        "stream (compute, communication).")
    for run in runs:
        if run.events.empty:
            continue
        try:
            chosen = metrics.pick_step(run.events, step)
        except ValueError as exc:
            raise ValueError(f"trace {run.path}: {exc}") from None
        label = f"measured: {run.name}, step {chosen}"
        sec.add_figure(timeline.timeline_figure(run.events, chosen, label))
    for group in groups:
        pred = group[0]
        ev = pred.events
        if ev.empty:
            continue
        available = sorted(int(g) for g in ev["gpus"].unique())
        scale = _nearest(available, gpus) if gpus is not None else available[-1]
        at_scale = ev[ev["gpus"].astype(int) == scale]
        for strategy in sorted(at_scale["strategy"].astype(str).unique()):
            sub = at_scale[at_scale["strategy"].astype(str) == strategy]
            chosen = metrics.pick_step(sub)
            label = f"simulated: {pred.name}, {strategy} at {scale} GPUs, step {chosen}"
            if gpus is not None and scale != gpus:
                label += f" (the simulated count nearest to the {gpus} asked for)"
            sec.add_figure(timeline.timeline_figure(
                sub, chosen, label, rank_labels=_class_labels(pred, strategy, scale, chosen)))
    if not sec.blocks:
        sec.note = "No events to draw."
    return sec


def _class_labels(pred: PredictionData, strategy: str, gpus: int, step: int) -> dict[int, str]:
    """"rank R (×N)" for each simulated representative rank standing for N ranks."""
    c = pred.classes
    if c is None or c.empty:
        return {}
    sel = c[(c["strategy"].astype(str) == strategy) & (c["gpus"].astype(int) == gpus)
            & (c["step"].astype(int) == step)]
    return {int(r): f"rank {int(r)} (×{int(n)})" for r, n in zip(sel["rank"], sel["ranks"])}


def telemetry_section(runs: Sequence[RunData]) -> Section:
    sec = Section(key="telemetry", title="Telemetry")
    for run in runs:
        if run.telemetry is None:
            continue
        fig = timeline.telemetry_figure(run.telemetry, f"{run.name}: telemetry")
        if fig is None:
            sec.add_html(paragraph(f"{run.name}: telemetry has no time column or numeric metric."))
        else:
            sec.add_figure(fig)
    if not sec.blocks:
        sec.note = "No trace has telemetry (clocks, power, memory are sampled only on a GPU)."
    return sec


def whatif_section(groups: Sequence[Sequence[PredictionData]]) -> Section:
    sec = Section(key="whatif", title="What-if",
                  intro="Scaling curves of the given predictions of one workload that differ in "
                        "their inputs (bandwidth, intervals, ...), overlaid; labels name the "
                        "differences.")
    for group in groups:
        if len(group) < 2:
            continue
        labels = matching.variant_labels(group)
        workload = matching.prediction_workload(group[0]) or "workload ?"
        sec.add_html(heading(workload))
        sec.add_figure(figures.whatif_figure([(lbl, p.summary) for lbl, p in zip(labels, group)],
                                             f"{workload}: what-if"))
        sec.add_html(table(pd.DataFrame({"label": labels,
                                         "prediction": [str(p.path) for p in group]}),
                           [("label", "variant", fmt_plain),
                            ("prediction", "prediction", fmt_plain)]))
    if not sec.blocks:
        sec.note = ("Give several predictions of the same workload (e.g. simulated with bandwidth "
                    "×0.5 and ×2, or other intervals) to compare them here.")
    return sec


VALIDATION_COLUMNS = ("run", "measured_step_us", "predicted_step_us")


def normalize_validation(validation: pd.DataFrame) -> pd.DataFrame:
    """Check a validation table (one row per held-out run) and fill ``error_pct`` if absent."""
    missing = [c for c in VALIDATION_COLUMNS if c not in validation.columns]
    if missing:
        raise ValueError(f"validation table: missing column(s) {', '.join(missing)}")
    out = validation.copy()
    if "error_pct" not in out.columns:
        out["error_pct"] = [metrics.error_pct(float(p), float(m))
                            for p, m in zip(out["predicted_step_us"], out["measured_step_us"])]
    return out


ValidationSets = Mapping[str, pd.DataFrame]
"""Validation tables by label (e.g. "this CPU", "H200 bf16"), shown side by side."""


def validation_sets(validation: pd.DataFrame | ValidationSets | None) -> dict[str, pd.DataFrame]:
    """``validation`` as labelled, checked tables (one table: labelled "held-out runs")."""
    if validation is None:
        return {}
    if isinstance(validation, pd.DataFrame):
        validation = {"held-out runs": validation}
    return {label: normalize_validation(v) for label, v in validation.items() if not v.empty}


def _abs_errors(val: pd.DataFrame) -> list[float]:
    """The finite |error| values of a validation table."""
    return [abs(e) for e in val["error_pct"].to_numpy(float) if math.isfinite(e)]


def _extra_format(column: str) -> Callable[[Any], str]:
    """A signed percentage for an error column, an unsigned one for another share (the
    spread of the recordings), the value as it is otherwise."""
    if column.endswith("error_pct"):
        return fmt_pct
    return fmt_abs_pct if column.endswith("_pct") else fmt_plain


def validation_section(validation: pd.DataFrame | ValidationSets | None) -> Section:
    sec = Section(key="validation", title="Prediction accuracy (held-out runs)")
    sets = validation_sets(validation)
    if not sets:
        sec.note = "No validation results were given (see kfacperf validate)."
        return sec
    if len(sets) > 1:  # side by side first: one line per set
        rows = pd.DataFrame([(label, len(v), float(np.median(e)) if len(e) else np.nan,
                              float(np.max(e)) if len(e) else np.nan)
                             for label, v in sets.items() for e in [_abs_errors(v)]],
                            columns=["set", "runs", "median_pct", "worst_pct"])
        sec.add_html(table(rows, [("set", "validation", fmt_plain), ("runs", "runs", fmt_plain),
                                  ("median_pct", "median |error|", fmt_abs_pct),
                                  ("worst_pct", "worst |error|", fmt_abs_pct)],
                           numeric=("runs", "median_pct", "worst_pct")))
    for label, val in sets.items():
        if len(sets) > 1:
            sec.add_html(heading(label))
        err = _abs_errors(val)
        if len(err):
            sec.add_html(paragraph(f"{len(val)} held-out runs: median |error| "
                                   f"{np.median(err):.1f}%, worst {np.max(err):.1f}%."))
        extra = [c for c in val.columns if c not in (*VALIDATION_COLUMNS, "error_pct")]
        sec.add_html(table(val, [
            ("run", "run", fmt_plain), ("measured_step_us", "measured step (ms)", fmt_ms),
            ("predicted_step_us", "predicted step (ms)", fmt_ms),
            ("error_pct", "error", fmt_pct),
        ] + [(c, c, _extra_format(c)) for c in extra],
            numeric=("measured_step_us", "predicted_step_us", "error_pct")))
        title = "measured vs predicted step time"
        sec.add_figure(figures.validation_figure(val, f"{label}: {title}" if len(sets) > 1
                                                 else title))
    return sec
