"""Host work between stages: the time a K-FAC step spends outside every stage.

The preconditioner does two pieces of per-layer work that no stage encloses (see
``KFACPreconditioner.step``): right after backward it forms every layer's gradient matrix
(``load_grad``), and right before the update it writes the preconditioned gradients back with
the KL-clipping scale (``write_grad``).  A measured step contains both; a trace's stage times
do not.  On the development CPU a single-process ResNet-20 step spends 0.35-0.5 ms and
0.7-0.8 ms there, alike for KAISA and SP-NGD, at batch 16 and 32, on plain, factor and
inverse steps: host work that scales with the number of layers, not the batch.

This module measures both gaps in a trace and fits them per K-FAC layer (every Fisher block,
BatchNorm blocks included, loads and writes a gradient), for the device
model's ``[layer_host_us]`` (:data:`kfacperf.sim.models.device.HOST_STEPS`).  Only
single-process traces are used: there no peer's collective can fill either gap.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from kfacperf import vocab as S
from kfacperf.calibrate.fitting import sig
from kfacperf.sim.models.device import HOST_STEPS
from kfacperf.trace.measure import measured_events
from kfacperf.trace.schema import fisher_options

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd


def step_host_gaps(events: pd.DataFrame) -> pd.DataFrame:
    """Per ``(rank, step)`` of a K-FAC trace: ``load_grad`` and ``write_grad`` in microseconds.

    ``load_grad``: from the end of ``backward`` to the start of the first event (any lane)
    that starts at or after it.  ``write_grad``: from the latest end of an event that ends at
    or before ``update`` starts, to that start.  A step without backward, without update, or
    with nothing in between is left out.
    """
    import numpy as np
    import pandas as pd

    ev = events[events["stage"].astype(str) != S.STEP]
    stage_all = ev["stage"].astype(str).to_numpy()
    start_all = ev["start_us"].to_numpy(float)
    end_all = start_all + ev["dur_us"].to_numpy(float)
    rows = []
    for (rank, step), idx in ev.groupby(["rank", "step"], sort=True).indices.items():
        stage, start, end = stage_all[idx], start_all[idx], end_all[idx]
        bwd, upd = stage == S.BACKWARD, stage == S.UPDATE
        if not bwd.any() or not upd.any():
            continue
        b_end, u_start = end[bwd].max(), start[upd].min()
        between = ~bwd & ~upd & (start >= b_end) & (end <= u_start)
        if not between.any():
            continue
        rows.append((int(rank), int(step), float(start[between].min() - b_end),
                     float(u_start - end[between].max())))
    return pd.DataFrame(rows, columns=["rank", "step", *HOST_STEPS]).astype(
        {"rank": np.int64, "step": np.int64})


def fit_layer_host_us(
    traces: Sequence[tuple[str, pd.DataFrame, int]],
) -> tuple[dict[str, float], list[str]]:
    """Host time per K-FAC layer of each of :data:`HOST_STEPS`, and notes.

    ``traces``: ``(label, measured events, K-FAC layers)`` of single-process K-FAC runs.  Per
    trace the median over its steps, divided by its layers; over traces the median.  No
    trace: nothing fitted (the device model then has none, which means 0).
    """
    import numpy as np

    per_trace: dict[str, list[float]] = {k: [] for k in HOST_STEPS}
    for label, events, layers in traces:
        if layers < 1:
            raise ValueError(f"{label}: a K-FAC run needs at least one K-FAC layer, got {layers}")
        gaps = step_host_gaps(events)
        if gaps.empty:
            continue
        for key in HOST_STEPS:
            per_trace[key].append(float(np.median(gaps[key].clip(lower=0.0))) / layers)
    if not per_trace[HOST_STEPS[0]]:
        return {}, []
    out = {k: sig(float(np.median(v)), 4) for k, v in per_trace.items()}
    n = len(per_trace[HOST_STEPS[0]])
    notes = ["host work between stages: " + ", ".join(f"{k} {v:.1f} us" for k, v in out.items())
             + f" per K-FAC layer (median of {n} K-FAC trace(s))"]
    return out, notes


def kfac_trace_gaps_input(trace: Any, workload: Any) -> tuple[str, pd.DataFrame, int] | None:
    """``(label, events, layers)`` for :func:`fit_layer_host_us`, or None for a non-K-FAC
    or multi-process trace."""
    run = trace.run
    if run.get("optimizer") != S.KFAC or int(run.get("world_size") or 1) != 1:
        return None
    events = measured_events(trace)
    label = str(getattr(trace, "path", None) or run.get("workload", "trace"))
    return label, events, len(workload.fisher_layers(fisher_options(run)["bn_blocks"]))
