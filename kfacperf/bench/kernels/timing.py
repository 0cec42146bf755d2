"""How one call is timed: CUDA events on a GPU, ``perf_counter_ns`` on a CPU, and
:func:`measure` (warm-up calls left out, the median of the repeats kept)."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from kfacperf.bench.kernels.records import Timing

CallTimer = Callable[[Callable[[], Any]], float]
"""Times one call of a function and returns its duration in microseconds."""


HOLD_CYCLES = 200_000
"""GPU clock cycles the stream is held busy before the start event (about 0.1 ms at 2 GHz):
longer than the host takes to launch a call's kernels."""


def cuda_call_timer() -> CallTimer:
    """Times a call with CUDA events on the current stream, synchronising after it.

    The stream is idle when a call begins (the previous one was waited for), so a start
    event recorded then would fire at once and the interval would include the host's time
    to launch the call's kernels (several microseconds: most of a small GEMM).  A spin
    kernel queued first (``torch.cuda._sleep``) keeps the stream busy while the host
    launches, so the start event fires right before the call's first kernel.
    """
    import torch

    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    hold = getattr(torch.cuda, "_sleep", None)

    def time_call(fn: Callable[[], Any]) -> float:
        if hold is not None:
            hold(HOLD_CYCLES)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end)) * 1e3

    return time_call


def cpu_call_timer(clock: Callable[[], int] = time.perf_counter_ns) -> CallTimer:
    """Times a call with ``clock`` (nanoseconds)."""

    def time_call(fn: Callable[[], Any]) -> float:
        t0 = clock()
        fn()
        return (clock() - t0) / 1e3

    return time_call


def call_timer(device: Any) -> tuple[CallTimer, str]:
    """The timer for ``device`` and the name of its clock (``cuda_events``/``perf_counter``)."""
    if getattr(device, "type", str(device)) == "cuda":
        return cuda_call_timer(), "cuda_events"
    return cpu_call_timer(), "perf_counter"


def measure(fn: Callable[[], Any], *, timer: CallTimer, warmup: int = 1, repeats: int = 10,
            min_repeats: int = 3, target_s: float | None = None) -> Timing:
    """``warmup`` timed calls left out, then up to ``repeats`` kept.

    With ``target_s``, as many repeats as fit in about that long at the last warm-up call's
    duration, between ``min_repeats`` and ``repeats``.
    """
    if warmup < 0 or repeats < 1 or not 1 <= min_repeats <= repeats:
        raise ValueError(f"need warmup >= 0 and 1 <= min_repeats <= repeats, got {warmup}, "
                         f"{min_repeats}, {repeats}")
    last_us = None
    for _ in range(warmup):
        last_us = timer(fn)
    n = repeats
    if target_s is not None and last_us is not None and last_us > 0:
        n = max(min_repeats, min(repeats, int(target_s * 1e6 / last_us)))
    return Timing.of([timer(fn) for _ in range(n)], warmup=warmup)

