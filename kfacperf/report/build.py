"""``build_report``: traces and predictions in, one self-contained HTML page out."""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from kfacperf import __version__
from kfacperf.plan.result import PlanResult
from kfacperf.report import matching, sections
from kfacperf.report.inputs import (
    PredictionData,
    RunData,
    ValidationInput,
    load_predictions,
    load_runs,
    validation_tables,
)
from kfacperf.report.page import Section, fmt_ms, fmt_pct, fmt_ratio, render_page
from kfacperf.report.plan import PlanInput, plan_result, plan_section
from kfacperf.report.published_section import PublishedInput, published_data, published_section
from kfacperf.report.sources import given_files, sources_section
from kfacperf.safety import atomic_write_text
from kfacperf.trace.arguments import one_or_many

MAX_BYTES = 8 * 1024 * 1024
_DIR = (str, os.PathLike)


def _runs(items: str | os.PathLike[str] | RunData | Sequence[str | os.PathLike[str] | RunData]
          ) -> list[RunData]:
    given = one_or_many(items, (*_DIR, RunData), what="traces",
                        expected="a trace directory or a RunData")
    loaded = {i: it for i, it in enumerate(given) if isinstance(it, RunData)}
    fresh = iter(load_runs([it for it in given if not isinstance(it, RunData)]))
    return [loaded[i] if i in loaded else next(fresh) for i in range(len(given))]


def _predictions(items: str | os.PathLike[str] | PredictionData
                 | Sequence[str | os.PathLike[str] | PredictionData]) -> list[PredictionData]:
    given = one_or_many(items, (*_DIR, PredictionData), what="predictions",
                        expected="a prediction directory or a PredictionData")
    loaded = {i: it for i, it in enumerate(given) if isinstance(it, PredictionData)}
    fresh = iter(load_predictions([it for it in given if not isinstance(it, PredictionData)]))
    return [loaded[i] if i in loaded else next(fresh) for i in range(len(given))]


def build_sections(runs: Sequence[RunData], predictions: Sequence[PredictionData], *,
                   validation: ValidationInput = None,
                   timeline_step: int | None = None,
                   timeline_gpus: int | None = None, plan: PlanInput = None,
                   published: PublishedInput = None) -> list[Section]:
    """All sections of the page, in order (empty ones carry a note instead of content).
    ``validation``, ``plan`` and ``published`` are what :func:`build_report` takes."""
    groups = matching.group_by_workload(predictions)
    head = matching.headline(runs, predictions)
    return [
        sections.summary_section(runs, predictions, head),
        sections.breakdown_section(runs),
        sections.comparison_section(runs, predictions),
        sections.validation_section(validation_tables(validation)),
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


def build_report(traces: str | os.PathLike[str] | RunData
                 | Sequence[str | os.PathLike[str] | RunData],
                 predictions: str | os.PathLike[str] | PredictionData
                 | Sequence[str | os.PathLike[str] | PredictionData],
                 out: str | os.PathLike[str],
                 validation: ValidationInput = None, *,
                 title: str | None = None,
                 timeline_step: int | None = None, timeline_gpus: int | None = None,
                 plan: PlanInput = None,
                 published: PublishedInput = None,
                 files: Mapping[str, Sequence[str]] | None = None) -> Path:
    """Write the report for ``traces`` (trace directories) and ``predictions`` (prediction
    directories), each one alone or a list, to ``out`` (atomically; the caller decides
    whether an existing file may be replaced) and return its path.

    ``published`` is the result of :func:`kfacperf.validation.published.validate_published`,
    its ``to_dict()``, or the file ``kfacperf validate --published --out FILE.json`` wrote
    (the published GPU cases beside their predictions).  ``validation`` is the held-out runs
    shown as the accuracy section: the result of :func:`kfacperf.validation.validate`, a
    file ``kfacperf validate --out`` wrote, or a table (columns ``run``,
    ``measured_step_us``, ``predicted_step_us`` and optionally ``error_pct`` and more); or
    several, as a list of files or a dict by label (a CPU and a GPU validation side by side;
    :func:`kfacperf.report.inputs.validation_tables`).  ``timeline_step`` picks the
    measured step drawn as a timeline (default: the first step with the most stages);
    ``timeline_gpus`` the simulated scale (default: the largest GPU count with events; the
    nearest available otherwise).
    ``plan`` (the result of :func:`kfacperf.plan.plan`, or the file
    :func:`kfacperf.plan.save_plan` wrote) fills the plan section.  The Sources section names
    every trace and prediction, and the validation, plan and published files: those given
    as paths, or ``files`` by kind (``validation``, ``plan``, ``published``) where the
    caller read them itself.  Anything else given for
    ``validation``, ``plan`` or ``published`` is a ``TypeError`` saying what to pass.
    """
    tables = sections.validation_sets(validation_tables(validation))
    planned = plan_result(plan)
    pub = published_data(published)
    runs = _runs(traces)
    preds = _predictions(predictions)
    if not runs and not preds and planned is None and not pub and not tables:
        raise ValueError("nothing to report: give at least one trace, prediction, validation, "
                         "plan or published results file")
    secs = build_sections(runs, preds, validation=tables, timeline_step=timeline_step,
                          timeline_gpus=timeline_gpus, plan=planned, published=pub)
    if files is None:
        files = {"validation": given_files(validation), "plan": given_files(plan),
                 "published": given_files(published)}
    secs.append(sources_section(runs, preds, files))
    subtitle = (f"{len(runs)} measured run(s), {len(preds)} prediction(s)"
                + (", a plan" if planned is not None else "")
                + f" · generated by kfacperf {__version__}")
    inputs = ([str(r.path) for r in runs] + [str(p.path) for p in preds]
              + [f for paths in files.values() for f in paths])
    footer = "Inputs: " + ", ".join(inputs) if inputs else ""
    text = render_page(title=title or default_title(runs, preds, planned), subtitle=subtitle,
                       sections=secs, footer=footer)
    return atomic_write_text(out, text)
