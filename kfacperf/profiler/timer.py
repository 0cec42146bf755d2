"""The stage-timer interface every instrumented component calls.

The optimizer, the strategies and the SGD baseline receive a timer and wrap each stage in it;
they never know whether anything is recorded.  :class:`NullTimer` is the default and costs
next to nothing.  The real timer (NVTX ranges + CUDA events or ``perf_counter_ns``) lives in
:mod:`kfacperf.profiler.stage_timer` and implements the same methods.
"""
from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from typing import Any, Protocol


class Timer(Protocol):
    """What an instrumented component may call."""

    def stage(
        self, stage: str, layer: str = "", *, nbytes: int = 0, flops: float = 0.0
    ) -> AbstractContextManager[None]:
        """Time a synchronous stage (its lane comes from :mod:`kfacperf.vocab`)."""

    def issue_mark(self) -> Any:
        """A timestamp to take right before calling into ``torch.distributed``, passed on as
        :meth:`async_comm`'s ``issued_at``."""

    def async_comm(self, stage: str, layer: str, nbytes: int, work: Any, *,
                   issued_at: Any = None) -> None:
        """Time an asynchronous collective from its issue until ``work`` completes.

        ``work`` is the handle returned by a ``torch.distributed`` call with
        ``async_op=True``; completion is taken from its future.  The issue is ``issued_at``
        (from :meth:`issue_mark`) or else now: a backend may do much of the work inside the
        call itself (gloo's list-form reduce-scatter: 3-15 ms of a 10-18 ms call for 6 MB),
        and that time belongs to the collective.
        """

    def step_begin(self, step: int) -> None:
        """Mark the start of training step ``step``."""

    def step_end(self) -> None:
        """Mark the end of the current step (records the ``step`` row, flushes)."""


_NULL_CONTEXT = contextlib.nullcontext()


class NullTimer:
    """A timer that records nothing; the default everywhere."""

    enabled = False

    def stage(
        self, stage: str, layer: str = "", *, nbytes: int = 0, flops: float = 0.0
    ) -> AbstractContextManager[None]:
        return _NULL_CONTEXT

    def issue_mark(self) -> Any:
        return None

    def async_comm(self, stage: str, layer: str, nbytes: int, work: Any, *,
                   issued_at: Any = None) -> None:
        return None

    def step_begin(self, step: int) -> None:
        return None

    def step_end(self) -> None:
        return None


NULL_TIMER = NullTimer()
