"""The trace directory: :class:`Trace`, ``run.json``, and reading and writing a whole trace.

A trace is a directory::

    run.json            the run's settings, device, versions, command line, completed flag
    events.parquet      the event table (schema below), zstd
    telemetry.parquet   optional: device samples (clocks, power, memory, ...) over time

While a run is going, each rank appends its rows to ``parts/events-rank<R>.arrows`` (an Arrow
IPC stream, one record batch per step, flushed every step; see :mod:`kfacperf.trace.parts`),
and the end of a successful run compacts the parts into ``events.parquet``.  A run that dies
leaves its parts behind: :func:`load_trace` reads every batch that reached the disk and
reports the trace as incomplete.

Steps are numbered from 0 and include the warm-up steps; ``run["warmup"]`` says how many of
the first steps :meth:`Trace.measured` leaves out (schema: :mod:`kfacperf.trace.schema`).

This module never imports torch.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kfacperf.trace.schema import (
    EVENTS_FILE,
    PARTS_DIR,
    RUN_FILE,
    TELEMETRY_COLUMNS,
    TELEMETRY_DTYPES,
    TELEMETRY_FILE,
    TraceError,
    check_events,
    events_frame,
    normalize_events,
    telemetry_frame,
)

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd


@dataclass(frozen=True, kw_only=True)
class Trace:
    """A loaded trace: ``run`` (run.json), ``events`` and optional ``telemetry``."""

    path: Path
    run: dict[str, Any]
    events: pd.DataFrame
    telemetry: pd.DataFrame | None = None

    @property
    def completed(self) -> bool:
        """Whether the run finished and its parts were compacted."""
        return bool(self.run.get("completed", False))

    @property
    def warmup(self) -> int:
        return int(self.run.get("warmup", 0) or 0)

    def measured(self) -> pd.DataFrame:
        """The events of the steps after warm-up."""
        ev = self.events
        return ev[ev["step"] >= self.warmup]


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


def write_run(directory: str | os.PathLike[str], run: Mapping[str, Any]) -> Path:
    """Write ``run.json`` atomically (a reader never sees half a file)."""
    path = Path(directory) / RUN_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(dict(run), indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------- read/write


def write_trace(
    path: str | os.PathLike[str],
    *,
    run: Mapping[str, Any],
    events: pd.DataFrame | Mapping[str, Any],
    telemetry: pd.DataFrame | Mapping[str, Any] | None = None,
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


def load_trace(path: str | os.PathLike[str]) -> Trace:
    """Read and validate a trace directory (complete, or the parts of an unfinished run).

    Errors name the file: a missing directory or ``run.json``, a missing column, a column of
    the wrong dtype, an unknown stage.  An uncompacted run (it crashed, or is still going)
    is read from its per-rank parts, every fully written step included, with
    ``trace.completed`` False.
    """
    import pandas as pd

    from kfacperf.trace import parts as trace_parts

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


def _read_telemetry(path: Path) -> pd.DataFrame:
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
