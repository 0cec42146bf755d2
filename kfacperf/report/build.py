"""``build_report``: traces and predictions in, one self-contained HTML page out."""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from kfacperf import __version__
from kfacperf.plan.result import PlanResult
from kfacperf.report import matching, sections
from kfacperf.report.inputs import PredictionData, RunData, load_predictions, load_runs
from kfacperf.report.page import Section, fmt_ms, fmt_pct, fmt_ratio, render_page
from kfacperf.report.plan import plan_section
from kfacperf.report.published_section import published_section
from kfacperf.safety import atomic_write_text

MAX_BYTES = 8 * 1024 * 1024


def _runs(items: Sequence[str | Path | RunData]) -> list[RunData]:
    loaded = {i: it for i, it in enumerate(items) if isinstance(it, RunData)}
    paths = [it for it in items if not isinstance(it, RunData)]
    fresh = iter(load_runs(paths))
    return [loaded[i] if i in loaded else next(fresh) for i in range(len(items))]


def _predictions(items: Sequence[str | Path | PredictionData]) -> list[PredictionData]:
    loaded = {i: it for i, it in enumerate(items) if isinstance(it, PredictionData)}
    paths = [it for it in items if not isinstance(it, PredictionData)]
    fresh = iter(load_predictions(paths))
    return [loaded[i] if i in loaded else next(fresh) for i in range(len(items))]


def build_sections(runs: Sequence[RunData], predictions: Sequence[PredictionData], *,
                   validation: pd.DataFrame | sections.ValidationSets | None = None,
                   timeline_step: int | None = None,
                   timeline_gpus: int | None = None, plan: PlanResult | None = None,
                   published: Mapping[str, Any] | None = None) -> list[Section]:
    """All sections of the page, in order (empty ones carry a note instead of content)."""
    groups = matching.group_by_workload(predictions)
    head = matching.headline(runs, predictions)
    return [
        sections.summary_section(runs, predictions, head),
        sections.breakdown_section(runs),
        sections.comparison_section(runs, predictions),
        sections.validation_section(validation),
        published_section(published),
        sections.scaling_section(groups),
        sections.timeline_section(runs, groups, step=timeline_step, gpus=timeline_gpus),
        sections.telemetry_section(runs),
        sections.whatif_section(groups),
        plan_section(plan),
    ]


def headline_text(runs: Sequence[RunData], predictions: Sequence[PredictionData]) -> str:
    """The headline numbers as a plain-text table (what ``kfacperf report`` prints)."""
    head = matching.headline(runs, predictions)
    if head.empty:
        return ""
    cols: list[tuple[str, str, Callable[[Any], str]]] = [
            ("run", "run", str), ("strategy", "strategy", str), ("world_size", "GPUs", str),
            ("measured_step_us", "measured ms", fmt_ms),
            ("predicted_step_us", "predicted ms", fmt_ms),
            ("error_pct", "error", fmt_pct),
            ("kfac_overhead_measured", "overhead meas.", fmt_ratio),
            ("kfac_overhead_predicted", "overhead pred.", fmt_ratio)]
    cells = [[h for _, h, _ in cols]] + [[fmt(row[c]) for c, _, fmt in cols]
                                         for _, row in head.iterrows()]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cols))]
    lines = ["  ".join(v.ljust(w) if i < 3 else v.rjust(w)
                       for i, (v, w) in enumerate(zip(r, widths)))
             for r in cells]
    return "\n".join(line.rstrip() for line in lines)


def default_title(runs: Sequence[RunData], predictions: Sequence[PredictionData],
                  plan: PlanResult | None = None) -> str:
    names = ([matching.run_workload(r) for r in runs]
             + [matching.prediction_workload(p) for p in predictions])
    if plan is not None:
        names.append(str(plan.inputs.get("workload") or ""))
    workloads = sorted({n for n in names if n})
    return "kfacperf report" + (": " + ", ".join(workloads) if workloads else "")


def build_report(traces: Sequence[str | Path | RunData],
                 predictions: Sequence[str | Path | PredictionData],
                 out: str | Path,
                 validation: pd.DataFrame | sections.ValidationSets | None = None, *,
                 title: str | None = None,
                 timeline_step: int | None = None, timeline_gpus: int | None = None,
                 plan: PlanResult | None = None,
                 published: Mapping[str, Any] | None = None) -> Path:
    """Write the report for ``traces`` (trace directories) and ``predictions`` (prediction
    directories) to ``out`` (atomically; the caller decides whether an existing file may be
    replaced) and return its path.

    ``published`` is what ``kfacperf validate --published --out FILE.json`` wrote (the
    published GPU cases beside their predictions).  ``validation`` is an optional table of
    held-out runs (columns ``run``, ``measured_step_us``, ``predicted_step_us`` and optionally
    ``error_pct`` and more), or several by label (a CPU and a GPU validation side by side),
    shown as the accuracy section.  ``timeline_step`` picks the
    measured step drawn as a timeline (default: the first step with the most stages);
    ``timeline_gpus`` the simulated scale (default: the largest GPU count with events; the
    nearest available otherwise).
    ``plan`` (from :func:`kfacperf.plan.load_plan`) fills the plan section.
    """
    validation = sections.validation_sets(validation) or None
    if not traces and not predictions and plan is None and not published and not validation:
        raise ValueError("nothing to report: give at least one trace, prediction, validation, "
                         "plan or published results file")
    runs = _runs(traces)
    preds = _predictions(predictions)
    secs = build_sections(runs, preds, validation=validation, timeline_step=timeline_step,
                          timeline_gpus=timeline_gpus, plan=plan,
                          published=published)
    subtitle = (f"{len(runs)} measured run(s), {len(preds)} prediction(s)"
                + (", a plan" if plan is not None else "")
                + f" · generated by kfacperf {__version__}")
    inputs = [str(r.path) for r in runs] + [str(p.path) for p in preds]
    footer = "Inputs: " + ", ".join(inputs) if inputs else ""
    text = render_page(title=title or default_title(runs, preds, plan), subtitle=subtitle,
                       sections=secs, footer=footer)
    return atomic_write_text(out, text)
