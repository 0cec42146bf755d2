"""Predict the points of a published case with the simulator, from its setup alone."""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from kfacperf.published.cases import PublishedCase, Series

POINT_COLUMNS: tuple[str, ...] = (
    "case", "role", "series", "gpus", "stage", "measured", "predicted", "error_pct", "unit",
)
"""One row per published point: ``measured`` and ``predicted`` in ``unit`` (s or ms)."""
_SIM_ARGS = ("batch_per_gpu", "factor_interval", "inverse_interval", "factor_bucket_mb",
             "ddp_bucket_mb")
_NOT_OPTIONS = ("workload", "device", "cluster", "strategy", *_SIM_ARGS)


def predict_series(case: PublishedCase, series: Series, *,
                   models: Mapping[str, Any] | None = None) -> list[tuple[Any, ...]]:
    """Rows of :data:`POINT_COLUMNS` for one series: every point measured and predicted.

    ``models`` maps a preset name of the setup (device, cluster or workload) to a model
    object to use instead (what a fit tries)."""
    from kfacperf.sim.sweep import simulate

    setup = case.setup_of(series)
    options = {k: v for k, v in setup.items() if k not in _NOT_OPTIONS}
    args = {k: setup[k] for k in _SIM_ARGS if k in setup}
    workload, device, cluster = (
        (models or {}).get(setup[k], setup[k]) for k in ("workload", "device", "cluster"))
    pred = simulate(workload, device, cluster, [setup["strategy"]], gpus=list(series.gpus),
                    events=False, **args, **options)
    step_s = {int(g): float(t) / 1e6 for g, t in zip(pred.summary["gpus"],
                                                     pred.summary["step_us"])}
    rows: list[tuple[Any, ...]] = []
    batch = int(setup["batch_per_gpu"])
    if case.quantity == "stage_ms":
        gpus = series.gpus[0]
        st = pred.stage_times[pred.stage_times["gpus"] == gpus]
        per_stage = st.groupby("stage")["time_us"].sum()
        per_stage["step"] = step_s[int(gpus)] * 1e6  # the whole step
        for name, measured in zip(series.stages, series.values):
            predicted = sum(float(per_stage.get(part, 0.0)) for part in name.split("+")) / 1e3
            rows.append((case.name, case.role, series.name, gpus, name, measured, predicted,
                         error_pct(predicted, measured), "ms"))
        return rows
    for gpus, value in zip(series.gpus, series.values):
        measured = value if case.quantity == "step_s" else batch * gpus / value
        predicted = step_s[int(gpus)]
        rows.append((case.name, case.role, series.name, gpus, "step", measured, predicted,
                     error_pct(predicted, measured), "s"))
    return rows


def error_pct(predicted: float, measured: float) -> float:
    if not (math.isfinite(predicted) and math.isfinite(measured)) or measured == 0:
        return math.nan
    return (predicted - measured) / measured * 100.0
