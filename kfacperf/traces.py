"""The event table, the trace directory, and reading/writing them.

A trace is a directory::

    run.json            the run's settings, device, versions, command line, completed flag
    events.parquet      the event table (schema below), zstd
    telemetry.parquet   optional: device samples (clocks, power, memory, ...) over time

While a run is going, each rank appends its rows to ``parts/events-rank<R>.arrows`` (an Arrow
IPC stream, one record batch per step, flushed every step; see :mod:`kfacperf.trace_parts`),
and the end of a successful run compacts the parts into ``events.parquet``.  A run that dies
leaves its parts behind: :func:`load_trace` reads every batch that reached the disk and
reports the trace as incomplete.

Steps are numbered from 0 and include the warm-up steps; ``run["warmup"]`` says how many of
the first steps :meth:`Trace.measured` (and :func:`summarize`) leave out.

This module never imports torch.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from kfacperf.stages import COMM, COMPUTE, LANES, STAGE_NAMES, lane_of

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from kfacperf.trace_summary import TraceSummary

RUN_FILE = "run.json"
EVENTS_FILE = "events.parquet"
TELEMETRY_FILE = "telemetry.parquet"
PARTS_DIR = "parts"

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


class TraceError(ValueError):
    """A trace directory or table that does not follow the schema."""


@dataclass(frozen=True, kw_only=True)
class Trace:
    """A loaded trace: ``run`` (run.json), ``events`` and optional ``telemetry``."""

    path: Path
    run: dict[str, Any]
    events: "pd.DataFrame"
    telemetry: "pd.DataFrame | None" = None

    @property
    def completed(self) -> bool:
        """Whether the run finished and its parts were compacted."""
        return bool(self.run.get("completed", False))

    @property
    def warmup(self) -> int:
        return int(self.run.get("warmup", 0) or 0)

    def measured(self) -> "pd.DataFrame":
        """The events of the steps after warm-up."""
        ev = self.events
        return ev[ev["step"] >= self.warmup]


# --------------------------------------------------------------------------- frames


def events_frame(data: "Mapping[str, Any] | pd.DataFrame") -> "pd.DataFrame":
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


def check_events(df: "pd.DataFrame", source: str) -> None:
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
                f"{source}: stage {stage!r} recorded on lane {lane!r}; its lane is {lane_of(stage)!r}"
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


def normalize_events(df: "pd.DataFrame") -> "pd.DataFrame":
    """Give stage/lane the full vocabularies as categories (so tables from any source concat
    and sort alike) and sort rows by (rank, start_us)."""
    import pandas as pd

    df = df.loc[:, list(EVENT_COLUMNS)].copy()
    df["stage"] = pd.Categorical(df["stage"].astype(str), categories=list(STAGE_NAMES))
    df["lane"] = pd.Categorical(df["lane"].astype(str), categories=list(LANES))
    df["layer"] = df["layer"].astype(str).astype("category")
    return df.sort_values(["rank", "start_us"], kind="stable").reset_index(drop=True)


def telemetry_frame(data: "Mapping[str, Any] | pd.DataFrame") -> "pd.DataFrame":
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


# --------------------------------------------------------------------------- run.json


def read_run(path: Path) -> dict[str, Any]:
    """``run.json`` as a dict, with errors naming the file."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path.parent} is not a trace directory: no {RUN_FILE}") from None
    try:
        run = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TraceError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(run, dict):
        raise TraceError(f"{path}: expected a JSON object, got {type(run).__name__}")
    if "completed" in run and not isinstance(run["completed"], bool):
        raise TraceError(f"{path}: key 'completed' must be true or false, got {run['completed']!r}")
    for key in ("world_size", "warmup", "steps"):
        v = run.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise TraceError(f"{path}: key {key!r} must be a non-negative integer, got {v!r}")
    return run


def write_run(directory: "str | os.PathLike[str]", run: Mapping[str, Any]) -> Path:
    """Write ``run.json`` atomically (a reader never sees half a file)."""
    path = Path(directory) / RUN_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(dict(run), indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------- read/write


def write_trace(
    path: "str | os.PathLike[str]",
    *,
    run: Mapping[str, Any],
    events: "pd.DataFrame | Mapping[str, Any]",
    telemetry: "pd.DataFrame | Mapping[str, Any] | None" = None,
) -> Path:
    """Write a complete trace directory (created if needed) and return its path."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    ev = normalize_events(events_frame(events))
    ev.to_parquet(out / EVENTS_FILE, engine="pyarrow", compression="zstd", index=False)
    tel_path = out / TELEMETRY_FILE
    if telemetry is not None:
        telemetry_frame(telemetry).to_parquet(
            tel_path, engine="pyarrow", compression="zstd", index=False
        )
    elif tel_path.exists():
        tel_path.unlink()
    write_run(out, run)
    return out


def load_trace(path: "str | os.PathLike[str]") -> Trace:
    """Read and validate a trace directory (complete, or the parts of an unfinished run).

    Errors name the file: a missing directory or ``run.json``, a missing column, a column of
    the wrong dtype, an unknown stage.  An uncompacted run (it crashed, or is still going)
    is read from its per-rank parts, every fully written step included, with
    ``trace.completed`` False.
    """
    import pandas as pd

    from kfacperf import trace_parts

    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"trace directory {root} does not exist")
    if not root.is_dir():
        raise TraceError(f"{root} is not a trace directory (expected a directory with {RUN_FILE})")
    run = read_run(root / RUN_FILE)
    events_path = root / EVENTS_FILE
    telemetry = None
    if events_path.exists():
        try:
            events = pd.read_parquet(events_path, engine="pyarrow")
        except Exception as exc:  # pyarrow raises several types for a damaged file
            raise TraceError(f"{events_path}: cannot read as Parquet ({exc})") from None
        check_events(events, str(events_path))
        tel_path = root / TELEMETRY_FILE
        if tel_path.exists():
            telemetry = _read_telemetry(tel_path)
    elif (root / PARTS_DIR).is_dir():
        run = dict(run, completed=False)
        events = trace_parts.read_event_parts(root / PARTS_DIR)
        check_events(events, str(root / PARTS_DIR))
        telemetry = trace_parts.read_telemetry_parts(root / PARTS_DIR)
    else:
        raise TraceError(
            f"{root}: has {RUN_FILE} but neither {EVENTS_FILE} nor a {PARTS_DIR}/ directory"
        )
    world = run.get("world_size")
    if world is not None and len(events) and int(events["rank"].max()) >= world:
        raise TraceError(
            f"{root}: events of rank {int(events['rank'].max())} in a run of world_size {world}"
        )
    return Trace(path=root, run=run, events=normalize_events(events), telemetry=telemetry)


def _read_telemetry(path: Path) -> "pd.DataFrame":
    import pandas as pd

    try:
        df = pd.read_parquet(path, engine="pyarrow")
    except Exception as exc:
        raise TraceError(f"{path}: cannot read as Parquet ({exc})") from None
    missing = [c for c in TELEMETRY_COLUMNS if c not in df.columns]
    if missing:
        raise TraceError(f"{path}: missing column(s) {', '.join(missing)}")
    for col, want in TELEMETRY_DTYPES.items():
        if str(df[col].dtype) != want:
            raise TraceError(f"{path}: column {col!r} has dtype {df[col].dtype}, expected {want}")
    return df.loc[:, list(TELEMETRY_COLUMNS)]


def summarize(trace: Trace, baseline: Trace | None = None) -> "TraceSummary":
    """Per-stage statistics, step time, exposed communication, overlap, stragglers and (with
    an SGD ``baseline``) the K-FAC overhead; see :mod:`kfacperf.trace_summary`."""
    from kfacperf.trace_summary import summarize_trace

    return summarize_trace(trace, baseline=baseline)
