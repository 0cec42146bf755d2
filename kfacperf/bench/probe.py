"""How much ranks sharing a node's CPU cores slow each other down, per compute stage kind.

Ranks slow each other through shared caches and memory bandwidth, so the slowdown depends on
the work: a cache-resident matrix product barely notices a neighbour, a memory-bound factor
statistic a lot.  One representative call per stage kind of
:data:`kfacperf.sim.models.device.STAGE_KINDS`:

* ``forward``: a whole ResNet-20 forward pass at batch :data:`NET_BATCH` (building its
  autograd graph, as in training);
* ``backward``: that network's backward pass (input and weight gradients).  A whole network,
  not one layer: its activations (tens of MiB) do not fit in the caches the ranks share, and
  a single cache-resident convolution measured half the slowdown that two-rank training
  showed (1.06 against 1.11 for forward plus backward, in the same minute);
* ``factor_compute``: the optimizer's own A statistic of a ResNet-20 convolution (32 channels
  at 16x16, batch 32)
  (:func:`kfacperf.kfac.conv_factors.patch_moments`) plus the Gram of its output gradients;
* ``inverse``: float64 ``eigh`` of a 300x300 SPD matrix;
* ``precondition``: the two GEMMs ``G^-1 grad A^-1`` of that convolution (32x32, 32x288, 288x288);
* ``update``: an add streaming 16 MiB.

Rank 0 alone (solo) and all ranks at once (joint) alternate for several rounds, per kind,
because on a virtual machine the slowdown changes from second to second; a kind's slowdown
is the ratio of the mean joint time (slowest rank) to the mean solo time.  ``"all"`` is the
same ratio over the sum of every kind's time: the single number for a model without per-stage
contention.

``"straggler"``: ranks sharing cores are also uneven, and a synchronous step waits for the
slowest of them every time.  All ranks run :data:`STEP_ROUNDS` training-like steps (forward
and backward of the ResNet-20), each after a barrier; the straggler is the mean over steps of
(slowest rank's time - mean rank's time), over the mean time.  Measured on 2 vCPUs: 1.7-3.4%,
when a two-rank SGD step waited 2.5-3 ms of ~75 ms for its peer in the same minute.

``"comm_after_compute"``: a collective that training issues right after its compute runs
slower than the same collective issued right after a barrier, as commbench times it: gloo's
stalls of milliseconds come more often.  On 2 vCPUs the 42 probes of one session gave
0.74-1.41x, 1.09x on average; the mean over a session is what the model keeps.  For
:data:`COMM_ROUNDS` rounds every rank
issues each of those collectives (:data:`COMM_BYTES`) once after a barrier and once after a
forward and backward pass of the ResNet-20; a call costs from the last rank's issue to the
last rank's completion (``perf_counter`` is one clock for the processes of a host), as in
``kfacperf validate``; the value is the mean cost after compute over the mean after a barrier.

API::

    stage_workloads(device) -> dict[kind, Callable[[], None]]
    measure_slowdowns(rank, device, group=None)
        -> dict[kind | "all" | "straggler" | "comm_after_compute", float]
           (``rank`` within ``group``, the ranks sharing a node; NaN on ranks other than 0)
    straggler_of(per_rank_step_times) -> float
    call_costs(per_rank_issue_and_done) -> list[float]
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from kfacperf import vocab as S
from kfacperf.bench.results import ALL, COMM_AFTER_COMPUTE, STRAGGLER
from kfacperf.sim.models.device import STAGE_KINDS

ROUNDS = 8
PHASE_S = 0.03
"""Solo and joint phases of every kind alternate this many times, each about this long."""

NET_BATCH = 16
"""Batch of the ResNet-20 whose forward and backward passes stand for those stage kinds."""

STEP_ROUNDS = 30
"""Synchronised training-like steps that measure the straggler."""

COMM_ROUNDS = 12
COMM_BYTES = 1 << 20
"""Rounds and size of the collectives timed after a barrier and after compute."""


def stage_workloads(device: Any) -> dict[str, Callable[[], None]]:
    """One representative call per compute stage kind (see the module docstring)."""
    import torch

    from kfacperf.kfac import conv_factors
    from kfacperf.workloads import get_workload

    gen = torch.Generator().manual_seed(0)

    def randn(*shape: int, dtype: Any = torch.float32) -> Any:
        return torch.randn(*shape, generator=gen, dtype=dtype).to(device)

    net_workload = get_workload("resnet20")
    net = net_workload.build_model(seed=0).to(device)
    net_x, net_y = net_workload.make_batch(NET_BATCH, seed=0, step=0, device=device)
    net_params = [p for p in net.parameters() if p.requires_grad]
    net_loss = net_workload.loss_fn(net(net_x), net_y)
    conv = torch.nn.Conv2d(32, 32, 3, padding=1, bias=False).to(device)
    x = randn(32, 32, 16, 16)
    gy = randn(32, 32, 16, 16)
    m = randn(300, 300, dtype=torch.float64)
    spd = m @ m.t() + 300 * torch.eye(300, dtype=torch.float64, device=device)
    g_inv, grad, a_inv = randn(32, 32), randn(32, 288), randn(288, 288)
    src = randn(4 * 1024 * 1024)
    dst = torch.empty_like(src)

    def forward() -> None:
        net_workload.loss_fn(net(net_x), net_y)

    def backward() -> None:
        torch.autograd.grad(net_loss, net_params, retain_graph=True)

    def factor_compute() -> None:
        with torch.no_grad():
            conv_factors.patch_moments(x, conv)
            rows = gy.transpose(0, 1).reshape(gy.shape[1], -1)
            rows @ rows.t()

    def inverse() -> None:
        torch.linalg.eigh(spd)

    def precondition() -> None:
        g_inv.mm(grad).mm(a_inv)

    def update() -> None:
        torch.add(src, 1.0, out=dst)

    work = {S.FORWARD: forward, S.BACKWARD: backward, S.FACTOR_COMPUTE: factor_compute,
            S.INVERSE: inverse, S.PRECONDITION: precondition, S.UPDATE: update}
    assert tuple(work) == STAGE_KINDS
    return work


def measure_slowdowns(rank: int, device: Any, group: Any = None) -> dict[str, float]:
    """Per stage kind (and ``"all"``): mean joint time over mean solo time, on rank 0 of
    ``group`` (None: the whole job), whose ranks share a node."""
    import torch
    import torch.distributed as dist

    work = stage_workloads(device)
    counts = []
    for fn in work.values():
        fn()
        t0 = time.perf_counter()
        fn()
        counts.append(max(1, round(PHASE_S / max(time.perf_counter() - t0, 1e-7))))
    calls = torch.tensor(counts)
    dist.all_reduce(calls, op=dist.ReduceOp.MAX, group=group)  # the same number of calls
    n = [int(c) for c in calls.tolist()]

    def phase(fn: Callable[[], None], reps: int) -> float:
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t) / reps

    solo: dict[str, list[float]] = {k: [] for k in work}
    joint: dict[str, list[float]] = {k: [] for k in work}
    for _ in range(ROUNDS):
        for (kind, fn), reps in zip(work.items(), n):
            dist.barrier(group=group)
            if rank == 0:
                solo[kind].append(phase(fn, reps))
            dist.barrier(group=group)
            joint[kind].append(phase(fn, reps))
    mine = torch.tensor([statistics.mean(joint[k]) for k in work], dtype=torch.float64)
    dist.all_reduce(mine, op=dist.ReduceOp.MAX, group=group)  # the slowest rank's joint time
    straggler = _straggler(work[S.FORWARD], work[S.BACKWARD], group)
    comm = _comm_after_compute(device, work[S.FORWARD], work[S.BACKWARD], group)
    if rank != 0:
        return {k: float("nan") for k in (*work, ALL, STRAGGLER, COMM_AFTER_COMPUTE)}
    solo_mean = [statistics.mean(solo[k]) for k in work]
    out = {k: float(j) / s for k, j, s in zip(work, mine.tolist(), solo_mean)}
    out[ALL] = float(mine.sum()) / sum(solo_mean)
    out[STRAGGLER] = straggler
    out[COMM_AFTER_COMPUTE] = comm
    return out


def _straggler(forward: Callable[[], None], backward: Callable[[], None], group: Any) -> float:
    """Mean (slowest - mean) / mean over :data:`STEP_ROUNDS` synchronised steps, all ranks."""
    import torch
    import torch.distributed as dist

    times = []
    for _ in range(STEP_ROUNDS):
        dist.barrier(group=group)
        t0 = time.perf_counter()
        forward()
        backward()
        times.append(time.perf_counter() - t0)
    mine = torch.tensor(times, dtype=torch.float64)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    return straggler_of([t.tolist() for t in every])


def _comm_after_compute(device: Any, forward: Callable[[], None],
                        backward: Callable[[], None], group: Any) -> float:
    """Mean collective cost right after compute over right after a barrier (all ranks)."""
    import torch
    import torch.distributed as dist

    world = dist.get_world_size(group)
    n = max(1, COMM_BYTES // 4 // world)
    buf = torch.ones(n * world, device=device)
    blocks = [torch.ones(n, device=device) for _ in range(world)]
    out = torch.empty(n, device=device)
    gathered = [torch.empty(n, device=device) for _ in range(world)]
    calls: list[Callable[[], object]] = [
        lambda: dist.all_reduce(buf, group=group),
        lambda: dist.reduce_scatter(out, blocks, group=group),
        lambda: dist.all_gather(gathered, out, group=group)]
    stamps: dict[bool, list[float]] = {False: [], True: []}  # after compute? -> issue, done
    for _ in range(COMM_ROUNDS):
        for call in calls:
            for after_compute in (False, True):
                dist.barrier(group=group)
                if after_compute:
                    forward()
                    backward()
                t0 = time.perf_counter()
                call()
                stamps[after_compute] += [t0, time.perf_counter()]
    mine = torch.tensor(stamps[False] + stamps[True], dtype=torch.float64)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    half = len(stamps[False])
    costs = [call_costs([t[:half].tolist() for t in every]),
             call_costs([t[half:].tolist() for t in every])]
    return statistics.mean(costs[1]) / statistics.mean(costs[0])


def call_costs(per_rank: Sequence[Sequence[float]]) -> list[float]:
    """Each call's cost from the last rank's issue to the last rank's completion.

    ``per_rank[r]``: rank ``r``'s ``issue, done, issue, done, ...`` of the same calls."""
    if not per_rank or len({len(r) for r in per_rank}) != 1 or len(per_rank[0]) % 2:
        raise ValueError("every rank needs an issue and a completion time of every call")
    issues = [max(r[i] for r in per_rank) for i in range(0, len(per_rank[0]), 2)]
    dones = [max(r[i] for r in per_rank) for i in range(1, len(per_rank[0]), 2)]
    return [max(0.0, d - i) for i, d in zip(issues, dones)]


def straggler_of(per_rank: Sequence[Sequence[float]]) -> float:
    """Mean over steps of (slowest rank - mean rank), over the mean step time.

    ``per_rank[r][k]``: rank ``r``'s time of step ``k``."""
    steps: list[tuple[float, ...]] = list(zip(*per_rank))
    if not steps:
        raise ValueError("no steps to measure a straggler from")
    excess = [max(s) - statistics.mean(s) for s in steps]
    return statistics.mean(excess) / statistics.mean(statistics.mean(s) for s in steps)
