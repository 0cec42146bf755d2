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
                    collectives, timing, nnodes, nproc_per_node, rdzv_endpoint, rdzv_id)
    run_commbench(config, *, progress=print)
        -> CommbenchResult(.points, .slowdowns, .stage_slowdowns, .probes, .stragglers,
                           .comm_slowdowns, .backend)

The ranks are started with ``multiprocessing``'s spawn method, which imports the calling
script's ``__main__`` module again in every rank: call it from a script under
``if __name__ == "__main__":`` (as :func:`kfacperf.pipeline.run_demo`, which calls it).

With ``config.nnodes`` > 1 the run spans nodes: one torchrun job whose groups within a node
and across nodes give both network tiers (:mod:`kfacperf.bench.multinode`).  How a repetition
times a call is :mod:`kfacperf.bench.timing`.

The fits (alpha-beta per collective, contention, straggler, comm contention) are in
:mod:`kfacperf.calibrate.cluster`.
"""
from __future__ import annotations

import os
import queue as queue_mod
import statistics
import time
import traceback
from collections.abc import Callable
from typing import Any

from kfacperf.bench.config import CommbenchConfig
from kfacperf.bench.multinode import run_across_nodes
from kfacperf.bench.results import PROBE_TABLES, CommbenchResult, Point, probe_tables
from kfacperf.bench.timing import BufferTooLarge, resolve_timing, sent_bytes, time_points
from kfacperf.runtime.net import free_port


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


# --------------------------------------------------------------------------- worker side
def _worker(rank: int, world: int, port: int, cfg: dict[str, Any], out: Any) -> None:
    import torch
    import torch.distributed as dist

    from kfacperf.runtime.distributed import init_local_group
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
        init_local_group(backend, rank=rank, world=world, port=port,
                         timeout_s=cfg["timeout_s"])
        sync = torch.cuda.synchronize if backend == "nccl" else (lambda: None)
        slowdown: dict[str, float] = {}
        if cfg["contention"] and backend == "gloo":
            from kfacperf.bench.probe import measure_slowdowns

            slowdown = measure_slowdowns(rank, device)
        points = ([(op, nbytes) for op in cfg["ops"] for nbytes in cfg["sizes"]]
                  if cfg["collectives"] else [])

        def on_rep(rep: int) -> None:
            if rank == 0:
                out.put(("progress", world, rep, cfg["reps"]))

        times = time_points(points, ranks=range(world), rank=rank, group=None, device=device,
                            sync=sync, timing=cfg["timing"], reps=cfg["reps"],
                            warmup=cfg["warmup"], on_rep=on_rep)
        out.put(("result", rank, times, slowdown))
        dist.barrier()
        dist.destroy_process_group()
    except BufferTooLarge as exc:  # bad input: one line, no traceback
        out.put(("error", rank, str(exc)))
    except BaseException:  # report, never hang the parent
        out.put(("error", rank, traceback.format_exc()))


# --------------------------------------------------------------------------- parent side
def resolve_backend(backend: str) -> str:
    """``auto``: NCCL where this machine has two GPUs or more, else gloo."""
    if backend == "gloo":
        return backend  # without importing torch (a few seconds) in the launcher
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
            else:  # a traceback, or one line (bad input)
                sep = "\n" if "\n" in msg[2].strip() else " "
                raise RuntimeError(f"commbench rank {msg[1]} failed:{sep}{msg[2]}")
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
    """Measure every (world size, collective, size) of ``config``; across nodes (``nnodes``
    > 1) every group of :func:`kfacperf.bench.multinode.plan_groups` in one torchrun job."""
    backend = resolve_backend(config.backend)
    timing = resolve_timing(config.timing, backend)
    if config.multi_node:
        return run_across_nodes(config, backend=backend, timing=timing, progress=progress)
    cfg = {"backend": backend, "timing": timing, "ops": list(config.ops),
           "sizes": list(config.sizes), "reps": config.reps, "warmup": config.warmup,
           "timeout_s": config.timeout_s,
           "contention": config.contention, "collectives": config.collectives}
    points: list[Point] = []
    tables: dict[str, dict[int, Any]] = {k: {} for k in PROBE_TABLES}
    for world in config.world_sizes or default_world_sizes(backend):
        progress(f"commbench: {world} ranks, backend {backend}")
        per_rank, slowdown = _launch(world, cfg, progress)
        for key, values in probe_tables(world, slowdown).items():
            tables[key].update(values)
        i = 0
        for op in config.ops if config.collectives else ():
            for nbytes in config.sizes:
                reps = [max(r[i][k] for r in per_rank) for k in range(config.reps)]
                points.append(Point(op=op, world_size=world, nbytes=sent_bytes(nbytes, world),
                                    time_us=statistics.fmean(reps), reps=config.reps,
                                    timing=timing))
                i += 1
    cores = (os.cpu_count() or 1) if backend == "gloo" else 0
    return CommbenchResult(backend=backend, points=tuple(points), cores=cores, **tables)
