"""Step time of K-FAC over SGD: CIFAR ResNet-20, batch 128, one process.

Run: ``.venv/bin/pytest tests/benchmarks/test_bench_kfac.py --benchmark-only -s``
(``KFACPERF_BENCH_THREADS=n`` sets torch's intra-op threads; default: torch's default).

The three trainers (SGD; K-FAC at factor/inverse intervals 1/1 and 10/100) are measured side
by side, interleaved round by round (in rotating order), so load from other processes on a
shared machine hits all of them alike.  A round is one factor interval of the 10/100 trainer
(10 steps) and 10 of them span one inverse interval, so its mean step time amortises the
factor and inverse steps exactly.  Ratios are of mean step times.  Target: ≤ 1.25x at 10/100.
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from kfacperf.kfac import KFACPreconditioner
from kfacperf.workloads import get_workload

BATCH = 128
ROUNDS = 10  # x 10 steps = one inverse interval of the 10/100 trainer
TARGET_10_100 = 1.25


class _Trainer:
    """One model + SGD (+ K-FAC) cycling through a few fixed batches."""

    def __init__(self, *, intervals: tuple[int, int] | None, steps_per_round: int) -> None:
        workload = get_workload("resnet20")
        self.model = workload.build_model(seed=0)
        self.loss_fn = workload.loss_fn
        self.batches = [workload.make_batch(BATCH, seed=0, step=k) for k in range(4)]
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9,
                                   weight_decay=5e-4)
        self.precond = None
        if intervals is not None:
            self.precond = KFACPreconditioner(
                self.model, damping=1e-3, lr=0.05, factor_interval=intervals[0],
                inverse_interval=intervals[1],
            )
        self.steps_per_round = steps_per_round
        self.step_count = 0
        self.step_times: list[float] = []

    def run(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            x, y = self.batches[self.step_count % len(self.batches)]
            self.opt.zero_grad(set_to_none=True)
            self.loss_fn(self.model(x), y).backward()
            if self.precond is not None:
                self.precond.step()
            self.opt.step()
            self.step_count += 1
        return time.perf_counter() - start

    def round(self) -> None:
        self.step_times.append(self.run(self.steps_per_round) / self.steps_per_round)

    @property
    def mean_ms(self) -> float:
        return 1e3 * sum(self.step_times) / len(self.step_times)


@pytest.fixture
def threads() -> Iterator[int]:
    before = torch.get_num_threads()
    wanted = os.environ.get("KFACPERF_BENCH_THREADS")
    if wanted:
        torch.set_num_threads(int(wanted))
    yield torch.get_num_threads()
    torch.set_num_threads(before)


def test_kfac_step_time_over_sgd_resnet20(benchmark: Any, threads: int) -> None:
    trainers = {
        "sgd": _Trainer(intervals=None, steps_per_round=10),
        "kfac 1/1": _Trainer(intervals=(1, 1), steps_per_round=2),
        "kfac 10/100": _Trainer(intervals=(10, 100), steps_per_round=10),
    }
    # warm-up: allocator and kernels; the 10/100 trainer starts its measured rounds at
    # step 10, so its 10 rounds include exactly one inverse step (step 100)
    trainers["sgd"].run(3)
    trainers["kfac 1/1"].run(2)
    trainers["kfac 10/100"].run(10)
    order = list(trainers)

    def one_round() -> None:
        for name in order:
            trainers[name].round()
        order.append(order.pop(0))

    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    sgd = trainers["sgd"].mean_ms
    ratios = {name: t.mean_ms / sgd for name, t in trainers.items() if name != "sgd"}
    benchmark.extra_info.update({f"{name} step ms": round(t.mean_ms, 2)
                                 for name, t in trainers.items()})
    benchmark.extra_info.update({f"{name} / sgd": round(r, 3) for name, r in ratios.items()})
    benchmark.extra_info["threads"] = threads
    print(f"\nResNet-20 batch {BATCH}, {threads} threads: "
          + ", ".join(f"{n} {t.mean_ms:.1f} ms/step" for n, t in trainers.items())
          + "; " + ", ".join(f"{n}/sgd = {r:.3f}x" for n, r in ratios.items()))
    assert ratios["kfac 10/100"] <= TARGET_10_100, (
        f"K-FAC 10/100 step time is {ratios['kfac 10/100']:.3f}x SGD's "
        f"(target {TARGET_10_100}x)"
    )
