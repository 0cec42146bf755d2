"""The report's plan section: time to solution and GPU-hours against GPUs for the best SGD
and the best K-FAC configuration, the Pareto front of time against GPU-hours, and the chosen
configurations in a table (from ``kfacperf plan --out plan.json``)."""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, TypeAlias

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from kfacperf import vocab as S
from kfacperf.plan.result import OPTIMIZER_NAMES, Choice, PlanResult, load_plan
from kfacperf.plan.text import comm_text, config_text, fmt_duration
from kfacperf.report.figures import PALETTE, log_axis, plot_text, style_figure
from kfacperf.report.page import Section, fmt_ms, fmt_plain, heading, paragraph, table

OPTIMIZER_COLORS = {S.SGD: PALETTE[0], S.KFAC: PALETTE[1]}

PlanInput: TypeAlias = "PlanResult | Mapping[str, Any] | str | os.PathLike[str] | None"
"""What the section takes: a plan (:func:`kfacperf.plan.plan`), its ``to_dict()``, or the file
:func:`kfacperf.plan.save_plan` (``kfacperf plan --out``) wrote."""


def plan_result(plan: PlanInput) -> PlanResult | None:
    """``plan`` (see :data:`PlanInput`) as a :class:`PlanResult` (None: none given); a file
    is read with :func:`~kfacperf.plan.result.load_plan`.  Anything else is a ``TypeError``
    saying what to pass."""
    if plan is None or isinstance(plan, PlanResult):
        return plan
    if isinstance(plan, (str, os.PathLike)):
        return load_plan(plan)
    if isinstance(plan, Mapping):
        return PlanResult.from_dict(dict(plan))
    raise TypeError("plan: expected the PlanResult of kfacperf.plan.plan(), its to_dict(), or "
                    "the JSON file kfacperf.plan.save_plan / kfacperf plan --out wrote; got "
                    f"{type(plan).__name__}")


def _optimizer_name(optimizer: object) -> object:
    """``SGD``/``K-FAC`` for a known optimizer; anything else as it is."""
    return OPTIMIZER_NAMES.get(optimizer, optimizer) if isinstance(optimizer, str) else optimizer


def _hover(c: Choice) -> str:
    lines = [f"{c.gpus:,} GPUs: {config_text(c, buckets=True)}",
             f"step {c.step_us / 1e3:,.1f} ms x {c.steps:,.0f} steps"
             + (" (extrapolated)" if c.extrapolated else ""),
             f"{fmt_duration(c.time_s)}, {c.gpu_hours:,.1f} GPU-h"]
    return "<br>".join(plot_text(line) for line in lines)


def _log_gpus(fig: go.Figure, gpus: list[int], **where: int) -> None:
    fig.update_xaxes(type="log", title_text="GPUs", tickvals=gpus,
                     ticktext=[f"{g:,}" for g in gpus], **where)


def time_figure(result: PlanResult, title: str) -> go.Figure:
    """Time to solution and GPU-hours against GPUs, the best SGD and K-FAC configuration of
    each GPU count (open markers: steps extrapolated beyond the convergence data)."""
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.1,
                        subplot_titles=("time to solution (hours)", "GPU-hours"))
    gpus = result.gpus
    hours: list[float] = []
    gpu_hours: list[float] = []
    for optimizer in result.convergence:
        best = [c for c in (result.best(g, optimizer) for g in gpus) if c is not None]
        if not best:
            continue
        hours += [c.time_s / 3600 for c in best]
        gpu_hours += [c.gpu_hours for c in best]
        x = [c.gpus for c in best]
        common = {
            "legendgroup": optimizer, "mode": "lines+markers",
            "line": {"color": OPTIMIZER_COLORS.get(optimizer, PALETTE[2])},
            "marker": {"symbol": ["circle-open" if c.extrapolated else "circle" for c in best],
                       "size": 9},
            "text": [_hover(c) for c in best], "hovertemplate": "%{text}<extra></extra>",
        }
        name = plot_text(f"best {OPTIMIZER_NAMES.get(optimizer, optimizer)}")
        fig.add_trace(go.Scatter(name=name, x=x, y=[c.time_s / 3600 for c in best], **common),
                      row=1, col=1)
        fig.add_trace(go.Scatter(name=name, x=x, y=[c.gpu_hours for c in best],
                                 showlegend=False, **common), row=1, col=2)
    for col, values in ((1, hours), (2, gpu_hours)):
        _log_gpus(fig, gpus, row=1, col=col)
        fig.update_yaxes(**log_axis(values), row=1, col=col)
    fig.update_yaxes(title_text="hours", row=1, col=1)
    fig.update_yaxes(title_text="GPU-hours", row=1, col=2)
    return style_figure(fig, title, height=420)


def pareto_figure(result: PlanResult, title: str) -> go.Figure:
    """Every chosen configuration as time against GPU-hours; the front joined by a line."""
    fig = go.Figure()
    for optimizer in result.convergence:
        mine = [c for c in result.choices if c.optimizer == optimizer]
        if not mine:
            continue
        fig.add_trace(go.Scatter(
            name=plot_text(OPTIMIZER_NAMES.get(optimizer, optimizer)), mode="markers",
            x=[c.gpu_hours for c in mine], y=[c.time_s / 3600 for c in mine],
            marker={"color": OPTIMIZER_COLORS.get(optimizer, PALETTE[2]), "size": 9},
            text=[_hover(c) for c in mine], hovertemplate="%{text}<extra></extra>"))
    front = result.pareto()
    if front:
        fig.add_trace(go.Scatter(
            name="Pareto front", mode="lines+text", x=[c.gpu_hours for c in front],
            y=[c.time_s / 3600 for c in front], line={"color": "#444", "dash": "dot"},
            text=[f"{c.gpus:,}" for c in front], textposition="top right",
            hoverinfo="skip"))
    fig.update_xaxes(**log_axis(c.gpu_hours for c in result.choices), title_text="GPU-hours")
    fig.update_yaxes(**log_axis(c.time_s / 3600 for c in result.choices),
                     title_text="time to solution (hours)")
    return style_figure(fig, title, height=420)


def choices_frame(result: PlanResult) -> pd.DataFrame:
    """One row per chosen configuration, best SGD then best K-FAC per GPU count."""
    on_front = {(c.gpus, c.strategy) for c in result.pareto()}
    rows = []
    for g in result.gpus:
        for optimizer in result.convergence:
            c = result.best(g, optimizer)
            if c is None:
                continue
            rows.append({
                "gpus": c.gpus, "optimizer": OPTIMIZER_NAMES.get(optimizer, optimizer),
                "strategy": c.label, "batch": c.batch_per_gpu, "global_batch": c.global_batch,
                "intervals": c.intervals, "comm": comm_text(c),
                "bucket": "-" if c.bucket_mb is None else f"{c.bucket_mb:g}",
                "step_us": c.step_us,
                "steps": f"{c.steps:,.0f}" + (" (extrapolated)" if c.extrapolated else ""),
                "epochs": np.nan if c.epochs is None else round(c.epochs, 1),
                "time": fmt_duration(c.time_s), "gpu_hours": f"{c.gpu_hours:,.1f}",
                "memory": f"{c.memory['total'] / 1e9:.1f}",
                "front": "yes" if (c.gpus, c.strategy) in on_front else "",
            })
    return pd.DataFrame(rows)


_COLUMNS = [
    ("gpus", "GPUs", fmt_plain), ("optimizer", "optimizer", fmt_plain),
    ("strategy", "strategy", fmt_plain), ("batch", "batch/GPU", fmt_plain),
    ("global_batch", "global batch", fmt_plain), ("intervals", "factor/inverse every", fmt_plain),
    ("comm", "factor comm", fmt_plain), ("bucket", "bucket MB", fmt_plain),
    ("step_us", "step (ms)", fmt_ms), ("steps", "steps to target", fmt_plain),
    ("epochs", "epochs", fmt_plain), ("time", "time to solution", fmt_plain),
    ("gpu_hours", "GPU-hours", fmt_plain), ("memory", "memory/GPU (GB)", fmt_plain),
    ("front", "Pareto front", fmt_plain),
]


def _share(value: object) -> str:
    return f"{value:.0%}" if isinstance(value, (int, float)) else fmt_plain(value)


def plan_section(plan: PlanInput) -> Section:
    sec = Section(key="plan", title="Plan: time to solution",
                  intro="For each GPU count, the fastest SGD and K-FAC configuration found by "
                        "kfacperf plan: predicted step time × steps to the convergence "
                        "model's target; configurations that do not fit in memory are never "
                        "chosen.")
    result = plan_result(plan)
    if result is None:
        sec.note = "No plan was given (kfacperf plan --out plan.json, then --plan plan.json)."
        return sec
    i, s = result.inputs, result.stats
    sec.add_html(paragraph(
        f"{i.get('workload')} on {i.get('device')} / {i.get('cluster')}, "
        f"{fmt_plain(i.get('memory_GB'))} GB per GPU ({_share(i.get('memory_fraction'))} "
        f"usable), {i.get('dtype')} compute, {i.get('inverse_method')} inverses; "
        f"{fmt_plain(s.get('configurations'))} configurations searched, "
        f"{fmt_plain(s.get('evaluated'))} evaluated exactly, "
        f"{fmt_plain(s.get('simulated_steps'))} steps simulated."))
    for optimizer, conv in result.convergence.items():
        lo, hi = conv.get("batch_range", ["?", "?"])
        sec.add_html(paragraph(
            f"{OPTIMIZER_NAMES.get(optimizer, optimizer)} steps: {conv.get('name')} "
            f"({conv.get('target')}; measured at global batch {fmt_plain(lo)} to "
            f"{fmt_plain(hi)}; {conv.get('description', '')})"))
    if len({str(c.get("target")) for c in result.convergence.values()}) > 1:  # as kfacperf plan
        sec.add_html(paragraph("Note: the convergence models reach different targets, so SGD "
                               "and K-FAC times are to different qualities."))
    if not result.choices:
        sec.add_html(paragraph("No configuration fits: " + "; ".join(
            f"{m.get('gpus')} GPUs {m.get('optimizer')}: {m.get('reason')}"
            for m in result.missing)))
        return sec
    label = f"{i.get('workload')} on {i.get('cluster')}"
    sec.add_figure(time_figure(result, f"{label}: best SGD and K-FAC per GPU count"))
    sec.add_figure(pareto_figure(result, f"{label}: time to solution against GPU-hours"))
    sec.add_html(heading("Chosen configurations"))
    sec.add_html(table(choices_frame(result), _COLUMNS,
                       numeric=("gpus", "batch", "global_batch", "step_us", "epochs"),
                       caption="steps from the convergence model at the global batch; "
                               "extrapolated where the batch is outside its data"))
    if result.missing:
        sec.add_html(paragraph("Without a configuration: " + "; ".join(
            f"{m.get('gpus')} GPUs, {_optimizer_name(m.get('optimizer'))}: "
            f"{m.get('reason')}" for m in result.missing) + "."))
    return sec
