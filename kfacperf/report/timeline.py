"""Timeline of one step (per rank, compute and comm lanes) and telemetry over a run.

Timelines are horizontal bars with ``base`` = start and length = duration on a millisecond
axis; ``px.timeline`` is avoided because it forces a datetime axis on microsecond data.
"""
from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from kfacperf import vocab as stages
from kfacperf.report import metrics
from kfacperf.report.figures import PALETTE, plot_text, stage_color, style_figure

MAX_RANKS = 16


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def step_events(events: pd.DataFrame, step: int) -> pd.DataFrame:
    """Rows of one step, without the whole-step rows, with ``t_ms``/``dur_ms`` from the step's
    start."""
    ev = events[events["step"] == step].copy()
    for col in ("stage", "layer", "lane"):
        ev[col] = ev[col].astype(str)
    t0 = float(ev["start_us"].min())
    ev = ev[ev["stage"] != stages.STEP]
    ev["t_ms"] = (ev["start_us"] - t0) / 1000.0
    ev["dur_ms"] = ev["dur_us"] / 1000.0
    return ev


def timeline_figure(events: pd.DataFrame, step: int, title: str, *,
                    rank_labels: dict[int, str] | None = None) -> go.Figure:
    """One bar per stage occurrence of ``step``; one lane per (rank, compute|comm).

    ``rank_labels`` names ranks (e.g. a simulated representative rank and how many ranks it
    stands for); plain "rank N" otherwise.
    """
    ev = step_events(events, step)
    ranks = sorted(int(r) for r in ev["rank"].unique())
    shown = ranks[:MAX_RANKS]
    if len(ranks) > len(shown):
        title = f"{title} (first {len(shown)} of {len(ranks)} ranks)"
    ev = ev[ev["rank"].isin(shown)]
    names = {r: plot_text((rank_labels or {}).get(r, f"rank {r}")) for r in shown}
    lanes = [f"{names[r]} · {lane}" for r in shown for lane in stages.LANES]
    ev["lane_label"] = [f"{names[int(r)]} · {lane}" for r, lane in zip(ev["rank"], ev["lane"])]
    fig = go.Figure()
    for stage in metrics.ordered_stages(list(ev["stage"].unique())):
        rows = ev[ev["stage"] == stage]
        hover = [
            f"{plot_text(stage)}{(' · ' + plot_text(layer)) if layer else ''}<br>"
            f"start {t:.3f} ms, {d:.3f} ms" + (f"<br>{_fmt_bytes(int(b))}" if b else "")
            for layer, t, d, b in zip(rows["layer"], rows["t_ms"], rows["dur_ms"], rows["bytes"])
        ]
        fig.add_trace(
            go.Bar(name=plot_text(stage), orientation="h", y=rows["lane_label"].tolist(),
                   base=rows["t_ms"].to_numpy(float), x=rows["dur_ms"].to_numpy(float),
                   marker={"color": stage_color(stage), "line": {"width": 0.5, "color": "white"}},
                   hovertext=hover, hoverinfo="text")
        )
    fig.update_layout(barmode="overlay")
    fig.update_xaxes(title_text="ms since the step began")
    fig.update_yaxes(type="category", categoryorder="array", categoryarray=lanes,
                     autorange="reversed")
    return style_figure(fig, title, height=max(340, 90 + 34 * len(lanes)))


_METRIC_LABELS = {
    "sm_clock_mhz": "SM clock (MHz)", "mem_clock_mhz": "memory clock (MHz)",
    "mem_used_mib": "memory used (MiB)", "power_w": "power (W)",
    "gpu_util_pct": "GPU utilization (%)",
    "mem_util_pct": "memory utilization (%)", "temperature_c": "temperature (°C)",
}
_KEY_COLUMNS = ("rank", "gpu", "t_us", "step")


def telemetry_figure(telemetry: pd.DataFrame, title: str) -> go.Figure | None:
    """One subplot per telemetry metric over the run, one line per (rank, GPU).

    Metrics with no sample (all NaN, e.g. power on a device that does not report it) are left
    out; returns None when nothing is left or the table has no ``t_us``.
    """
    if "t_us" not in telemetry.columns or telemetry.empty:
        return None
    metric_cols = [
        c for c in telemetry.columns
        if c not in _KEY_COLUMNS and pd.api.types.is_numeric_dtype(telemetry[c])
        and not pd.api.types.is_bool_dtype(telemetry[c]) and telemetry[c].notna().any()
    ]
    if not metric_cols:
        return None
    tel = telemetry.sort_values("t_us", kind="stable")
    seconds = (tel["t_us"].astype(float) - float(tel["t_us"].min())) / 1e6
    keys = [c for c in ("rank", "gpu") if c in tel.columns]
    fig = make_subplots(rows=len(metric_cols), cols=1, shared_xaxes=True, vertical_spacing=0.05,
                        subplot_titles=[plot_text(_METRIC_LABELS.get(c, c)) for c in metric_cols])
    groups = tel.groupby(keys, sort=True) if keys else [((), tel)]
    for n, (key, grp) in enumerate(groups):
        key = key if isinstance(key, tuple) else (key,)
        name = plot_text(", ".join(f"{k} {v}" for k, v in zip(keys, key)) or "run")
        color = PALETTE[n % len(PALETTE)]
        for i, col in enumerate(metric_cols, start=1):
            fig.add_trace(
                go.Scatter(name=name, legendgroup=name, showlegend=(i == 1), mode="lines+markers",
                           line={"color": color}, x=seconds.loc[grp.index].to_numpy(float),
                           y=grp[col].to_numpy(float)),
                row=i, col=1,
            )
    fig.update_xaxes(title_text="s since the first sample", row=len(metric_cols), col=1)
    return style_figure(fig, title, height=120 + 170 * len(metric_cols))
