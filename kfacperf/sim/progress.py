"""Progress lines of a long simulation sweep (``kfacperf simulate`` writes them to stderr).

A sweep runs one point per (strategy, GPU count); most take milliseconds, but a large
workload at tens of thousands of GPUs takes about a second each, and a sweep of 60 such
points half a minute.  :class:`SweepProgress` says nothing on a short sweep: it reports a
point once ``after_s`` seconds have passed since the start, then at most one every
``every_s`` seconds, and the last point whenever it reported any.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

AFTER_S = 2.0
"""Seconds of silence before the first progress line (a shorter sweep prints none)."""
EVERY_S = 2.0
"""Seconds between two progress lines."""


class SweepProgress:
    """Counts a sweep's points and hands a line to ``emit`` when one is due."""

    def __init__(self, emit: Callable[[str], None] | None, total: int, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.emit, self.total, self.clock = emit, total, clock
        self.start = clock()
        self.count = 0
        self.last: float | None = None  # when the last line was emitted

    def done(self, point: T, label: str, gpus: int) -> T:
        """The point ``label`` at ``gpus`` GPUs is finished; returns ``point``."""
        self.count += 1
        if self.emit is not None:
            self._report(label, gpus)
        return point

    def _report(self, label: str, gpus: int) -> None:
        assert self.emit is not None
        now = self.clock()
        elapsed = now - self.start
        final = self.count == self.total
        due = (elapsed >= AFTER_S if self.last is None
               else final or now - self.last >= EVERY_S)
        if not due:
            return
        self.last = now
        left = "" if final else (
            f", about {elapsed / self.count * (self.total - self.count):.0f} s left")
        self.emit(f"simulate: {label} on {gpus:,} GPUs ({self.count}/{self.total}), "
                  f"{elapsed:.1f} s{left}")
