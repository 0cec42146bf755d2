"""``kfacperf commbench`` across nodes: one torchrun job, groups within a node and across nodes.

Every node runs the same command, ``kfacperf commbench --nnodes N --node-rank R
--rdzv-endpoint HOST:PORT [--nproc-per-node K]``; each starts ::

    python -m torch.distributed.run --nnodes N --nproc-per-node K --rdzv-backend c10d \\
        --rdzv-endpoint HOST:PORT --rdzv-id ID -m kfacperf.bench.multinode JOB

and torchrun joins the nodes' ranks into one job of ``N K`` ranks, numbered node by node
(node ``i`` of the rendezvous holds ranks ``iK .. iK + K - 1``; the c10d rendezvous orders the
nodes itself, so that ``i`` need not be the node's ``--node-rank``).  The groups timed
(:func:`plan_groups`), one at a time while the other ranks wait:

* within a node: the first ``s`` ranks of node 0, for each ``s`` of the world sizes (2 .. K):
  the intra tier;
* across nodes: the first ``g`` ranks of each of the first ``m`` nodes, for ``m`` = 2, 4, .. and
  ``N``, and ``g`` = 1 (the network alone) and ``K`` (the whole node, as training runs): the
  inter tier, fitted with the intra tier known (:mod:`kfacperf.calibrate.inter_tier`).

The ranks time every group with :func:`kfacperf.bench.timing.time_points`; every rank then
holds every point (the slowest member's time per repetition), and local rank 0 of each node
writes the result to the file its launcher named.  With gloo and ``K`` >= 2 the ranks of node 0
also probe how they slow each other (:mod:`kfacperf.bench.probe`).

What a run needs: the same command on every node, started within the rendezvous timeout
(``timeout_s``); ``HOST:PORT`` (port 29400 if left out) reachable from every node, where the
first node to arrive on ``HOST`` serves the rendezvous; and every node reaching every other on
any TCP port, as gloo and NCCL connect ranks on ports the system picks (``GLOO_SOCKET_IFNAME``,
``NCCL_SOCKET_IFNAME`` choose the network interface).

API::

    plan_groups(nnodes, per_node, within_sizes) -> list[Group(.ranks, .nodes, .size)]
    within_sizes(per_node, world_sizes=None) -> tuple[int, ...]
    torchrun_command(config, *, per_node, job_json) -> list[str]
    run_across_nodes(config, *, backend, timing, progress) -> CommbenchResult   (the launcher)
    main(argv)                                                                   (each rank)
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kfacperf.bench.config import CommbenchConfig
from kfacperf.bench.results import CommbenchResult, Point, probe_tables
from kfacperf.bench.timing import BufferTooLarge, sent_bytes


@dataclass(frozen=True)
class Group:
    """Ranks that run collectives together, spread evenly over ``nodes`` nodes."""

    ranks: tuple[int, ...]
    nodes: int

    @property
    def size(self) -> int:
        return len(self.ranks)


def within_sizes(per_node: int, world_sizes: Sequence[int] | None = None) -> tuple[int, ...]:
    """Sizes of the groups within a node: ``world_sizes``, or 2, 4, 8, .. and ``per_node``."""
    if world_sizes:
        over = [s for s in world_sizes if s > per_node]
        if over:
            raise ValueError(f"--world-sizes {','.join(map(str, over))}: a node runs "
                             f"{per_node} rank(s) (--nproc-per-node); groups within a node "
                             "cannot be larger")
        return tuple(sorted(set(world_sizes)))
    sizes = {s for s in (2 ** k for k in range(1, per_node.bit_length())) if s <= per_node}
    return tuple(sorted(sizes | ({per_node} if per_node >= 2 else set())))


def plan_groups(nnodes: int, per_node: int, within: Sequence[int]) -> list[Group]:
    """The groups to time (see the module docstring), within a node first."""
    if nnodes < 2 or per_node < 1:
        raise ValueError(f"a run across nodes needs >= 2 nodes of >= 1 rank, got {nnodes} x "
                         f"{per_node}")
    groups = [Group(tuple(range(s)), 1) for s in within]
    counts = sorted({m for m in (2 ** k for k in range(1, nnodes.bit_length()))} | {nnodes})
    for m in counts:
        for g in sorted({1, per_node}):
            groups.append(Group(tuple(n * per_node + j for n in range(m) for j in range(g)), m))
    return groups


def torchrun_command(config: CommbenchConfig, *, per_node: int, job_json: str) -> list[str]:
    """The command that starts this node's ranks (the same on every node but for ``job``)."""
    return [sys.executable, "-m", "torch.distributed.run",
            "--nnodes", str(config.nnodes), "--nproc-per-node", str(per_node),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", str(config.rdzv_endpoint),
            "--rdzv-id", config.rdzv_id,
            "--rdzv-conf", f"join_timeout={max(1, round(config.timeout_s))}",
            "--max-restarts", "0", "--monitor-interval", "0.2",
            "-m", "kfacperf.bench.multinode", job_json]


# --------------------------------------------------------------------------- launcher side
def run_across_nodes(config: CommbenchConfig, *, backend: str, timing: str,
                     progress: Callable[[str], None] = print) -> CommbenchResult:
    """Start this node's ranks under torchrun and return what the whole job measured."""
    per_node = config.nproc_per_node or _default_per_node(backend)
    within = within_sizes(per_node, config.world_sizes)
    groups = plan_groups(config.nnodes, per_node, within)
    with tempfile.TemporaryDirectory(prefix="kfacperf-commbench-") as tmp:
        out = Path(tmp) / "result.json"
        job = {"backend": backend, "timing": timing, "ops": list(config.ops),
               "sizes": list(config.sizes), "reps": config.reps, "warmup": config.warmup,
               "timeout_s": config.timeout_s, "contention": config.contention,
               "collectives": config.collectives, "within": list(within), "out": str(out)}
        progress(f"commbench: {config.nnodes} nodes x {per_node} rank(s), backend {backend}, "
                 f"{len(groups)} groups; waiting for every node at {config.rdzv_endpoint} "
                 f"(at most {config.timeout_s:.0f} s)")
        cmd = torchrun_command(config, per_node=per_node, job_json=json.dumps(job))
        # join + every group's collectives, each bounded by the process group's timeout
        deadline = config.timeout_s * (2 + len(groups)) + 60.0
        rc = _run_relaying(cmd, dict(os.environ, OMP_NUM_THREADS="1"), deadline, progress)
        if rc != 0 or not out.is_file():
            raise RuntimeError(
                f"commbench across nodes: torchrun exited with status {rc} (its output above "
                f"says why); every node must run the same command with --nnodes "
                f"{config.nnodes} --rdzv-endpoint {config.rdzv_endpoint} within "
                f"{config.timeout_s:.0f} s")
        from kfacperf.bench.raw import load_raw

        return load_raw(out)


def _default_per_node(backend: str) -> int:
    if backend != "nccl":
        return 1
    import torch

    return max(1, torch.cuda.device_count())


def _run_relaying(cmd: list[str], env: dict[str, str], deadline_s: float,
                  progress: Callable[[str], None]) -> int:
    """Run ``cmd``, passing each line it prints to ``progress``; stop it after ``deadline_s``."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    stream = proc.stdout
    assert stream is not None  # asked for a pipe

    def relay() -> None:
        for line in stream:
            progress(line.rstrip("\n"))

    reader = threading.Thread(target=relay, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=deadline_s)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise RuntimeError(f"commbench across nodes: no result after {deadline_s:.0f} s; "
                           "stopped") from None
    finally:
        reader.join(timeout=5)
    return rc


# --------------------------------------------------------------------------- rank side
def main(argv: Sequence[str] | None = None) -> int:
    """One rank of the job (started by torchrun with the job's JSON as its argument)."""
    job = json.loads((sys.argv[1:] if argv is None else argv)[0])
    try:
        _measure(job)
    except BufferTooLarge as exc:  # bad input: one line, no traceback
        print(f"commbench rank {os.environ.get('RANK')} failed: {exc}", file=sys.stderr,
              flush=True)
        return 1
    except BaseException:
        print(f"commbench rank {os.environ.get('RANK')} failed:\n{traceback.format_exc()}",
              file=sys.stderr, flush=True)
        return 1
    return 0


def _measure(job: dict[str, Any]) -> None:
    import datetime

    import torch
    import torch.distributed as dist

    from kfacperf.bench.timing import time_points
    from kfacperf.runtime.heap import keep_heap

    keep_heap()  # as in profiled runs: buffers freed and taken again stay resident
    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    per_node, local_rank = int(os.environ["LOCAL_WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    backend = job["backend"]
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=job["timeout_s"]))
    sync = torch.cuda.synchronize if backend == "nccl" else (lambda: None)
    groups = plan_groups(world // per_node, per_node, job["within"])
    # every rank creates every group, in one order; the whole job is the default group
    handles = [dist.new_group(list(g.ranks)) if g.size < world else None for g in groups]
    node0 = dist.new_group(list(range(per_node))) if per_node < world else None
    probe: dict[str, float] = {}
    if job["contention"] and backend == "gloo" and per_node >= 2:
        from kfacperf.bench.probe import measure_slowdowns

        if rank < per_node:
            probe = measure_slowdowns(rank, device, group=node0)
        holder = [probe]
        dist.broadcast_object_list(holder, src=0)
        probe = holder[0]
    points = ([(op, nbytes) for op in job["ops"] for nbytes in job["sizes"]]
              if job["collectives"] else [])
    measured: list[Point] = []
    started = time.perf_counter()
    for g, handle in zip(groups, handles):
        def on_rep(rep: int, g: Group = g) -> None:
            if rank == 0:
                print(f"  {g.size} rank(s) on {g.nodes} node(s): repetition {rep}/{job['reps']} "
                      f"of every point done ({time.perf_counter() - started:.0f} s)", flush=True)

        times = time_points(points, ranks=g.ranks, rank=rank, group=handle, device=device,
                            sync=sync, timing=job["timing"], reps=job["reps"],
                            warmup=job["warmup"], on_rep=on_rep)
        slowest = torch.tensor(times, dtype=torch.float64).reshape(len(points), job["reps"])
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)  # non-members add 0
        for (op, nbytes), reps in zip(points, slowest.tolist()):
            measured.append(Point(op=op, world_size=g.size, nbytes=sent_bytes(nbytes, g.size),
                                  time_us=statistics.fmean(reps), reps=job["reps"],
                                  timing=job["timing"], nodes=g.nodes))
    if local_rank == 0:
        result = CommbenchResult(backend=backend, points=tuple(measured),
                                 cores=(os.cpu_count() or 1) if backend == "gloo" else 0,
                                 **probe_tables(per_node, probe))
        out = Path(job["out"])
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result.to_dict(), indent=1) + "\n")
        tmp.replace(out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":  # pragma: no cover
    code = main()
    # Leave without the interpreter's teardown, as profiled ranks do: gloo's threads can abort
    # a finalizing process ("terminate called without an active exception"), which torchrun
    # would report as a failed run, and the result is written by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
