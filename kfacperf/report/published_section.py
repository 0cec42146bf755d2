"""The report's section on published GPU measurements: each curve beside its prediction.

Input is what ``kfacperf validate --published --out FILE.json`` writes
(:meth:`kfacperf.validation.published.PublishedResult.to_dict`): cases with their citation and
role, one row per point.  Curves (``step_s``/``images_per_s``) are drawn against GPUs on a
log-2 axis, measured as markers, predicted as lines; stage breakdowns as grouped bars.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from kfacperf.report.figures import PALETTE, plot_text, style_figure
from kfacperf.report.page import Section, fmt_abs_pct, fmt_plain, heading, paragraph, table

if TYPE_CHECKING:  # pragma: no cover
    from kfacperf.validation.published import PublishedResult

REQUIRED = ("cases", "points", "series")

PublishedInput: TypeAlias = "PublishedResult | Mapping[str, Any] | str | os.PathLike[str] | None"
"""What the section takes: the result of :func:`kfacperf.validation.published.validate_published`,
its ``to_dict()``, or the JSON file ``kfacperf validate --published --out`` wrote."""


def load_published(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a ``validate --published`` JSON file (errors name the file and what is missing)."""
    from kfacperf.safety import load_json_file

    p = Path(path)
    try:
        data = load_json_file(p, what="published results file")
    except ValueError as exc:
        raise ValueError(f"{exc} (not a published results file)") from None
    if not isinstance(data, dict) or any(k not in data for k in REQUIRED):
        raise ValueError(f"{p}: expected the JSON of kfacperf validate --published --out "
                         f"(keys {', '.join(REQUIRED)})")
    return data


def published_data(published: PublishedInput) -> dict[str, Any] | None:
    """``published`` (see :data:`PublishedInput`) as the section's data (None: none given);
    anything else is a ``TypeError`` saying what to pass."""
    if published is None:
        return None
    if isinstance(published, (str, os.PathLike)):
        return load_published(published)
    if isinstance(published, Mapping):
        missing = [k for k in REQUIRED if k not in published]
        if missing:
            raise ValueError(f"published results: missing key(s) {', '.join(missing)} (give "
                             "PublishedResult.to_dict() or what validate --published --out wrote)")
        return dict(published)
    if hasattr(published, "points") and hasattr(published, "cases"):
        from kfacperf.validation.published import PublishedResult

        if isinstance(published, PublishedResult):
            return published.to_dict()
    raise TypeError("published: expected the PublishedResult of kfacperf.validation.published."
                    "validate_published(), its to_dict(), or the JSON file kfacperf validate "
                    f"--published --out wrote; got {type(published).__name__}")


def published_section(data: PublishedInput) -> Section:
    sec = Section(key="published", title="Published GPU measurements vs prediction")
    data = published_data(data)
    if not data:
        sec.note = ("No published results were given (kfacperf validate --published "
                    "--out FILE.json, then kfacperf report --published FILE.json).")
        return sec
    points = pd.DataFrame(data["points"])
    series = pd.DataFrame(data["series"])
    sec.intro = ("Each published case is predicted from the setup it states alone. Cases of "
                 "the calibration set shaped the presets; held-out cases never did.")
    for role in ("calibration", "held-out"):
        errs = points.loc[points["role"] == role, "error_pct"].astype(float).abs()
        errs = errs[np.isfinite(errs)]
        if len(errs):
            sec.add_html(paragraph(f"{role}: {len(errs)} points, median |error| "
                                   f"{np.median(errs):.1f}%, worst {np.max(errs):.1f}%."))
    for case in data["cases"]:
        pts = points[points["case"] == case["name"]]
        if pts.empty:
            continue
        sec.add_html(heading(f"{case['name']} ({case['role']}): {case['title']}"))
        sec.add_html(paragraph(case["citation"]))
        sec.add_figure(_case_figure(case, pts))
        rows = series[series["case"] == case["name"]]
        sec.add_html(table(rows, [
            ("series", "series", fmt_plain),
            ("median_abs_error_pct", "median |error|", fmt_abs_pct),
            ("worst_abs_error_pct", "worst |error|", fmt_abs_pct),
            ("measured_fastest_gpus", "fastest (measured)", fmt_plain),
            ("predicted_fastest_gpus", "fastest (predicted)", fmt_plain),
        ], numeric=("median_abs_error_pct", "worst_abs_error_pct")))
    return sec


def _case_figure(case: Mapping[str, Any], pts: pd.DataFrame) -> go.Figure:
    fig = go.Figure()
    if case["quantity"] == "stage_ms":
        for i, (name, grp) in enumerate(pts.groupby("series", sort=False)):
            color = PALETTE[i % len(PALETTE)]
            stages = [plot_text(s) for s in grp["stage"]]
            fig.add_trace(go.Bar(name=plot_text(f"{name} measured"), x=stages,
                                 y=grp["measured"], marker_color=color, opacity=0.5))
            fig.add_trace(go.Bar(name=plot_text(f"{name} predicted"), x=stages,
                                 y=grp["predicted"], marker_color=color,
                                 text=[f"{e:+.0f}%" for e in grp["error_pct"]]))
        fig.update_layout(barmode="group", yaxis_title="ms")
        return style_figure(fig, str(case["name"]), height=380)  # style_figure escapes it
    ticks = sorted({int(g) for g in pts["gpus"]})
    for i, (name, grp) in enumerate(pts.groupby("series", sort=False)):
        color = PALETTE[i % len(PALETTE)]
        grp = grp.sort_values("gpus")
        group = plot_text(name)
        fig.add_trace(go.Scatter(name=plot_text(f"{name} measured"), x=grp["gpus"],
                                 y=grp["measured"], mode="markers", legendgroup=group,
                                 marker={"color": color, "size": 8},
                                 hovertemplate="%{x} GPUs: %{y:.4g} s measured"))
        # markers too: a series of one GPU count has no line to draw
        fig.add_trace(go.Scatter(name=plot_text(f"{name} predicted"), x=grp["gpus"],
                                 y=grp["predicted"], mode="lines+markers", legendgroup=group,
                                 line={"color": color},
                                 marker={"color": color, "size": 9, "symbol": "diamond-open"},
                                 customdata=grp["error_pct"],
                                 hovertemplate="%{x} GPUs: %{y:.4g} s predicted "
                                               "(%{customdata:+.1f}%)"))
    fig.update_xaxes(type="log", title_text="GPUs", tickvals=ticks,
                     ticktext=[str(t) for t in ticks])
    fig.update_yaxes(title_text="seconds per step")
    return style_figure(fig, str(case["name"]), height=420)  # style_figure escapes it
