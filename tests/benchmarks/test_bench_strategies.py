"""Step time per distribution strategy at P = 2 gloo ranks on CPU, CIFAR ResNet-20.

Run: .venv/bin/pytest tests/benchmarks/test_bench_strategies.py --benchmark-enable -s

One launch of 2 ranks (1 thread each), batch 64 per rank (global 128).  Every strategy has
its own trainer (same seed) and the trainers are stepped round-robin — one step of each in
turn — so machine noise hits all of them alike.  Each measured step is preceded by a barrier
and its time is the slowest rank's.  Two settings:

* ``1/1``: factors and inverses every step (every K-FAC stage runs every step);
* ``10/100``: steps 1-20 after a warm-up step 0 give the plain step (median of the 18 steps
  without statistics) and the factor step (mean of steps 10 and 20); the amortised step over
  a full 100-step cycle is estimated as ``0.90 plain + 0.09 factor + 0.01 inverse`` with the
  inverse step taken as the 1/1 step (it does everything a 1/1 step does).

Reported: median step time per strategy and the ratio to SGD (DDP) measured in the same run.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist

from helpers.distributed import run_distributed
from kfacperf.runtime.training import TrainConfig, Trainer
from kfacperf.workloads import get_workload, rank_slice

WORLD = 2
BATCH_PER_RANK = 64
WARMUP = 2
STEPS_EVERY = 8
KFAC = TrainConfig(optimizer="kfac", lr=0.1, damping=1e-3)
STRATEGIES: dict[str, TrainConfig] = {
    "sgd": replace(KFAC, optimizer="sgd", strategy="sgd"),
    "spngd": replace(KFAC, strategy="spngd"),
    "kaisa f=1": replace(KFAC, strategy="kaisa", grad_worker_fraction=1.0),
    "kaisa f=1/P": replace(KFAC, strategy="kaisa", grad_worker_fraction=1.0 / WORLD),
}


def _slowest(seconds: float) -> float:
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _round_robin(rank: int, world: int, intervals: tuple[int, int], steps: int
                 ) -> dict[str, list[float]]:
    w = get_workload("resnet20")
    trainers = {
        name: Trainer(w.build_model(seed=0), loss_fn=w.loss_fn,
                      config=replace(cfg, factor_interval=intervals[0],
                                     inverse_interval=intervals[1]))
        for name, cfg in STRATEGIES.items()
    }
    times: dict[str, list[float]] = {name: [] for name in trainers}
    for step in range(steps):
        x, y = w.make_batch(BATCH_PER_RANK * world, seed=0, step=step)
        x, y = rank_slice(x, rank, world), rank_slice(y, rank, world)
        for name, trainer in trainers.items():
            dist.barrier()
            t0 = time.perf_counter()
            trainer.train_step(x, y)
            times[name].append(_slowest(time.perf_counter() - t0))
    return times


def _measure(rank: int, world: int) -> dict[str, Any]:
    every = _round_robin(rank, world, (1, 1), WARMUP + STEPS_EVERY)
    stale = _round_robin(rank, world, (10, 100), 21)
    out: dict[str, Any] = {}
    for name in STRATEGIES:
        e = every[name][WARMUP:]
        s = stale[name]
        plain = statistics.median(t for i, t in enumerate(s) if i % 10 != 0)
        factor = statistics.mean((s[10], s[20]))
        step_11 = statistics.median(e)
        out[name] = {
            "every_step_ms": 1e3 * step_11,
            "stale_plain_ms": 1e3 * plain,
            "stale_factor_ms": 1e3 * factor,
            "stale_amortised_ms": 1e3 * (0.90 * plain + 0.09 * factor + 0.01 * step_11),
        }
    return out


def test_strategy_step_times(benchmark):
    results = benchmark.pedantic(
        lambda: run_distributed(_measure, WORLD, timeout_s=1800, dist_timeout_s=600),
        rounds=1, iterations=1,
    )
    table = results[0]  # every rank computed the same slowest-rank times
    sgd = table["sgd"]
    lines = [f"\nResNet-20, P={WORLD} gloo ranks x 1 thread, batch {BATCH_PER_RANK}/rank "
             "(median step ms; x = ratio to SGD in this run)",
             f"{'strategy':<13}{'1/1':>16}{'10/100 plain':>20}{'10/100 factor':>20}"
             f"{'10/100 amortised':>22}"]
    for name, row in table.items():
        cells = []
        for key in ("every_step_ms", "stale_plain_ms", "stale_factor_ms",
                    "stale_amortised_ms"):
            ref = sgd["every_step_ms"] if key == "every_step_ms" else sgd["stale_plain_ms"]
            cells.append(f"{row[key]:9.1f} ({row[key] / ref:4.2f}x)")
        lines.append(f"{name:<13}{cells[0]:>16}{cells[1]:>20}{cells[2]:>20}{cells[3]:>22}")
        benchmark.extra_info[name] = row
    print("\n".join(lines))
    for name, row in table.items():
        assert row["every_step_ms"] > 0 and row["stale_amortised_ms"] > 0, name
