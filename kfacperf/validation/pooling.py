"""Several recordings of one configuration, pooled into one measurement.

On a shared machine the same steps drift by 10-20% from one minute to the next, so one
recording of a configuration measures the machine's mood as much as the configuration.  A
held-out configuration recorded several times (``scripts/record-reference-traces.sh`` writes
``<name>-r1``, ``<name>-r2``, ...) is predicted once and compared with the mean of its
recordings: per kind of step, each recording's median counts once.  The spread between the
recordings is reported next to the error, so a reader sees the noise floor the error sits on.

Two traces are recordings of one configuration when everything the prediction reads from
``run.json`` (and the device they ran on) is equal: the settings of
:data:`CONFIGURATION_KEYS`, the Fisher blocks and estimator (``bn_blocks``, ``fisher``, with
the defaults for traces recorded before they were), and the workload's identity (its
options and fingerprint: two user models of one file and function name are two workloads);
their names do not matter.  The grouping does not depend on the order of the traces.
"""
from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from kfacperf.trace.measure import KINDS, Measured
from kfacperf.trace.schema import fisher_options
from kfacperf.validation.inputs import device_key, trace_label

if TYPE_CHECKING:  # pragma: no cover
    from kfacperf.trace.store import Trace

CONFIGURATION_KEYS: tuple[str, ...] = (
    "workload", "workload_options", "world_size", "batch_per_rank", "optimizer", "strategy",
    "grad_worker_fraction", "factor_interval", "inverse_interval", "inverse_method",
    "comm_dtype", "symmetric", "fused", "bucket_cap_mb", "threads_per_rank", "isolate",
    "timing", "backend", "heap", "precision", "precision_flags", "workload_fingerprint",
)
"""The run.json settings that make two recordings the same configuration (besides
``bn_blocks`` and ``fisher``, taken with their defaults by :func:`configuration_key`)."""

_REPEAT_SUFFIX = re.compile(r"-r\d+$")


def configuration_key(trace: Trace) -> str:
    """What two recordings of one configuration share (settings and device)."""
    run = trace.run
    settings: dict[str, Any] = {k: run.get(k) for k in CONFIGURATION_KEYS}
    settings["workload_options"] = run.get("workload_options") or {}
    settings["workload_fingerprint"] = str(run.get("workload_fingerprint") or "")
    settings.update(fisher_options(run))
    return json.dumps([settings, device_key(trace)], sort_keys=True, default=str)


def group_recordings(traces: Sequence[Trace]) -> list[list[Trace]]:
    """The traces grouped by configuration, groups in order of their first trace."""
    groups: dict[str, list[Trace]] = {}
    for t in traces:
        groups.setdefault(configuration_key(t), []).append(t)
    return list(groups.values())


def pooled_label(traces: Sequence[Trace]) -> str:
    """The recordings' common name: ``name`` for ``name-r1, name-r2``; else the first's name."""
    labels = [trace_label(t) for t in traces]
    stems = {_REPEAT_SUFFIX.sub("", lab) for lab in labels}
    if len(stems) == 1 and (len(labels) > 1 or _REPEAT_SUFFIX.search(labels[0])):
        return stems.pop()
    if len(labels) == 1:
        return labels[0]
    return f"{labels[0]} (+{len(labels) - 1} recording(s) of the same configuration)"


def pooled_labels(groups: Sequence[Sequence[Trace]]) -> list[str]:
    """:func:`pooled_label` of each group, unique: groups whose common names coincide (``x-r1``
    and ``x-r2`` of two configurations) are named by their first trace's own name, and by its
    path where that repeats too."""
    common = [pooled_label(g) for g in groups]
    labels = list(common)
    for i, g in enumerate(groups):
        if common.count(common[i]) > 1:
            own = trace_label(g[0])
            more = f" (+{len(g) - 1} recording(s) of the same configuration)" if len(g) > 1 else ""
            labels[i] = own + more
    for i, g in enumerate(groups):
        if labels.count(labels[i]) > 1:
            labels[i] = str(getattr(g[0], "path", None) or labels[i]) + labels[i][
                len(trace_label(g[0])):]
    return labels


def spread_pct(measured: Sequence[Measured]) -> float:
    """(max - min) / mean of the recordings' step times, in percent (0 for one recording)."""
    times = [m.step_time for m in measured]
    mean = sum(times) / len(times)
    return 100.0 * (max(times) - min(times)) / mean if mean > 0 else 0.0


def pool(measured: Sequence[Measured]) -> Measured:
    """One measurement from recordings of one configuration.

    Per kind of step: the mean over the recordings that have that kind of their median step
    time and median stage times (so each recording counts once, however many steps it has);
    the number of steps of each kind is the total.
    """
    if not measured:
        raise ValueError("no recordings to pool")
    if len(measured) == 1:
        return measured[0]
    kinds: dict[str, int] = {}
    step_us: dict[str, float] = {}
    stage_us: dict[str, dict[str, float]] = {}
    layer_us: dict[str, dict[tuple[str, str], float]] = {}
    for kind in KINDS:
        having = [m for m in measured if kind in m.kinds]
        if not having:
            continue
        kinds[kind] = sum(m.kinds[kind] for m in having)
        step_us[kind] = sum(m.step_us[kind] for m in having) / len(having)
        stage_us[kind] = _mean_table([m.stage_us[kind] for m in having])
        layer_us[kind] = _mean_table([m.layer_us.get(kind, {}) for m in having])
    total = sum(m.mean_step_us * sum(m.kinds.values()) for m in measured)
    return Measured(kinds=kinds, step_us=step_us, stage_us=stage_us, layer_us=layer_us,
                    mean_step_us=total / sum(sum(m.kinds.values()) for m in measured))


def _mean_table(tables: Sequence[dict[Any, float]]) -> dict[Any, float]:
    """Key by key the mean over ``tables`` (a key a table lacks counts 0 there)."""
    keys = sorted({k for t in tables for k in t})
    return {k: sum(t.get(k, 0.0) for t in tables) / len(tables) for k in keys}
