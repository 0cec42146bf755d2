"""CUDA-event timing for the stage timer: an event pool and the after-the-step resolver.

Kept apart from :mod:`kfacperf.profiler.stage_timer` so the CPU path never touches CUDA; the
module-level ``_new_cuda_event`` and ``cuda_sync`` are the only places that call into
``torch.cuda`` (tests replace them with a fake device clock).
"""
from __future__ import annotations

import collections
import time
from collections.abc import Sequence
from typing import Any, TypeAlias

from kfacperf.vocab import STEP

_clock = time.perf_counter_ns

Row: TypeAlias = "tuple[int, str, str, str, Any, Any, int, float]"
"""One timed stage occurrence: ``(step, stage, layer, lane, start, end, bytes, flops)``;
start and end are CPU ``perf_counter_ns`` values, CUDA events, or (resolved) µs floats."""


def cuda_sync() -> None:
    import torch

    torch.cuda.synchronize()


def _new_cuda_event() -> Any:
    import torch

    return torch.cuda.Event(enable_timing=True)


class EventPool:
    """Reusable ``torch.cuda.Event(enable_timing=True)`` objects (creating them is not free).

    Every event the timer records comes from here and goes back once resolved, so the pool
    holds about as many events as are in flight.  :meth:`record` may be called from another
    thread (a collective's completion callback) while the training thread records too.
    """

    def __init__(self) -> None:
        self._free: list[Any] = []

    def record(self) -> Any:
        """An event recorded on the current stream (in a collective's completion callback:
        a stream synchronised with the collective)."""
        try:
            ev = self._free.pop()  # atomic: no check-then-pop race between threads
        except IndexError:
            ev = _new_cuda_event()
        ev.record()
        return ev

    def release(self, events: Sequence[Any]) -> None:
        self._free.extend(events)


class GpuResolver:
    """Turns rows holding CUDA events into rows holding µs since the origin, step by step.

    Each step is anchored at its ``step`` row's start event; the anchor's offset from the
    origin is chained from the previous step's anchor (short ``elapsed_time`` intervals keep
    float32 precision over long runs).
    """

    def __init__(self, pool: EventPool, *, origin_ns: int) -> None:
        cuda_sync()
        self._pool = pool
        self._prev_anchor = pool.record()
        cuda_sync()
        # the origin event completed (about) now: its offset from origin_ns on the CPU clock
        self._prev_us = (_clock() - origin_ns) / 1e3
        self._pending: collections.deque[tuple[list[Row], Any]] = collections.deque()

    def add(self, rows: list[Row], *, step_end_event: Any) -> None:
        self._pending.append((rows, step_end_event))

    def resolve(self, *, keep: int) -> list[Row]:
        out: list[Row] = []
        while self._pending:
            rows, last = self._pending[0]
            if len(self._pending) <= keep and last is not None and not last.query():
                break
            self._pending.popleft()
            out.extend(self._resolve_rows(rows))
        return out

    def _resolve_rows(self, rows: list[Row]) -> list[Row]:
        events = [e for r in rows for e in (r[4], r[5])]
        for ev in events:
            ev.synchronize()  # no-op wait when already complete (the usual case)
        if not rows:
            return []
        anchor = next((r[4] for r in rows if r[1] == STEP), rows[0][4])
        anchor_us = self._prev_us + self._prev_anchor.elapsed_time(anchor) * 1e3
        out: list[Row] = []
        for step, stage, layer, lane, e0, e1, nbytes, flops in rows:
            start = anchor_us + anchor.elapsed_time(e0) * 1e3
            out.append((step, stage, layer, lane, start, start + e0.elapsed_time(e1) * 1e3,
                        nbytes, flops))
        self._pool.release([self._prev_anchor])
        self._prev_anchor, self._prev_us = anchor, anchor_us
        self._pool.release([e for e in events if e is not anchor and e is not None])
        return out
