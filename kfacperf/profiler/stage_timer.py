"""The real stage timer: an NVTX range and a timing for every stage of every step.

Implements :class:`kfacperf.profiler.timer.Timer`.

* **NVTX**: one domain (``kfacperf``), a category per lane, a colour per stage, the layer in
  the message of per-layer stages (``"factor_comm layer1.0.conv1"``).  Attribute objects are
  built once per ``(stage, layer)`` and reused.  Each step is a ``step`` range (payload: the
  step number) enclosing its stages; asynchronous communication gets a start/end range,
  since it may end on another thread.
* **Timing on CPU**: ``perf_counter_ns`` at enter and exit.  **On GPU**: a pair of CUDA
  events recorded on the current stream, resolved after the step once they have completed
  (``Event.query``), never by synchronising per stage; steps are resolved in order and at
  most ``max_pending_steps`` are left in flight.
* **Asynchronous collectives** are timed from the ``async_comm`` call (just after the issue)
  to completion: a callback on ``work.get_future()`` takes ``perf_counter_ns`` on CPU, or
  records a CUDA event on the stream the callback runs on (synchronised with the
  communication) on GPU.  Work handles without a future (gloo's list-form
  ``reduce_scatter``) are waited on by a watcher thread instead.  They land in the ``comm``
  lane under the step they were issued in.
* **Isolate mode** synchronises the device before and after every stage, waits for each
  asynchronous collective as soon as it is issued, and holds a barrier at the start of every
  step, so each stage runs alone; comparing with the default mode shows the overlap the run
  really gets.  No barrier is held per stage: ranks do different per-layer work (an SP-NGD
  owner inverts layers others do not), so per-stage barriers would deadlock.

Rows of a step go to the ``sink`` (:class:`kfacperf.trace.parts.StreamAppender`: appended and
flushed) at ``step_end``.  Times are microseconds since ``origin_ns`` (a ``perf_counter_ns``
value, normally taken right after a barrier at the start of the run).

The CUDA-event clock is in :mod:`kfacperf.profiler.cuda_events`, NVTX behind
:mod:`kfacperf.profiler.nvtx_backend`, collective completion in
:mod:`kfacperf.profiler.comm_completion`, and sinks in :mod:`kfacperf.profiler.row_sink`.
"""
from __future__ import annotations

import collections
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from kfacperf import vocab as S
from kfacperf.profiler import cuda_events
from kfacperf.profiler.comm_completion import (
    CompletionWatcher,
    Pending,
    on_completion,
    still_pending,
    wait_all,
)
from kfacperf.profiler.cuda_events import Row
from kfacperf.profiler.nvtx_backend import NvtxBackend, default_backend
from kfacperf.profiler.row_sink import MemorySink, RowSink, rows_to_columns
from kfacperf.vocab import STEP, lane_of

__all__ = ["STAGE_COLORS", "MemorySink", "RowSink", "StageTimer"]

# ARGB colour per stage (compute stages warm/green, comm stages blue/purple).
STAGE_COLORS: dict[str, int] = {
    S.FORWARD: 0xFF4CAF50,
    S.BACKWARD: 0xFF8BC34A,
    S.FACTOR_COMPUTE: 0xFFFF9800,
    S.FACTOR_COMM: 0xFF2196F3,
    S.INVERSE: 0xFFF44336,
    S.INVERSE_COMM: 0xFF3F51B5,
    S.GRAD_COMM: 0xFF00BCD4,
    S.PRECONDITION: 0xFFFFC107,
    S.PRECOND_COMM: 0xFF9C27B0,
    S.UPDATE: 0xFF795548,
    S.STEP: 0xFF9E9E9E,
}


class _Key:
    """What is built once per (stage, layer): lane and NVTX attributes."""

    __slots__ = ("stage", "layer", "lane", "attrs")

    def __init__(self, stage: str, layer: str, lane: str, attrs: Any) -> None:
        self.stage, self.layer, self.lane, self.attrs = stage, layer, lane, attrs


class _Span:
    """The context manager of one synchronous stage occurrence (CPU clock)."""

    __slots__ = ("_t", "_k", "_nbytes", "_flops", "_t0")

    def __init__(self, timer: StageTimer, key: _Key, nbytes: int, flops: float) -> None:
        self._t, self._k, self._nbytes, self._flops = timer, key, nbytes, flops

    def __enter__(self) -> None:
        t = self._t
        t._nvtx_push(self._k.attrs)
        if t._sync is not None:
            t._sync()
        self._t0 = t._clock()

    def __exit__(self, *exc: Any) -> None:
        t = self._t
        if t._sync is not None:
            t._sync()
        t1 = t._clock()
        t._nvtx_pop()
        k = self._k
        t._rows.append((t._step, k.stage, k.layer, k.lane, self._t0, t1, self._nbytes,
                        self._flops))


class _CudaSpan(_Span):
    """Same, with CUDA events on the current stream instead of the CPU clock."""

    __slots__ = ("_e0",)

    def __enter__(self) -> None:
        t = self._t
        t._nvtx_push(self._k.attrs)
        if t._sync is not None:
            t._sync()
        self._e0 = t._events.record()

    def __exit__(self, *exc: Any) -> None:
        t = self._t
        e1 = t._events.record()
        if t._sync is not None:
            t._sync()
        t._nvtx_pop()
        k = self._k
        t._rows.append((t._step, k.stage, k.layer, k.lane, self._e0, e1, self._nbytes,
                        self._flops))


class StageTimer:
    """Records every stage of every step; see the module docstring.

    Args:
        rank: the process rank written in every row.
        sink: receives each step's rows (dict of columns) at ``step_end``.
        nvtx: NVTX backend (default: the ``nvtx`` package's ``kfacperf`` domain, or
            the fallback :func:`~kfacperf.profiler.nvtx_backend.default_backend` finds).
        cuda: time with CUDA events on the current stream (default: when CUDA is available
            and torch is already imported).
        isolate: synchronise around every stage and barrier at every step start.
        barrier: called at ``step_begin`` in isolate mode (default: a
            ``torch.distributed`` barrier when a process group is initialised).
        origin_ns: ``perf_counter_ns`` value that is time 0 (default: now).
        max_pending_steps: GPU only, steps whose events may still be unresolved.
        clock: the CPU clock in nanoseconds (``time.perf_counter_ns``; tests give a fake
            one to control what every row measures).
    """

    enabled = True

    def __init__(
        self,
        *,
        rank: int = 0,
        sink: RowSink | None = None,
        nvtx: NvtxBackend | None = None,
        cuda: bool | None = None,
        isolate: bool = False,
        barrier: Callable[[], None] | None = None,
        origin_ns: int | None = None,
        max_pending_steps: int = 2,
        clock: Callable[[], int] = time.perf_counter_ns,
    ) -> None:
        self.rank = rank
        self._clock = clock
        self.sink = sink if sink is not None else MemorySink()
        self._nvtx = nvtx if nvtx is not None else default_backend()[0]
        self._nvtx_push = self._nvtx.push
        self._nvtx_pop = self._nvtx.pop
        self.cuda = _cuda_default() if cuda is None else cuda
        self.isolate = isolate
        self._sync: Callable[[], None] | None = None
        if isolate:
            self._sync = cuda_events.cuda_sync if self.cuda else None
            self._barrier = barrier if barrier is not None else _dist_barrier
        self.origin_ns = clock() if origin_ns is None else origin_ns
        self._keys: dict[tuple[str, str], _Key] = {}
        self._rows: list[Row] = []
        self._async_rows: collections.deque[Row] = collections.deque()
        self._inflight: list[Pending] = []
        self._completion_watcher: CompletionWatcher | None = None
        self._step = -1
        self._step_t0: Any = None
        self._attempt = 0  # step_begin calls so far
        self._dropped_attempts: set[int] = set()  # those whose step was abandoned
        self._span_cls = _CudaSpan if self.cuda else _Span
        if self.cuda:
            self._events = cuda_events.EventPool()
            self._gpu = cuda_events.GpuResolver(self._events, origin_ns=self.origin_ns)
            self._max_pending = max(0, max_pending_steps)

    # ------------------------------------------------------------------ interface

    def stage(
        self, stage: str, layer: str = "", *, nbytes: int = 0, flops: float = 0.0
    ) -> AbstractContextManager[None]:
        key = self._keys.get((stage, layer))
        if key is None:
            key = self._key(stage, layer)
        return self._span_cls(self, key, nbytes, flops)

    def issue_mark(self) -> Any:
        """Now, as :meth:`async_comm` takes it (a CUDA event on a GPU)."""
        return self._events.record() if self.cuda else self._clock()

    def async_comm(self, stage: str, layer: str, nbytes: int, work: Any, *,
                   issued_at: Any = None) -> None:
        """See :meth:`kfacperf.profiler.timer.Timer.async_comm`.  The NVTX range opens here,
        after the call returned; the recorded start is ``issued_at``."""
        key = self._keys.get((stage, layer))
        if key is None:
            key = self._key(stage, layer)
        step = self._step
        handle = self._nvtx.start(key.attrs)
        if issued_at is not None:
            t0: Any = issued_at
        elif self.cuda:
            t0 = self._events.record()
        else:
            t0 = self._clock()
        if self.isolate:
            work.wait()
            if self._sync is not None:
                self._sync()
            t1 = self._events.record() if self.cuda else self._clock()
            self._nvtx.end(handle)
            self._async_rows.append((step, key.stage, key.layer, key.lane, t0, t1, nbytes, 0.0))
            return
        rows, end, clock = self._async_rows, self._nvtx.end, self._clock
        # completion events come from the pool, like every other event (a fresh one per
        # collective would grow the pool for the whole run)
        record = self._events.record if self.cuda else None
        attempt, dropped = self._attempt, self._dropped_attempts

        def done(_: Any = None) -> None:
            t1 = record() if record is not None else clock()
            end(handle)
            if attempt not in dropped:  # else its step was abandoned (:meth:`step_abort`)
                rows.append((step, key.stage, key.layer, key.lane, t0, t1, nbytes, 0.0))

        self._inflight.append(on_completion(work, done, self._watcher))

    def step_begin(self, step: int) -> None:
        if self.isolate:
            if self._sync is not None:
                self._sync()
            self._barrier()
        self._step = step
        self._attempt += 1
        self._nvtx.push(self._nvtx.attributes(
            message=STEP, color=STAGE_COLORS[STEP], category=STEP, payload=step
        ))
        self._step_t0 = self._events.record() if self.cuda else self._clock()

    def step_end(self) -> None:
        if self.isolate and self._sync is not None:
            self._sync()
        t1 = self._events.record() if self.cuda else self._clock()
        self._nvtx_pop()
        self._rows.append((self._step, STEP, "", lane_of(STEP), self._step_t0, t1, 0, 0.0))
        self._collect_finished_comm()
        rows, self._rows = self._rows, []
        rows.extend(self._drain_async())
        if self.cuda:
            self._gpu.add(rows, step_end_event=t1)
            self._emit(self._gpu.resolve(keep=self._max_pending))
        else:
            self._emit(rows)

    def step_abort(self) -> None:
        """Abandon the current step (the loop raised inside it): what it recorded so far never
        reaches the sink, nor do its collectives when they complete, so a loop that goes on
        after the error records the step again without the rows of the failed attempt."""
        self._nvtx_pop()
        self._dropped_attempts.add(self._attempt)
        rows, self._rows = self._rows, []
        pending = self._drain_async()  # finished collectives: of this step, or late ones
        mine = [r for r in pending if r[0] == self._step]
        self._async_rows.extend(r for r in pending if r[0] != self._step)
        if self.cuda:
            dropped = [e for r in rows + mine for e in (r[4], r[5]) if e is not None]
            self._events.release([*dropped, self._step_t0])
        self._step_t0 = None

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Wait for outstanding collectives' callbacks, resolve and write everything left."""
        wait_all(self._inflight)
        self._inflight = []
        if self._completion_watcher is not None:
            self._completion_watcher.close()
            self._completion_watcher = None
        rows, self._rows = self._rows, []
        rows.extend(self._drain_async())
        if self.cuda:
            self._gpu.add(rows, step_end_event=None)
            self._emit(self._gpu.resolve(keep=0))
        else:
            self._emit(rows)

    # ------------------------------------------------------------------ internals

    def _key(self, stage: str, layer: str) -> _Key:
        lane = lane_of(stage)  # raises ValueError naming an unknown stage
        message = f"{stage} {layer}" if layer else stage
        attrs = self._nvtx.attributes(message=message, color=STAGE_COLORS[stage], category=lane)
        key = self._keys[(stage, layer)] = _Key(stage, layer, lane, attrs)
        return key

    def _collect_finished_comm(self) -> None:
        """Make sure completion callbacks of finished collectives have run, without waiting
        for any collective that is still going."""
        if self._inflight:
            self._inflight = still_pending(self._inflight)

    def _watcher(self) -> CompletionWatcher:
        if self._completion_watcher is None:
            self._completion_watcher = CompletionWatcher()
        return self._completion_watcher

    def _drain_async(self) -> list[Row]:
        out: list[Row] = []
        q = self._async_rows
        while True:
            try:
                out.append(q.popleft())
            except IndexError:
                return out

    def _emit(self, rows: list[Row]) -> None:
        """Rows with CPU ns (or resolved µs floats, from the GPU resolver) -> sink.

        Rows recorded before the first ``step_begin`` (set-up work) have no step and are
        left out of the table (their NVTX ranges were still emitted).
        """
        rows = [r for r in rows if r[0] >= 0]
        if rows:
            self.sink.append(rows_to_columns(rows, rank=self.rank, origin_ns=self.origin_ns))


def _cuda_default() -> bool:
    import sys

    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_available())


def _dist_barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
