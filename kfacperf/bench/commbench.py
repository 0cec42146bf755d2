"""Measure collectives on this machine (gloo on CPU, NCCL on GPUs) and fit alpha-beta.

One launch per world size: ``P`` processes (``torch.multiprocessing``, spawn) join a process
group and time every collective at every size, in repetitions that sweep all points in turn
(so a burst of load from elsewhere hits one repetition of many points, not every repetition
of one).  A repetition starts after a barrier; its time is the slowest rank's, and a point's
time is the mean over repetitions: the expected cost a step pays, stalls included.

How a repetition times (``timing``):

* ``per_call`` (the default on gloo): one call alone, as the optimizer issues each collective
  once and then turns to other work.  Where ranks share CPU cores a collective's time is
  bimodal: a call either runs through or stalls for milliseconds while a rank's
  communication threads wait for a core, and the ranks complete it up to a few milliseconds
  apart.  Back-to-back calls hide both (a rank that finished early waits inside the next
  call), which made small reduce-scatters look 2-3x cheaper than the optimizer saw them.
* ``batched`` (the default on NCCL): ``inner`` back-to-back calls filling a few milliseconds,
  as nccl-tests averages over iterations, so launch and barrier skew spread over many calls.

The collectives are called exactly as the optimizer calls them (``kfacperf.kfac.comm``):
``all_reduce`` on a flat fp32 buffer, the list forms of ``reduce_scatter`` and
``all_gather``, ``broadcast`` from rank 0.  ``nbytes`` follows the simulator's convention
(:mod:`kfacperf.sim.costs.collectives`): all-reduce buffer, reduce-scatter input, all-gather
output, broadcast payload.

When ranks share CPU cores, each launch also times representative work of every compute
stage kind on rank 0 alone and on all ranks at once (:mod:`kfacperf.bench.probe`); the
ratios are the compute slowdowns the host model's ``contention`` (all kinds together) and
``contention_by_stage`` describe.  On a shared virtual machine that slowdown changes from
minute to minute (the host moves the virtual CPUs), so a probe taken once may describe another
minute than the runs it should predict: ``collectives=False`` measures only the slowdown, and
:mod:`kfacperf.bench.raw` averages the probes taken across a recording session.

API::

    CommbenchConfig(*, world_sizes, sizes, ops, reps, warmup, backend, timeout_s, contention,
                    collectives, timing)
    run_commbench(config, *, progress=print)
        -> CommbenchResult(.points, .slowdowns, .stage_slowdowns, .probes, .stragglers,
                           .comm_slowdowns, .backend)

The fits (alpha-beta per collective, contention, straggler, comm contention) are in
:mod:`kfacperf.calibrate.cluster`.
"""
from __future__ import annotations

import math
import os
import queue as queue_mod
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kfacperf.bench.results import (
    ALL,
    COMM_AFTER_COMPUTE,
    DEFAULT_SIZES,
    STRAGGLER,
    TIMINGS,
    CommbenchResult,
    Point,
)
from kfacperf.runtime.net import free_port
from kfacperf.sim.models.cluster import OPS

ELEM = 4  # fp32


def default_world_sizes(backend: str) -> tuple[int, ...]:
    """2, 4, 8 up to the GPU count (NCCL) or the CPU core count (gloo).

    Beyond the core count ranks wait for the scheduler, not the network (on 2 cores, gloo's
    latency at 4 ranks is ~10x that at 2); ask for such world sizes explicitly.
    """
    if backend == "nccl":
        import torch

        limit = torch.cuda.device_count()
    else:
        limit = os.cpu_count() or 1
    return tuple(p for p in (2, 4, 8) if p <= max(2, limit))




@dataclass(frozen=True, kw_only=True)
class CommbenchConfig:
    world_sizes: tuple[int, ...] | None = None  # None: default_world_sizes(backend)
    sizes: tuple[int, ...] = DEFAULT_SIZES
    ops: tuple[str, ...] = OPS
    reps: int = 5
    warmup: int = 2
    backend: str = "auto"
    timeout_s: float = 120.0
    contention: bool = True
    collectives: bool = True  # False: only the contention probe
    timing: str = "auto"  # per_call | batched | auto (per_call on gloo, batched on NCCL)

    def __post_init__(self) -> None:
        if not (self.collectives or self.contention):
            raise ValueError("nothing to measure: neither collectives nor contention")
        if self.world_sizes is not None and (
            not self.world_sizes or any(p < 2 for p in self.world_sizes)
        ):
            raise ValueError(f"world sizes must be >= 2, got {list(self.world_sizes)}")
        if not self.sizes or any(s < 1 for s in self.sizes):
            raise ValueError(f"sizes must be >= 1 byte, got {list(self.sizes)}")
        bad = [op for op in self.ops if op not in OPS]
        if bad or not self.ops:
            raise ValueError(f"unknown collective(s) {bad}; known: {', '.join(OPS)}")
        if self.reps < 1 or self.warmup < 0:
            raise ValueError("reps must be >= 1 and warmup >= 0")
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ValueError(f"backend must be auto, gloo or nccl, got {self.backend!r}")
        if self.timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        if self.timing not in ("auto",) + TIMINGS:
            raise ValueError(f"timing must be auto, {' or '.join(TIMINGS)}, got {self.timing!r}")


def resolve_timing(timing: str, backend: str) -> str:
    """``auto``: one call per repetition on gloo, back-to-back calls on NCCL."""
    if timing != "auto":
        return timing
    return "batched" if backend == "nccl" else "per_call"


INNER_TARGET_US = 3000.0
"""Back-to-back calls per repetition fill about this much time (at most 20 calls)."""


def calls_per_repetition(timing: str, one_call_us: float) -> int:
    """Calls timed together in one repetition: one alone (``per_call``), or back to back
    filling about :data:`INNER_TARGET_US` (``batched``, at most 20)."""
    if timing == "per_call":
        return 1
    if timing != "batched":
        raise ValueError(f"timing must be one of {', '.join(TIMINGS)}, got {timing!r}")
    return max(1, min(20, round(INNER_TARGET_US / max(one_call_us, 1.0))))


def _numel(op: str, nbytes: int, world: int) -> int:
    """Elements of the full buffer, a multiple of ``world`` so blocks are even."""
    per_rank = max(1, math.ceil(nbytes / ELEM / world))
    return per_rank * world


# --------------------------------------------------------------------------- worker side
def _make_call(op: str, numel: int, world: int, rank: int, device: Any) -> Callable[[], None]:
    import torch
    import torch.distributed as dist

    if op == "all_reduce":
        buf = torch.ones(numel, device=device)
        return lambda: dist.all_reduce(buf)
    if op == "broadcast":
        buf = torch.ones(numel, device=device)
        return lambda: dist.broadcast(buf, src=0)
    block = numel // world
    if op == "reduce_scatter":
        inputs = [torch.ones(block, device=device) for _ in range(world)]
        out = torch.empty(block, device=device)
        return lambda: dist.reduce_scatter(out, inputs)
    local = torch.ones(block, device=device)
    outs = [torch.empty(block, device=device) for _ in range(world)]
    return lambda: dist.all_gather(outs, local)


def _worker(rank: int, world: int, port: int, cfg: dict[str, Any], out: Any) -> None:
    import torch
    import torch.distributed as dist

    from kfacperf.runtime.heap import keep_heap

    try:
        keep_heap()  # as in profiled runs: buffers freed and taken again stay resident
        torch.set_num_threads(1)
        backend = cfg["backend"]
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            device = torch.device("cpu")
        import datetime

        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world,
                                timeout=datetime.timedelta(seconds=cfg["timeout_s"]))
        sync = torch.cuda.synchronize if backend == "nccl" else (lambda: None)
        slowdown: dict[str, float] = {}
        if cfg["contention"] and backend == "gloo":
            from kfacperf.bench.probe import measure_slowdowns

            slowdown = measure_slowdowns(rank, device)
        points = ([(op, nbytes) for op in cfg["ops"] for nbytes in cfg["sizes"]]
                  if cfg["collectives"] else [])
        calls, inners = [], []
        for op, nbytes in points:
            call = _make_call(op, _numel(op, nbytes, world), world, rank, device)
            for _ in range(cfg["warmup"]):
                call()
            sync()
            dist.barrier()
            t0 = time.perf_counter()
            call()
            sync()
            once = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(once, op=dist.ReduceOp.MAX)  # every rank picks the same count
            calls.append(call)
            inners.append(calls_per_repetition(cfg["timing"], float(once.item()) * 1e6))
        times: list[list[float]] = [[] for _ in points]
        for rep in range(cfg["reps"] if points else 0):
            for i, (call, inner) in enumerate(zip(calls, inners)):
                dist.barrier()
                sync()
                t0 = time.perf_counter()
                for _ in range(inner):
                    call()
                sync()
                times[i].append((time.perf_counter() - t0) / inner * 1e6)
            if rank == 0:
                out.put(("progress", world, rep + 1, cfg["reps"]))
        out.put(("result", rank, times, slowdown))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # report, never hang the parent
        out.put(("error", rank, traceback.format_exc()))


# --------------------------------------------------------------------------- parent side
def resolve_backend(backend: str) -> str:
    import torch

    if backend == "auto":
        return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= 2 else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("backend nccl needs CUDA GPUs; use gloo")
    return backend


def _launch(world: int, cfg: dict[str, Any], progress: Callable[[str], None]
            ) -> tuple[list[list[list[float]]], dict[str, float]]:
    import torch.multiprocessing as tmp

    ctx = tmp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, cfg, out), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, list[list[float]]] = {}
    slowdown: dict[str, float] = {}
    deadline = time.monotonic() + cfg["timeout_s"] + 60.0
    try:
        while len(results) < world:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"commbench with {world} ranks timed out")
            try:
                msg = out.get(timeout=min(left, 1.0))
            except queue_mod.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(
                        f"commbench rank exited with code {dead[0].exitcode}") from None
                continue
            if msg[0] == "progress":
                _, w, rep, reps = msg
                progress(f"  {w} ranks: repetition {rep}/{reps} of every point done")
            elif msg[0] == "result":
                results[msg[1]] = msg[2]
                if msg[1] == 0:
                    slowdown = msg[3]
            else:
                raise RuntimeError(f"commbench rank {msg[1]} failed:\n{msg[2]}")
        for p in procs:  # results are in; do not wait long for interpreter teardown
            p.join(timeout=3)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
    return [results[r] for r in range(world)], slowdown


def run_commbench(config: CommbenchConfig, *, progress: Callable[[str], None] = print
                  ) -> CommbenchResult:
    """Measure every (world size, collective, size) of ``config``."""
    backend = resolve_backend(config.backend)
    timing = resolve_timing(config.timing, backend)
    cfg = {"backend": backend, "timing": timing, "ops": list(config.ops),
           "sizes": list(config.sizes), "reps": config.reps, "warmup": config.warmup,
           "timeout_s": config.timeout_s,
           "contention": config.contention, "collectives": config.collectives}
    points: list[Point] = []
    slowdowns: dict[int, float] = {}
    stage_slowdowns: dict[int, dict[str, float]] = {}
    probes: dict[int, int] = {}
    stragglers: dict[int, float] = {}
    comm_slowdowns: dict[int, float] = {}
    for world in config.world_sizes or default_world_sizes(backend):
        progress(f"commbench: {world} ranks, backend {backend}")
        per_rank, slowdown = _launch(world, cfg, progress)
        if slowdown and not math.isnan(slowdown[ALL]):
            slowdowns[world] = slowdown[ALL]
            stage_slowdowns[world] = {k: v for k, v in slowdown.items()
                                      if k not in (ALL, STRAGGLER, COMM_AFTER_COMPUTE)}
            probes[world] = 1
            if STRAGGLER in slowdown and math.isfinite(slowdown[STRAGGLER]):
                stragglers[world] = slowdown[STRAGGLER]
            if COMM_AFTER_COMPUTE in slowdown and math.isfinite(slowdown[COMM_AFTER_COMPUTE]):
                comm_slowdowns[world] = slowdown[COMM_AFTER_COMPUTE]
        i = 0
        for op in config.ops if config.collectives else ():
            for nbytes in config.sizes:
                reps = [max(r[i][k] for r in per_rank) for k in range(config.reps)]
                points.append(Point(op=op, world_size=world, nbytes=nbytes,
                                    time_us=statistics.fmean(reps), reps=config.reps,
                                    timing=timing))
                i += 1
    cores = (os.cpu_count() or 1) if backend == "gloo" else 0
    return CommbenchResult(backend=backend, points=tuple(points), slowdowns=slowdowns, cores=cores,
                           stage_slowdowns=stage_slowdowns, probes=probes,
                           stragglers=stragglers, comm_slowdowns=comm_slowdowns)
