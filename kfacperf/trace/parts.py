"""Crash-safe per-rank appending of trace rows, and compaction into a trace directory.

During a run every rank owns ``parts/events-rank<R>.arrows``: an Arrow IPC *stream* that
gets one record batch per step, flushed to the OS right away.  A process that dies (even by
``os._exit`` or SIGKILL) leaves every batch it flushed intact; at worst the batch being
written is cut short, and the reader stops at it.  Telemetry samples go to
``parts/telemetry-rank<R>.arrows`` the same way.  The parts use plain strings for
stage/layer/lane (an IPC stream cannot change dictionaries between batches without extra
machinery); :func:`read_event_parts` turns them into the event schema.

This module never imports torch.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kfacperf.trace.schema import (
    EVENT_COLUMNS,
    EVENT_DTYPES,
    EVENTS_FILE,
    PARTS_DIR,
    TELEMETRY_COLUMNS,
    TELEMETRY_DTYPES,
    TELEMETRY_FILE,
    TraceError,
    events_frame,
    normalize_events,
    telemetry_frame,
)

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    import pyarrow as pa

# Arrow type of each event column: the schema's dtypes, with categories as plain strings.
_EVENT_ARROW_TYPES = {c: ("string" if t == "category" else t) for c, t in EVENT_DTYPES.items()}


def event_part_path(parts: Path, rank: int) -> Path:
    return parts / f"events-rank{rank:05d}.arrows"


def telemetry_part_path(parts: Path, rank: int) -> Path:
    return parts / f"telemetry-rank{rank:05d}.arrows"


def _schema(types: Mapping[str, str]) -> pa.Schema:
    import pyarrow as pa

    return pa.schema([(name, pa.type_for_alias(t)) for name, t in types.items()])


class StreamAppender:
    """Append record batches to an Arrow IPC stream file, flushing after each one.

    Thread-safe: the training loop and a sampler thread may each own one, and a rank's
    writer may be called from a communication callback thread.
    """

    def __init__(self, *, path: Path, types: Mapping[str, str]) -> None:
        import pyarrow as pa

        self.path = path
        self._columns = tuple(types)
        self._schema = _schema(types)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = pa.ipc.new_stream(self._sink, self._schema)
        self._sink.flush()
        self._lock = threading.Lock()
        self.rows_written = 0

    def append(self, columns: Mapping[str, Sequence[Any]]) -> None:
        """Write one batch (a dict of equal-length column lists) and flush it."""
        import pyarrow as pa

        n = len(columns[self._columns[0]])
        if n == 0:
            return
        batch = pa.RecordBatch.from_arrays(
            [pa.array(columns[c], type=self._schema.field(c).type) for c in self._columns],
            schema=self._schema,
        )
        with self._lock:
            if self._writer is None:
                raise RuntimeError(f"{self.path}: appender already closed")
            self._writer.write_batch(batch)
            self._sink.flush()
            self.rows_written += n

    def close(self) -> None:
        with self._lock:
            if self._writer is not None:
                self._writer.close()
                self._sink.close()
                self._writer = None


def event_appender(run_dir: str | os.PathLike[str], rank: int) -> StreamAppender:
    """The appender of rank ``rank``'s event rows under ``run_dir/parts``."""
    return StreamAppender(
        path=event_part_path(Path(run_dir) / PARTS_DIR, rank), types=_EVENT_ARROW_TYPES
    )


def telemetry_appender(run_dir: str | os.PathLike[str], rank: int) -> StreamAppender:
    """The appender of rank ``rank``'s telemetry samples under ``run_dir/parts``."""
    return StreamAppender(
        path=telemetry_part_path(Path(run_dir) / PARTS_DIR, rank),
        types={c: ("int32" if t == "int32" else "float64") for c, t in TELEMETRY_DTYPES.items()},
    )


def read_stream(path: Path) -> tuple[pa.Table | None, bool]:
    """All complete batches of an IPC stream file, and whether the file ended cleanly.

    A file cut short by a crash yields the batches before the cut and ``False``.
    """
    import pyarrow as pa

    batches = []
    clean = True
    try:
        with pa.OSFile(str(path), "rb") as src:
            try:
                reader = pa.ipc.open_stream(src)
            except (pa.ArrowInvalid, OSError):
                return None, False  # not even a schema reached the disk
            schema = reader.schema
            while True:
                try:
                    batches.append(reader.read_next_batch())
                except StopIteration:
                    break
                except (pa.ArrowInvalid, OSError):
                    clean = False
                    break
    except FileNotFoundError:
        raise FileNotFoundError(f"trace part {path} does not exist") from None
    return pa.Table.from_batches(batches, schema=schema), clean


def read_event_parts(parts: Path) -> pd.DataFrame:
    """The event table from every ``events-rank*.arrows`` under ``parts``."""
    import pandas as pd

    frames = []
    for path in sorted(parts.glob("events-rank*.arrows")):
        table, _ = read_stream(path)
        if table is None or table.num_rows == 0:
            continue
        missing = [c for c in EVENT_COLUMNS if c not in table.column_names]
        if missing:
            raise TraceError(f"{path}: missing column(s) {', '.join(missing)}")
        frames.append(table.to_pandas())
    if not frames:
        return events_frame({c: [] for c in EVENT_COLUMNS})
    df = pd.concat(frames, ignore_index=True)
    try:
        return normalize_events(events_frame(df))
    except TraceError as exc:
        raise TraceError(f"{parts}: {exc}") from None


def read_telemetry_parts(parts: Path) -> pd.DataFrame | None:
    """The telemetry table from every ``telemetry-rank*.arrows``, or None if there is none."""
    import pandas as pd

    frames = []
    for path in sorted(parts.glob("telemetry-rank*.arrows")):
        table, _ = read_stream(path)
        if table is not None and table.num_rows:
            frames.append(table.to_pandas())
    if not frames:
        return None
    df = pd.concat(frames, ignore_index=True)
    return telemetry_frame({c: df[c] for c in TELEMETRY_COLUMNS if c in df})


def compact(run_dir: str | os.PathLike[str], *, remove_parts: bool = True) -> Path:
    """Turn ``run_dir/parts`` into ``events.parquet`` (+ ``telemetry.parquet``).

    Does not touch ``run.json``; the caller marks the run completed once this returns.
    """
    from kfacperf.safety import atomic_path

    root = Path(run_dir)
    parts = root / PARTS_DIR
    if not parts.is_dir():
        raise TraceError(f"{root}: no {PARTS_DIR}/ directory to compact")
    events = read_event_parts(parts)
    with atomic_path(root / EVENTS_FILE) as tmp:
        events.to_parquet(tmp, engine="pyarrow", compression="zstd", index=False)
    telemetry = read_telemetry_parts(parts)
    if telemetry is not None:
        with atomic_path(root / TELEMETRY_FILE) as tmp:
            telemetry.to_parquet(tmp, engine="pyarrow", compression="zstd", index=False)
    if remove_parts:
        for p in sorted(parts.iterdir()):
            if p.suffix == ".arrows":
                p.unlink()
        try:
            parts.rmdir()
        except OSError:
            pass  # something else lives there (error reports); keep it
    return root
