"""A :class:`~kfacperf.profiler.timer.Timer` that only records what it was told (for tests).

It keeps every ``stage`` and ``async_comm`` call as a :class:`Record` (stage, layer, bytes,
flops, step) and whether the asynchronous work had completed by ``step_end``; it measures no
time.  Tests use it to check which stages a component reports and with what payload.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from kfacperf.vocab import check_stage


@dataclass(frozen=True)
class Record:
    step: int
    stage: str
    layer: str
    nbytes: int
    flops: float
    is_async: bool


class RecordingTimer:
    """Records stage calls; ``records`` lists them in call order."""

    enabled = True

    def __init__(self) -> None:
        self.records: list[Record] = []
        self.current_step = -1
        self.steps_ended = 0
        self._works: list[Any] = []

    @contextlib.contextmanager
    def stage(
        self, stage: str, layer: str = "", *, nbytes: int = 0, flops: float = 0.0
    ) -> Iterator[None]:
        check_stage(stage)
        self.records.append(Record(self.current_step, stage, layer, int(nbytes), float(flops),
                                   False))
        yield

    def issue_mark(self) -> Any:
        return len(self.records)

    def async_comm(self, stage: str, layer: str, nbytes: int, work: Any, *,
                   issued_at: Any = None) -> None:
        check_stage(stage)
        if issued_at is not None and issued_at != len(self.records):
            raise AssertionError(f"async_comm({stage!r}): a stage was recorded between the "
                                 "issue mark and the issue")
        if work is None or not hasattr(work, "wait"):
            raise TypeError(f"async_comm({stage!r}) got {work!r}, not a work handle")
        self.records.append(Record(self.current_step, stage, layer, int(nbytes), 0.0, True))
        self._works.append(work)

    def step_begin(self, step: int) -> None:
        self.current_step = step

    def step_end(self) -> None:
        self.steps_ended += 1
        self._works = []
