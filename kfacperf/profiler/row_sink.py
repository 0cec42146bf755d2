"""Where the stage timer's rows go: the sink interface, an in-memory sink, and the conversion
of a step's rows into the columns a sink receives."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from kfacperf.profiler.cuda_events import Row


class RowSink(Protocol):
    """Where a step's rows go (an Arrow stream appender, or a list in tests)."""

    def append(self, columns: Mapping[str, Sequence[Any]]) -> None: ...


class MemorySink:
    """Keeps appended batches in memory (tests, benchmarks, single-process use)."""

    def __init__(self) -> None:
        self.batches: list[dict[str, list[Any]]] = []

    def append(self, columns: Mapping[str, Sequence[Any]]) -> None:
        self.batches.append({k: list(v) for k, v in columns.items()})

    def columns(self) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {}
        for b in self.batches:
            for k, v in b.items():
                out.setdefault(k, []).extend(v)
        return out


def rows_to_columns(rows: list[Row], *, rank: int, origin_ns: int) -> dict[str, list[Any]]:
    """Rows with CPU ns (or resolved µs floats, from the GPU resolver) -> columns in µs since
    ``origin_ns``, every row stamped with ``rank``."""
    n = len(rows)
    cols: dict[str, list[Any]] = {
        "rank": [rank] * n, "step": [], "stage": [], "layer": [], "lane": [],
        "start_us": [], "dur_us": [], "bytes": [], "flops": [],
    }
    for step, stage, layer, lane, a, b, nbytes, flops in rows:
        cols["step"].append(step)
        cols["stage"].append(stage)
        cols["layer"].append(layer)
        cols["lane"].append(lane)
        if isinstance(a, int):
            cols["start_us"].append((a - origin_ns) / 1e3)
            cols["dur_us"].append((b - a) / 1e3)
        else:  # already µs (GPU)
            cols["start_us"].append(a)
            cols["dur_us"].append(b - a)
        cols["bytes"].append(int(nbytes))
        cols["flops"].append(float(flops))
    return cols
