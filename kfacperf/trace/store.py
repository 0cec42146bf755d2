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

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kfacperf.trace.schema import (
    EVENT_COLUMNS,
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


# --------------------------------------------------------------------------- run.json


_INT_KEYS = {  # key -> smallest value; None (unknown yet) is allowed
    "world_size": 1, "warmup": 0, "steps": 0, "factor_interval": 1, "inverse_interval": 1,
    "batch_per_rank": 1, "threads_per_rank": 1,
}
_STR_KEYS = ("workload", "optimizer", "strategy", "inverse_method", "command", "start_time",
             "bn_blocks", "fisher", "comm_dtype", "precision", "backend", "failure")
_BOOL_KEYS = ("completed", "symmetric", "fused", "isolate", "batch_first")
_POSITIVE_KEYS = ("bucket_cap_mb", "damping")  # numbers > 0
_OBJECT_KEYS = ("workload_options", "device", "precision_flags")


def read_run(path: Path) -> dict[str, Any]:
    """``run.json`` as a dict, with errors naming the file and the key.

    The file must be a regular file of JSON (no NaN, nesting at most
    :data:`kfacperf.safety.MAX_NESTING` deep); the keys every part relies on are checked:
    integers where counts are (``world_size``, ``batch_per_rank``, intervals, ...), a
    fraction in (0, 1] for ``grad_worker_fraction``, strings where names are, true or false
    where switches are (``completed``, ``symmetric``, ...), numbers above 0 for
    ``bucket_cap_mb`` and ``damping``, objects for ``device``, ``precision_flags`` and
    ``workload_options``."""
    from kfacperf.safety import parse_json, read_small_file

    try:
        text = read_small_file(path, what="run file")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path.parent} is not a trace directory: no {RUN_FILE}") from None
    except ValueError as exc:
        raise TraceError(str(exc)) from None
    try:
        run = parse_json(text, source=str(path))
    except ValueError as exc:
        raise TraceError(str(exc)) from None
    if not isinstance(run, dict):
        raise TraceError(f"{path}: expected a JSON object, got {type(run).__name__}")
    check_run(run, str(path))
    return run


def check_run(run: Mapping[str, Any], source: str) -> None:
    """Raise :class:`TraceError` naming ``source`` and the key unless the keys of ``run``
    that are present have usable values (see :func:`read_run`)."""
    def bad(key: str, why: str) -> TraceError:
        return TraceError(f"{source}: key {key!r} {why}, got {run[key]!r}")

    for key in _BOOL_KEYS:
        if run.get(key) is not None and not isinstance(run[key], bool):
            raise bad(key, "must be true or false")
    for key, least in _INT_KEYS.items():
        v = run.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < least):
            raise bad(key, "must be a non-negative integer" if least == 0 else
                      f"must be an integer >= {least}")
    f, i = run.get("factor_interval"), run.get("inverse_interval")
    if f is not None and i is not None and i % f:
        raise bad("inverse_interval", f"must be a multiple of factor_interval {f}")
    g = run.get("grad_worker_fraction")
    if g is not None and (isinstance(g, bool) or not isinstance(g, (int, float))
                          or not 0 < g <= 1):
        raise bad("grad_worker_fraction", "must be a number in (0, 1]")
    for key in _POSITIVE_KEYS:
        v = run.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                              or not 0 < v < math.inf):
            raise bad(key, "must be a number above 0")
    for key in _STR_KEYS:
        if run.get(key) is not None and not isinstance(run[key], str):
            raise bad(key, "must be a string")
    for key in _OBJECT_KEYS:
        if run.get(key) is not None and not isinstance(run[key], dict):
            raise bad(key, "must be an object")


def write_run(directory: str | os.PathLike[str], run: Mapping[str, Any]) -> Path:
    """Write ``run.json`` atomically (a reader never sees half a file)."""
    from kfacperf.safety import atomic_write_text, dumps_json

    return atomic_write_text(Path(directory) / RUN_FILE,
                             dumps_json(dict(run), indent=2, sort_keys=True, default=str) + "\n")


# --------------------------------------------------------------------------- read/write


def write_trace(
    path: str | os.PathLike[str],
    *,
    run: Mapping[str, Any],
    events: pd.DataFrame | Mapping[str, Any],
    telemetry: pd.DataFrame | Mapping[str, Any] | None = None,
) -> Path:
    """Write a complete trace directory (created if needed) and return its path."""
    from kfacperf.safety import atomic_path

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    ev = normalize_events(events_frame(events))
    with atomic_path(out / EVENTS_FILE) as tmp:
        ev.to_parquet(tmp, engine="pyarrow", compression="zstd", index=False)
    tel_path = out / TELEMETRY_FILE
    if telemetry is not None:
        with atomic_path(tel_path) as tmp:
            telemetry_frame(telemetry).to_parquet(
                tmp, engine="pyarrow", compression="zstd", index=False)
    elif tel_path.exists():
        tel_path.unlink()
    write_run(out, run)
    return out


def load_trace(path: str | os.PathLike[str], *, partial: bool = False) -> Trace:
    """Read and validate a trace directory (complete, or the parts of an unfinished run).

    Errors name the file: a missing directory or ``run.json``, a missing column, a column of
    the wrong dtype, an unknown stage, ranks that do not match ``world_size`` (every rank
    from 0 to ``world_size - 1`` must have rows, unless ``partial``: then the trace of a
    failed run may lack ranks that never finished a step).  An uncompacted run (it crashed,
    or is still going) is read from its per-rank parts, every fully written step included,
    with ``trace.completed`` False.
    """
    import pandas as pd

    from kfacperf.safety import check_pyarrow_version, regular_file
    from kfacperf.trace import parts as trace_parts

    check_pyarrow_version()
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"trace directory {root} does not exist")
    if not root.is_dir():
        raise TraceError(f"{root} is not a trace directory (expected a directory with {RUN_FILE})")
    run = read_run(root / RUN_FILE)
    events_path = root / EVENTS_FILE
    telemetry = None
    if events_path.exists() or events_path.is_symlink():
        try:
            regular_file(events_path, what="events file")
        except (OSError, ValueError) as exc:
            raise TraceError(str(exc)) from None
        try:
            events = pd.read_parquet(events_path, engine="pyarrow")
        except Exception as exc:  # pyarrow raises several types for a damaged file
            raise TraceError(f"{events_path}: cannot read as Parquet ({exc})") from None
        if events.empty and all(c in events.columns for c in EVENT_COLUMNS):
            # a run that recorded no event: Parquet keeps no categories for an empty column
            events = events_frame(events)
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
    _check_ranks(root, run, events, partial=partial)
    return Trace(path=root, run=run, events=normalize_events(events), telemetry=telemetry)


def _check_ranks(root: Path, run: Mapping[str, Any], events: pd.DataFrame, *,
                 partial: bool) -> None:
    """Every rank of ``world_size`` has rows (a 2-rank run missing one is not a 1-rank run),
    and none beyond it."""
    world = run.get("world_size")
    if world is None:
        raise TraceError(f"{root / RUN_FILE}: no 'world_size'; a trace says how many ranks ran")
    ranks = set(int(r) for r in events["rank"].unique()) if len(events) else set()
    beyond = sorted(r for r in ranks if r >= world)
    if beyond:
        raise TraceError(f"{root}: events of rank {beyond[0]} in a run of world_size {world}")
    if partial or not ranks and not run.get("completed"):
        return
    missing = sorted(set(range(world)) - ranks)
    if missing:
        shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
        raise TraceError(f"{root}: run.json says world_size {world}, but rank(s) {shown} "
                         f"({len(missing):,} of {world:,}) have no events; the trace is "
                         "missing part of the run")


def _read_telemetry(path: Path) -> pd.DataFrame:
    import pandas as pd

    from kfacperf.safety import regular_file

    try:
        regular_file(path, what="telemetry file")
    except (OSError, ValueError) as exc:
        raise TraceError(str(exc)) from None
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
