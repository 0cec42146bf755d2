"""Plotly figures of the report: stage breakdowns, predicted vs measured, scaling, what-if.

Every builder takes data frames and returns a :class:`plotly.graph_objects.Figure`; none of
them reads files or knows the page.  Text that comes from the data (run, layer, strategy
names) goes through :func:`plot_text`, because plotly renders strings as a small subset of
HTML: escaped, ``<script>`` shows as the characters it is.
"""
from __future__ import annotations

import html
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from kfacperf import vocab as stages
from kfacperf.report import metrics

PALETTE: list[str] = qualitative.Plotly + qualitative.D3
STAGE_COLORS: dict[str, str] = {name: PALETTE[i] for i, name in enumerate(stages.STAGE_NAMES)}
_DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")
HEIGHT = 380


def plot_text(value: object) -> str:
    """A data string made safe and literal for plotly's HTML-like text rendering."""
    return html.escape(str(value), quote=False)


def stage_color(stage: str) -> str:
    if stage in STAGE_COLORS:
        return STAGE_COLORS[stage]
    return PALETTE[(len(STAGE_COLORS) + sum(map(ord, stage))) % len(PALETTE)]


def strategy_colors(strategies: Iterable[str]) -> dict[str, str]:
    return {s: PALETTE[i % len(PALETTE)] for i, s in enumerate(sorted(set(strategies)))}


def style_figure(fig: go.Figure, title: str, *, height: int = HEIGHT) -> go.Figure:
    fig.update_layout(
        title={"text": plot_text(title), "x": 0.01, "xanchor": "left"},
        template="plotly_white",
        height=height,
        margin={"l": 60, "r": 20, "t": 50, "b": 50},
        legend={"traceorder": "normal"},
    )
    return fig


def _ms(us: pd.Series | np.ndarray | float) -> np.ndarray:
    return np.asarray(us, dtype=float) / 1000.0


def rank_breakdown_figure(breakdown: pd.DataFrame, per_rank: pd.DataFrame, title: str) -> go.Figure:
    """Left: per-step time of each stage on each rank, stacked (comm stages hatched: they may
    overlap compute). Right: time comm is in flight, split into the part hidden under compute
    and the exposed part, with the hidden share in % as text (left out for a run without
    communication, e.g. one rank)."""
    ex = per_rank.reindex(breakdown.index)
    has_comm = bool((ex["comm_us"].fillna(0) > 0).any())
    if has_comm:
        fig = make_subplots(rows=1, cols=2, column_widths=[0.65, 0.35], horizontal_spacing=0.1,
                            subplot_titles=("time per step by stage", "communication"))
    else:
        fig = make_subplots(rows=1, cols=1,
                            subplot_titles=("time per step by stage (no communication)",))
    ranks = [f"rank {r}" for r in breakdown.index]
    for stage in breakdown.columns:
        is_comm = stage in stages.COMM_STAGES
        fig.add_trace(
            go.Bar(name=plot_text(stage), x=ranks, y=_ms(breakdown[stage]), legendgroup="stages",
                   marker={"color": stage_color(stage),
                           "pattern": {"shape": "/" if is_comm else ""}},
                   hovertemplate="%{x}<br>" + plot_text(stage) + ": %{y:.3f} ms<extra></extra>"),
            row=1, col=1,
        )
    fig.update_yaxes(title_text="ms per step", row=1, col=1)
    if has_comm:
        hidden = ex["comm_us"] - ex["exposed_comm_us"]
        overlap_text = [("" if not np.isfinite(o) else f"{o:.0f}% hidden")
                        for o in ex["overlap_pct"]]
        fig.add_trace(go.Bar(name="comm hidden under compute", x=ranks, y=_ms(hidden),
                             marker={"color": "#9aa5b1"}, legendgroup="comm"), row=1, col=2)
        fig.add_trace(go.Bar(name="exposed comm", x=ranks, y=_ms(ex["exposed_comm_us"]),
                             marker={"color": "#d62728"}, legendgroup="comm", text=overlap_text,
                             textposition="outside"), row=1, col=2)
        fig.update_yaxes(title_text="ms per step", row=1, col=2)
    fig.update_layout(barmode="stack")
    return style_figure(fig, title, height=420)


def comparison_figure(comparison: pd.DataFrame, title: str) -> go.Figure:
    """Measured and predicted per-step time of each stage and of the whole step."""
    labels = [plot_text(s) for s in comparison["stage"]]
    err = [("" if not np.isfinite(e) else f"{e:+.1f}%") for e in comparison["error_pct"]]
    fig = go.Figure()
    fig.add_trace(go.Bar(name="measured", x=labels, y=_ms(comparison["measured_us"]),
                         marker={"color": "#1f77b4"}))
    fig.add_trace(go.Bar(name="predicted", x=labels, y=_ms(comparison["predicted_us"]),
                         marker={"color": "#ff7f0e"}, text=err, textposition="outside"))
    fig.update_layout(barmode="group")
    fig.update_yaxes(title_text="ms per step")
    return style_figure(fig, title)


def _wide_range(values: Iterable[float], ratio: float = 20.0) -> bool:
    """Whether positive values span more than ``ratio`` (then a log axis shows them all)."""
    v = np.asarray([x for x in values if np.isfinite(x) and x > 0], dtype=float)
    return bool(len(v)) and v.max() / v.min() > ratio


def _tick_text(value: float) -> str:
    return f"{int(value):,}" if value >= 1 and value == int(value) else f"{value:.6g}"


def log_ticks(values: Iterable[float]) -> tuple[list[float], list[str]]:
    """Ticks of a log axis over positive ``values``, each labelled with its whole value.

    Left to itself plotly labels the minor ticks of a log axis with their first digit only
    ("2", "5" between 0.1 and 1 and again between 1 and 10), which reads as the wrong
    number; these are 1-2-5 steps (finer over less than a decade, powers of ten over many).
    """
    v = np.asarray([x for x in values if np.isfinite(x) and x > 0], dtype=float)
    if not len(v):
        return [], []
    lo, hi = float(v.min()), float(v.max())
    decades = np.log10(hi / lo)
    mantissas: tuple[float, ...] = ((1, 1.5, 2, 3, 4, 5, 6, 8) if decades < 1 else
                                    (1, 2, 5) if decades < 4 else (1,))
    first, last = int(np.floor(np.log10(lo))) - 1, int(np.ceil(np.log10(hi))) + 1
    ticks = [float(f"{m * 10.0 ** e:.6g}") for e in range(first, last + 1) for m in mantissas]
    ticks = [t for t in ticks if lo / 1.5 <= t <= hi * 1.5]
    return ticks, [_tick_text(t) for t in ticks]


def log_axis(values: Iterable[float]) -> dict[str, object]:
    """Axis settings of a log axis over ``values``, its ticks labelled in full."""
    ticks, text = log_ticks(values)
    return {"type": "log", "tickvals": ticks, "ticktext": text} if ticks else {"type": "log"}


def _log_y_if_wide(fig: go.Figure, values: Iterable[float], **where: int) -> None:
    values = list(values)
    if _wide_range(values):
        fig.update_yaxes(**log_axis(values), **where)


def _log_x(fig: go.Figure, gpus: Sequence[int], **where: int) -> None:
    ticks = sorted({int(g) for g in gpus})
    fig.update_xaxes(type="log", title_text="GPUs", tickvals=ticks,
                     ticktext=[str(t) for t in ticks], **where)


def scaling_figure(summary: pd.DataFrame, title: str) -> go.Figure:
    """Predicted step time, scaling efficiency and K-FAC overhead over SGD vs GPU count."""
    fig = make_subplots(rows=1, cols=3, horizontal_spacing=0.08,
                        subplot_titles=("step time (ms)", "scaling efficiency",
                                        "K-FAC overhead over SGD (×)"))
    colors = strategy_colors(summary["strategy"].astype(str))
    for strategy, grp in (summary.assign(strategy=summary["strategy"].astype(str))
                          .groupby("strategy", sort=True)):
        grp = grp.sort_values("gpus")
        gpus = grp["gpus"].astype(int).to_numpy()
        common = {"legendgroup": strategy, "line": {"color": colors[strategy]},
                  "mode": "lines+markers"}
        fig.add_trace(go.Scatter(name=plot_text(strategy), x=gpus, y=_ms(grp["step_us"]),
                                 **common), row=1, col=1)
        fig.add_trace(go.Scatter(name=plot_text(strategy), x=gpus,
                                 y=grp["scaling_efficiency"].to_numpy(float),
                                 showlegend=False, **common), row=1, col=2)
        overhead = grp["kfac_overhead"].to_numpy(float)
        if np.isfinite(overhead).any():
            fig.add_trace(go.Scatter(name=plot_text(strategy), x=gpus, y=overhead,
                                     showlegend=False, **common),
                          row=1, col=3)
    for col in (1, 2, 3):
        _log_x(fig, summary["gpus"], row=1, col=col)
    _log_y_if_wide(fig, _ms(summary["step_us"]), row=1, col=1)  # the axis is in ms
    _log_y_if_wide(fig, summary["kfac_overhead"].to_numpy(float), row=1, col=3)
    return style_figure(fig, title, height=400)


def stage_scaling_figure(stage_times: pd.DataFrame, strategy: str, title: str) -> go.Figure:
    """Per-stage predicted time per step, stacked, one bar per GPU count (categorical axis)."""
    st = stage_times[stage_times["strategy"].astype(str) == strategy]
    st = st.assign(stage=st["stage"].astype(str))
    st = st[st["stage"] != stages.STEP]
    table = st.pivot_table(index="gpus", columns="stage", values="time_us", aggfunc="sum",
                           fill_value=0.0)
    table = table.sort_index()
    x = [str(int(g)) for g in table.index]
    fig = go.Figure()
    for stage in metrics.ordered_stages(list(table.columns)):
        fig.add_trace(go.Bar(name=plot_text(stage), x=x, y=_ms(table[stage]),
                             marker={"color": stage_color(stage)},
                             hovertemplate=("%{x} GPUs<br>" + plot_text(stage)
                                            + ": %{y:.3f} ms<extra></extra>")))
    fig.update_layout(barmode="stack")
    fig.update_xaxes(title_text="GPUs", type="category")
    fig.update_yaxes(title_text="ms per step (slowest rank)")
    return style_figure(fig, title)


def whatif_figure(variants: Sequence[tuple[str, pd.DataFrame]], title: str) -> go.Figure:
    """Scaling curves of several predictions overlaid: color = strategy, dash = variant."""
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.08,
                        subplot_titles=("step time (ms)", "K-FAC overhead over SGD (×)"))
    colors = strategy_colors(pd.concat([s["strategy"].astype(str) for _, s in variants]))
    all_gpus: list[int] = []
    for i, (label, summary) in enumerate(variants):
        dash = _DASHES[i % len(_DASHES)]
        for strategy, grp in (summary.assign(strategy=summary["strategy"].astype(str))
                              .groupby("strategy", sort=True)):
            grp = grp.sort_values("gpus")
            gpus = grp["gpus"].astype(int).to_numpy()
            all_gpus.extend(gpus.tolist())
            name = plot_text(f"{strategy} · {label}")
            common = {"legendgroup": name, "mode": "lines+markers",
                      "line": {"color": colors[strategy], "dash": dash}}
            fig.add_trace(go.Scatter(name=name, x=gpus, y=_ms(grp["step_us"]), **common),
                          row=1, col=1)
            overhead = grp["kfac_overhead"].to_numpy(float)
            if np.isfinite(overhead).any():
                fig.add_trace(go.Scatter(name=name, x=gpus, y=overhead, showlegend=False,
                                         **common), row=1, col=2)
    for col in (1, 2):
        _log_x(fig, all_gpus, row=1, col=col)
    _log_y_if_wide(fig, np.concatenate([_ms(s["step_us"]) for _, s in variants]),
                   row=1, col=1)
    _log_y_if_wide(fig, np.concatenate([s["kfac_overhead"].to_numpy(float) for _, s in variants]),
                   row=1, col=2)
    return style_figure(fig, title, height=440)


def validation_figure(validation: pd.DataFrame, title: str) -> go.Figure:
    """Measured vs predicted step time of each held-out run, error in % above the bars."""
    runs = [plot_text(r) for r in validation["run"]]
    err = [("" if not np.isfinite(e) else f"{e:+.1f}%")
           for e in validation["error_pct"].astype(float)]
    fig = go.Figure()
    fig.add_trace(go.Bar(name="measured", x=runs, y=_ms(validation["measured_step_us"]),
                         marker={"color": "#1f77b4"}))
    fig.add_trace(go.Bar(name="predicted", x=runs, y=_ms(validation["predicted_step_us"]),
                         marker={"color": "#ff7f0e"}, text=err, textposition="outside"))
    fig.update_layout(barmode="group")
    fig.update_yaxes(title_text="step time (ms)")
    return style_figure(fig, title)
