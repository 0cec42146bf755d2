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
  communication) on GPU.  They land in the ``comm`` lane under the step they were issued in.
* **Isolate mode** synchronises the device before and after every stage, waits for each
  asynchronous collective as soon as it is issued, and holds a barrier at the start of every
  step, so each stage runs alone; comparing with the default mode shows the overlap the run
  really gets.  No barrier is held per stage: ranks do different per-layer work (an SP-NGD
  owner inverts layers others do not), so per-stage barriers would deadlock.

Rows of a step go to the ``sink`` (:class:`kfacperf.trace_parts.StreamAppender`: appended and
flushed) at ``step_end``.  Times are microseconds since ``origin_ns`` (a ``perf_counter_ns``
value, normally taken right after a barrier at the start of the run).
"""
from __future__ import annotations

import collections
import time
from typing import Any, Callable, ContextManager, Mapping, Protocol, Sequence

from kfacperf.profiler.nvtx_backend import NvtxBackend, NvtxDomainBackend
from kfacperf.stages import STEP, lane_of

# ARGB colour per stage (compute stages warm/green, comm stages blue/purple).
STAGE_COLORS: dict[str, int] = {
    "forward": 0xFF4CAF50,
    "backward": 0xFF8BC34A,
    "factor_compute": 0xFFFF9800,
    "factor_comm": 0xFF2196F3,
    "inverse": 0xFFF44336,
    "inverse_comm": 0xFF3F51B5,
    "grad_comm": 0xFF00BCD4,
    "precondition": 0xFFFFC107,
    "precond_comm": 0xFF9C27B0,
    "update": 0xFF795548,
    "step": 0xFF9E9E9E,
}

_clock = time.perf_counter_ns


class RowSink(Protocol):
    """Where a step's rows go (an Arrow stream appender, or a list in tests)."""

    def append(self, columns: Mapping[str, Sequence[Any]]) -> None: ...


class MemorySink:
    """Keeps appended batches in memory (tests, benchmarks, single-process use)."""

    def __init__(self) -> None:
        self.batches: list[dict[str, list]] = []

    def append(self, columns: Mapping[str, Sequence[Any]]) -> None:
        self.batches.append({k: list(v) for k, v in columns.items()})

    def columns(self) -> dict[str, list]:
        out: dict[str, list] = {}
        for b in self.batches:
            for k, v in b.items():
                out.setdefault(k, []).extend(v)
        return out


class _Key:
    """What is built once per (stage, layer): lane and NVTX attributes."""

    __slots__ = ("stage", "layer", "lane", "attrs")

    def __init__(self, stage: str, layer: str, lane: str, attrs: Any) -> None:
        self.stage, self.layer, self.lane, self.attrs = stage, layer, lane, attrs


class _Span:
    """The context manager of one synchronous stage occurrence (CPU clock)."""

    __slots__ = ("_t", "_k", "_nbytes", "_flops", "_t0")

    def __init__(self, timer: "StageTimer", key: _Key, nbytes: int, flops: float) -> None:
        self._t, self._k, self._nbytes, self._flops = timer, key, nbytes, flops

    def __enter__(self) -> None:
        t = self._t
        t._nvtx_push(self._k.attrs)
        if t._sync is not None:
            t._sync()
        self._t0 = _clock()

    def __exit__(self, *exc: Any) -> None:
        t = self._t
        if t._sync is not None:
            t._sync()
        t1 = _clock()
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
        nvtx: NVTX backend (default: the ``nvtx`` package's ``kfacperf`` domain).
        cuda: time with CUDA events on the current stream (default: when CUDA is available
            and torch is already imported).
        isolate: synchronise around every stage and barrier at every step start.
        barrier: called at ``step_begin`` in isolate mode (default: a
            ``torch.distributed`` barrier when a process group is initialised).
        origin_ns: ``perf_counter_ns`` value that is time 0 (default: now).
        max_pending_steps: GPU only, steps whose events may still be unresolved.
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
    ) -> None:
        self.rank = rank
        self.sink = sink if sink is not None else MemorySink()
        self._nvtx = nvtx if nvtx is not None else NvtxDomainBackend()
        self._nvtx_push = self._nvtx.push
        self._nvtx_pop = self._nvtx.pop
        self.cuda = _cuda_default() if cuda is None else cuda
        self.isolate = isolate
        self._sync: Callable[[], None] | None = None
        if isolate:
            self._sync = _cuda_sync if self.cuda else None
            self._barrier = barrier if barrier is not None else _dist_barrier
        self.origin_ns = _clock() if origin_ns is None else origin_ns
        self._keys: dict[tuple[str, str], _Key] = {}
        self._rows: list[tuple] = []
        self._async_rows: collections.deque = collections.deque()
        self._inflight: list[tuple[Any, Any]] = []  # (source future, chained future)
        self._step = -1
        self._step_t0: Any = None
        self._span_cls = _CudaSpan if self.cuda else _Span
        if self.cuda:
            self._events = _EventPool()
            self._gpu = _GpuResolver(self._events, origin_ns=self.origin_ns)
            self._max_pending = max(0, max_pending_steps)

    # ------------------------------------------------------------------ interface

    def stage(
        self, stage: str, layer: str = "", *, nbytes: int = 0, flops: float = 0.0
    ) -> ContextManager[None]:
        key = self._keys.get((stage, layer))
        if key is None:
            key = self._key(stage, layer)
        return self._span_cls(self, key, nbytes, flops)

    def async_comm(self, stage: str, layer: str, nbytes: int, work: Any) -> None:
        key = self._keys.get((stage, layer))
        if key is None:
            key = self._key(stage, layer)
        step = self._step
        handle = self._nvtx.start(key.attrs)
        if self.cuda:
            t0: Any = self._events.record()
        else:
            t0 = _clock()
        if self.isolate:
            work.wait()
            if self._sync is not None:
                self._sync()
            t1 = self._events.record() if self.cuda else _clock()
            self._nvtx.end(handle)
            self._async_rows.append((step, key.stage, key.layer, key.lane, t0, t1, nbytes, 0.0))
            return
        fut = work.get_future()
        rows, end, cuda = self._async_rows, self._nvtx.end, self.cuda

        def done(f: Any) -> None:
            t1 = _fresh_cuda_event() if cuda else _clock()
            end(handle)
            rows.append((step, key.stage, key.layer, key.lane, t0, t1, nbytes, 0.0))

        self._inflight.append((fut, fut.then(done)))

    def step_begin(self, step: int) -> None:
        if self.isolate:
            if self._sync is not None:
                self._sync()
            self._barrier()
        self._step = step
        self._nvtx.push(self._nvtx.attributes(
            message=STEP, color=STAGE_COLORS[STEP], category=STEP, payload=step
        ))
        self._step_t0 = self._events.record() if self.cuda else _clock()

    def step_end(self) -> None:
        if self.isolate and self._sync is not None:
            self._sync()
        t1 = self._events.record() if self.cuda else _clock()
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

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Wait for outstanding collectives' callbacks, resolve and write everything left."""
        for _, chained in self._inflight:
            try:
                chained.wait()
            except Exception:  # a failed collective: no completion time to record
                pass
        self._inflight = []
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
        if not self._inflight:
            return
        still = []
        for fut, chained in self._inflight:
            if fut.done():
                try:
                    chained.wait()
                except Exception:
                    pass
            else:
                still.append((fut, chained))
        self._inflight = still

    def _drain_async(self) -> list[tuple]:
        out = []
        q = self._async_rows
        while True:
            try:
                out.append(q.popleft())
            except IndexError:
                return out

    def _emit(self, rows: list[tuple]) -> None:
        """Rows with CPU ns (or resolved µs floats, from the GPU resolver) -> sink.

        Rows recorded before the first ``step_begin`` (set-up work) have no step and are
        left out of the table (their NVTX ranges were still emitted).
        """
        rows = [r for r in rows if r[0] >= 0]
        if not rows:
            return
        origin = self.origin_ns
        n = len(rows)
        cols: dict[str, list] = {
            "rank": [self.rank] * n, "step": [], "stage": [], "layer": [], "lane": [],
            "start_us": [], "dur_us": [], "bytes": [], "flops": [],
        }
        for step, stage, layer, lane, a, b, nbytes, flops in rows:
            cols["step"].append(step)
            cols["stage"].append(stage)
            cols["layer"].append(layer)
            cols["lane"].append(lane)
            if isinstance(a, int):
                cols["start_us"].append((a - origin) / 1e3)
                cols["dur_us"].append((b - a) / 1e3)
            else:  # already µs (GPU)
                cols["start_us"].append(a)
                cols["dur_us"].append(b - a)
            cols["bytes"].append(int(nbytes))
            cols["flops"].append(float(flops))
        self.sink.append(cols)


def _cuda_default() -> bool:
    import sys

    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_available())


def _cuda_sync() -> None:
    import torch

    torch.cuda.synchronize()


def _dist_barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _new_cuda_event() -> Any:
    import torch

    return torch.cuda.Event(enable_timing=True)


def _fresh_cuda_event() -> Any:
    ev = _new_cuda_event()
    ev.record()  # on the current stream: in a future callback, synchronised with the work
    return ev


class _EventPool:
    """Reusable ``torch.cuda.Event(enable_timing=True)`` objects (creating them is not free)."""

    def __init__(self) -> None:
        self._free: list[Any] = []

    def record(self) -> Any:
        ev = self._free.pop() if self._free else _new_cuda_event()
        ev.record()
        return ev

    def release(self, events: Sequence[Any]) -> None:
        self._free.extend(events)


class _GpuResolver:
    """Turns rows holding CUDA events into rows holding µs since the origin, step by step.

    Each step is anchored at its ``step`` row's start event; the anchor's offset from the
    origin is chained from the previous step's anchor (short ``elapsed_time`` intervals keep
    float32 precision over long runs).
    """

    def __init__(self, pool: _EventPool, *, origin_ns: int) -> None:
        _cuda_sync()
        self._pool = pool
        self._prev_anchor = pool.record()
        _cuda_sync()
        # the origin event completed (about) now: its offset from origin_ns on the CPU clock
        self._prev_us = (_clock() - origin_ns) / 1e3
        self._pending: collections.deque = collections.deque()

    def add(self, rows: list[tuple], *, step_end_event: Any) -> None:
        self._pending.append((rows, step_end_event))

    def resolve(self, *, keep: int) -> list[tuple]:
        out: list[tuple] = []
        while self._pending:
            rows, last = self._pending[0]
            if len(self._pending) <= keep and last is not None and not last.query():
                break
            self._pending.popleft()
            out.extend(self._resolve_rows(rows))
        return out

    def _resolve_rows(self, rows: list[tuple]) -> list[tuple]:
        events = [e for r in rows for e in (r[4], r[5])]
        for ev in events:
            ev.synchronize()  # no-op wait when already complete (the usual case)
        if not rows:
            return []
        anchor = next((r[4] for r in rows if r[1] == STEP), rows[0][4])
        anchor_us = self._prev_us + self._prev_anchor.elapsed_time(anchor) * 1e3
        out = []
        for step, stage, layer, lane, e0, e1, nbytes, flops in rows:
            start = anchor_us + anchor.elapsed_time(e0) * 1e3
            out.append((step, stage, layer, lane, start, start + e0.elapsed_time(e1) * 1e3,
                        nbytes, flops))
        self._pool.release([self._prev_anchor])
        self._prev_anchor, self._prev_us = anchor, anchor_us
        self._pool.release([e for e in events if e is not anchor and e is not None])
        return out
