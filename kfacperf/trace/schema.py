"""The event table's and the telemetry table's schema, and the trace directory's file names.

One row per stage occurrence (DESIGN.md): ``rank, step, stage, layer, lane, start_us,
dur_us, bytes, flops``.  :func:`events_frame` coerces a writer's columns to it and
:func:`check_events` validates what a reader got.  This module never imports torch.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from kfacperf.vocab import BN_NONE, COMM, COMPUTE, FISHER_EMP, LANES, SGD, STAGE_NAMES, lane_of

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

RUN_FILE = "run.json"
EVENTS_FILE = "events.parquet"
TELEMETRY_FILE = "telemetry.parquet"
PARTS_DIR = "parts"
WORKLOAD_FILE = "workload.toml"
"""The workload model of a run of the user's own model, in its trace directory."""
TRACE_FILES: tuple[str, ...] = (RUN_FILE, EVENTS_FILE, TELEMETRY_FILE, WORKLOAD_FILE,
                                RUN_FILE + ".tmp", EVENTS_FILE + ".tmp")
"""The files a trace directory holds besides ``parts/`` (with their half-written forms): what
``profile --force`` clears and what an export may never replace."""

EVENT_COLUMNS: tuple[str, ...] = (
    "rank", "step", "stage", "layer", "lane", "start_us", "dur_us", "bytes", "flops",
)
"""The event table's columns, in order (DESIGN.md)."""

EVENT_DTYPES: dict[str, str] = {
    "rank": "int32",
    "step": "int32",
    "stage": "category",
    "layer": "category",
    "lane": "category",
    "start_us": "float64",
    "dur_us": "float64",
    "bytes": "int64",
    "flops": "float64",
}
"""pandas dtype of each event column."""

TELEMETRY_COLUMNS: tuple[str, ...] = (
    "rank", "gpu", "t_us", "sm_clock_mhz", "mem_clock_mhz", "mem_used_mib",
    "power_w", "gpu_util_pct", "mem_util_pct", "temperature_c",
)
"""The telemetry table's columns; measurements are float64 (NaN where the device has none)."""

TELEMETRY_DTYPES: dict[str, str] = {
    c: ("int32" if c in ("rank", "gpu") else "float64") for c in TELEMETRY_COLUMNS
}

RUN_KEYS: tuple[str, ...] = (
    "workload", "optimizer", "strategy", "grad_worker_fraction", "factor_interval",
    "inverse_interval", "damping", "inverse_method", "world_size", "batch_per_rank", "steps",
    "warmup", "device", "torch_version", "kfacperf_version", "command", "start_time",
    "completed", "threads_per_rank",
)
"""The keys a profiled run's ``run.json`` holds (others may be added)."""


def fisher_options(run: Mapping[str, Any]) -> dict[str, str]:
    """``bn_blocks`` and ``fisher`` of a ``run.json`` (a run recorded before they were: the
    defaults, which is what it did; an SGD run: the defaults)."""
    if run.get("optimizer") == SGD:
        return {"bn_blocks": BN_NONE, "fisher": FISHER_EMP}
    return {"bn_blocks": str(run.get("bn_blocks") or BN_NONE),
            "fisher": str(run.get("fisher") or FISHER_EMP)}


def run_device(run: Mapping[str, Any]) -> str:
    """The device a ``run.json`` ran on, as one string that tells devices apart: its name and
    kind, and the threads per rank (a CPU with more threads is another device)."""
    dev = run.get("device") or {}
    threads = int(run.get("threads_per_rank") or 1)
    name = dev.get("name") or dev.get("kind") or "unknown device"
    return f"{name} ({dev.get('kind', '?')}, {threads} thread(s) per rank)"


class TraceError(ValueError):
    """A trace directory or table that does not follow the schema."""


# --------------------------------------------------------------------------- frames


def events_frame(data: Mapping[str, Any] | pd.DataFrame) -> pd.DataFrame:
    """Coerce columns (a dict of lists/arrays or a DataFrame) to the event schema.

    For writers: values are converted to the schema's dtypes (strings to categories with the
    full stage vocabulary, ints to int32/int64); the result is validated with
    :func:`check_events`, so unknown stages or missing columns still raise.
    """
    import pandas as pd

    missing = [c for c in EVENT_COLUMNS if c not in data]
    if missing:
        raise TraceError(f"event data lacks column(s) {', '.join(missing)}")
    out = pd.DataFrame({c: _coerce(c, data[c]) for c in EVENT_COLUMNS})
    check_events(out, "event data")
    return out


def _coerce(col: str, values: Any) -> Any:
    import pandas as pd

    if col == "stage":
        return _as_category(values, list(STAGE_NAMES), "stage")
    if col == "lane":
        return _as_category(values, list(LANES), "lane")
    if col == "layer":
        s = pd.Series(values, dtype=object).fillna("").astype(str)
        return s.astype("category").array
    return pd.Series(values).astype(EVENT_DTYPES[col]).array


def _as_category(values: Any, vocabulary: list[str], col: str) -> Any:
    import pandas as pd

    s = pd.Series(values, dtype=object).astype(str)
    unknown = sorted(set(s.unique()) - set(vocabulary))
    if unknown:
        raise TraceError(
            f"unknown {col}(s) {', '.join(map(repr, unknown))}; known: {', '.join(vocabulary)}"
        )
    return pd.Categorical(s, categories=vocabulary)


def check_events(df: pd.DataFrame, source: str) -> None:
    """Raise :class:`TraceError` naming ``source`` unless ``df`` follows the event schema.

    Checks: every column present with its exact dtype; stages from the vocabulary; each
    row's lane is its stage's lane; no negative or non-finite durations; no negative rank/step.
    """
    import pandas as pd

    missing = [c for c in EVENT_COLUMNS if c not in df.columns]
    if missing:
        raise TraceError(f"{source}: missing column(s) {', '.join(missing)}")
    for col, want in EVENT_DTYPES.items():
        got = df[col].dtype
        ok = isinstance(got, pd.CategoricalDtype) if want == "category" else str(got) == want
        if not ok:
            raise TraceError(f"{source}: column {col!r} has dtype {got}, expected {want}")
    if df.empty:
        return
    stages = set(df["stage"].astype(str).unique())
    unknown = sorted(stages - set(STAGE_NAMES))
    if unknown:
        raise TraceError(
            f"{source}: unknown stage(s) {', '.join(map(repr, unknown))}; "
            f"known stages: {', '.join(STAGE_NAMES)}"
        )
    lanes = set(df["lane"].astype(str).unique())
    bad_lanes = sorted(lanes - set(LANES))
    if bad_lanes:
        raise TraceError(f"{source}: unknown lane(s) {', '.join(map(repr, bad_lanes))}; "
                         f"known lanes: {COMPUTE}, {COMM}")
    pairs = df[["stage", "lane"]].drop_duplicates().astype(str)
    for stage, lane in pairs.itertuples(index=False):
        if lane_of(stage) != lane:
            raise TraceError(
                f"{source}: stage {stage!r} recorded on lane {lane!r}; "
                f"its lane is {lane_of(stage)!r}"
            )
    dur = df["dur_us"].to_numpy()
    start = df["start_us"].to_numpy()
    if not (_all_finite(dur) and _all_finite(start)):
        raise TraceError(f"{source}: start_us/dur_us hold NaN or infinite values")
    if (dur < 0).any():
        raise TraceError(f"{source}: {(dur < 0).sum()} event(s) with negative dur_us")
    for col in ("rank", "step", "bytes"):
        if (df[col].to_numpy() < 0).any():
            raise TraceError(f"{source}: negative values in column {col!r}")


def _all_finite(values: Any) -> bool:
    import numpy as np

    return bool(np.isfinite(values).all())


def normalize_events(df: pd.DataFrame) -> pd.DataFrame:
    """Give stage/lane the full vocabularies as categories (so tables from any source concat
    and sort alike) and sort rows by (rank, start_us)."""
    import pandas as pd

    df = df.loc[:, list(EVENT_COLUMNS)].copy()
    df["stage"] = pd.Categorical(df["stage"].astype(str), categories=list(STAGE_NAMES))
    df["lane"] = pd.Categorical(df["lane"].astype(str), categories=list(LANES))
    df["layer"] = df["layer"].astype(str).astype("category")
    return df.sort_values(["rank", "start_us"], kind="stable").reset_index(drop=True)


def telemetry_frame(data: Mapping[str, Any] | pd.DataFrame) -> pd.DataFrame:
    """Coerce columns to the telemetry schema (missing measurement columns become NaN)."""
    import pandas as pd

    for key in ("rank", "gpu", "t_us"):
        if key not in data:
            raise TraceError(f"telemetry data lacks column {key!r}")
    n = len(data["rank"])
    cols = {}
    for col in TELEMETRY_COLUMNS:
        vals = data[col] if col in data else [math.nan] * n
        cols[col] = pd.Series(vals).astype(TELEMETRY_DTYPES[col]).array
    return pd.DataFrame(cols)
