"""How commbench times collectives on the ranks (one launch on one machine, or across nodes).

A point is one collective at one size on one group of ranks.  Every rank of the job runs
:func:`time_points` for every group, members and others alike, so the barriers that start
each repetition are the whole job's: only one group communicates at a time.  A repetition's
time is a member's time per call; the launchers take the slowest member's.

How a repetition times (``timing``, :data:`kfacperf.bench.results.TIMINGS`):

* ``per_call``: one call alone, as the optimizer issues each collective once and then turns to
  other work (see :mod:`kfacperf.bench.commbench` for why it matters on shared cores);
* ``batched``: back-to-back calls filling about :data:`INNER_TARGET_US`, as nccl-tests
  averages over iterations.

The collectives are called exactly as the optimizer calls them (``kfacperf.kfac.comm``):
``all_reduce`` on a flat fp32 buffer, the list forms of ``reduce_scatter`` and
``all_gather``, ``broadcast`` from the group's first rank.  ``nbytes`` follows the simulator's
convention (:mod:`kfacperf.sim.costs.collectives`).

API::

    resolve_timing(timing, backend) -> "per_call" | "batched"
    calls_per_repetition(timing, one_call_us) -> int
    time_points(points, *, ranks, rank, group, device, sync, timing, reps, warmup, on_rep)
        -> list[list[float]]   (per point, this rank's us per call of every repetition)
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

from kfacperf.bench.results import TIMINGS

ELEM = 4  # fp32

INNER_TARGET_US = 3000.0
"""Back-to-back calls per repetition fill about this much time (at most 20 calls)."""


class BufferTooLarge(MemoryError):
    """A message size whose buffers this rank cannot allocate: bad input, said in one line."""


def resolve_timing(timing: str, backend: str) -> str:
    """``auto``: one call per repetition on gloo, back-to-back calls on NCCL."""
    if timing != "auto":
        return timing
    return "batched" if backend == "nccl" else "per_call"


def calls_per_repetition(timing: str, one_call_us: float) -> int:
    """Calls timed together in one repetition: one alone (``per_call``), or back to back
    filling about :data:`INNER_TARGET_US` (``batched``, at most 20)."""
    if timing == "per_call":
        return 1
    if timing != "batched":
        raise ValueError(f"timing must be one of {', '.join(TIMINGS)}, got {timing!r}")
    return max(1, min(20, round(INNER_TARGET_US / max(one_call_us, 1.0))))


def buffer_numel(nbytes: int, group_size: int) -> int:
    """Elements of the full buffer, a multiple of ``group_size`` so blocks are even."""
    per_rank = max(1, math.ceil(nbytes / ELEM / group_size))
    return per_rank * group_size


def sent_bytes(nbytes: int, group_size: int) -> int:
    """The bytes a point asked for ``nbytes`` really moves: its full buffer (rounded up to
    whole fp32 elements, an even block per rank), the size its timing is recorded at."""
    return buffer_numel(nbytes, group_size) * ELEM


def make_call(op: str, nbytes: int, ranks: Sequence[int], rank: int, device: Any,
              group: Any = None) -> Callable[[], None]:
    """One call of ``op`` on ``nbytes`` as a member ``rank`` of ``ranks`` (``group``: their
    process group, None for the whole job)."""
    import torch
    import torch.distributed as dist

    size = len(ranks)
    numel = buffer_numel(nbytes, size)
    if op == "all_reduce":
        buf = torch.ones(numel, device=device)
        return lambda: dist.all_reduce(buf, group=group)
    if op == "broadcast":
        buf = torch.ones(numel, device=device)
        return lambda: dist.broadcast(buf, src=ranks[0], group=group)
    block = numel // size
    if op == "reduce_scatter":
        inputs = [torch.ones(block, device=device) for _ in range(size)]
        out = torch.empty(block, device=device)
        return lambda: dist.reduce_scatter(out, inputs, group=group)
    local = torch.ones(block, device=device)
    outs = [torch.empty(block, device=device) for _ in range(size)]
    return lambda: dist.all_gather(outs, local, group=group)


def time_points(
    points: Sequence[tuple[str, int]], *, ranks: Sequence[int], rank: int, group: Any,
    device: Any, sync: Callable[[], None], timing: str, reps: int, warmup: int,
    on_rep: Callable[[int], None] | None = None,
) -> list[list[float]]:
    """Time every ``(op, nbytes)`` of ``points`` on the group of ``ranks``; called by every
    rank of the job.  Repetitions sweep all points in turn (a burst of load from elsewhere
    hits one repetition of many points, not every repetition of one), each after a barrier.
    Returns this rank's microseconds per call, per point and repetition (0 on non-members).
    ``on_rep(k)``: after repetition ``k`` (1-based)."""
    import torch
    import torch.distributed as dist

    member = rank in ranks
    calls: list[Callable[[], None] | None] = []
    inners: list[int] = []
    for op, nbytes in points:
        try:
            call = make_call(op, nbytes, ranks, rank, device, group) if member else None
        except (MemoryError, RuntimeError) as exc:  # torch's out-of-memory is a RuntimeError
            if isinstance(exc, MemoryError) or "alloc" in str(exc) or "out of memory" in str(exc):
                raise BufferTooLarge(f"cannot allocate the buffers of {op} at {nbytes:,} bytes "
                                     f"on {device}; give smaller --sizes") from None
            raise
        if call is not None:
            for _ in range(warmup):
                call()
        sync()
        dist.barrier()
        t0 = time.perf_counter()
        if call is not None:
            call()
        sync()
        once = torch.tensor([time.perf_counter() - t0 if member else 0.0], dtype=torch.float64)
        dist.all_reduce(once, op=dist.ReduceOp.MAX)  # every rank picks the same count
        calls.append(call)
        inners.append(calls_per_repetition(timing, float(once.item()) * 1e6))
    times: list[list[float]] = [[] for _ in points]
    for rep in range(reps if points else 0):
        for i, (call, inner) in enumerate(zip(calls, inners)):
            dist.barrier()
            sync()
            t0 = time.perf_counter()
            if call is not None:
                for _ in range(inner):
                    call()
            sync()
            times[i].append((time.perf_counter() - t0) / inner * 1e6 if member else 0.0)
        if on_rep is not None:
            on_rep(rep + 1)
    return times
