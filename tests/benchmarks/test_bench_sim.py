"""Simulator speed: ResNet-50 (54 K-FAC layers) on the DGX-H100 preset.

Run: .venv/bin/pytest tests/benchmarks/test_bench_sim.py --benchmark-enable --benchmark-only -s

* ``test_sweep``: ``simulate()`` for sgd + spngd + kaisa at 1, 2, 4, ..., 4096 GPUs (13 points)
  with factor/inverse intervals 10/100 (three kinds of step per K-FAC point), event table
  included.  Target: <= 3 s.
* ``test_one_step_4096``: one spngd step (an inverse step: the most work) at 4,096 GPUs,
  summary and events included.  Target: <= 0.25 s.
* ``test_65536``: all three strategies at 65,536 GPUs run, with one class per layer owner plus
  one for the rest.

Models are loaded before timing; the targets are checked on the fastest round (the machine is
shared, so slower rounds measure the neighbours).
"""
from __future__ import annotations

import pytest

from kfacperf.sim.models import load_cluster, load_device, load_workload
from kfacperf.sim.sweep import simulate

GPUS = [2**i for i in range(13)]


@pytest.fixture(scope="module")
def models():
    return load_workload("resnet50"), load_device("h100"), load_cluster("dgx-h100-ndr")


def test_sweep(benchmark, models):
    w, d, c = models
    assert len(w.layers) == 54

    def sweep():
        return simulate(w, d, c, ["sgd", "spngd", "kaisa"], gpus=GPUS, batch_per_gpu=32,
                        factor_interval=10, inverse_interval=100)

    pred = benchmark.pedantic(sweep, rounds=5, iterations=1, warmup_rounds=1)
    assert len(pred.summary) == 39
    print(f"\nsweep: min {benchmark.stats['min']:.3f} s, median "
          f"{benchmark.stats['median']:.3f} s, {len(pred.events)} event rows")
    assert benchmark.stats["min"] <= 3.0


def test_one_step_4096(benchmark, models):
    w, d, c = models

    def one_step():
        return simulate(w, d, c, ["spngd"], gpus=[4096], batch_per_gpu=32)

    pred = benchmark.pedantic(one_step, rounds=10, iterations=1, warmup_rounds=1)
    assert int(pred.summary["classes"].iloc[0]) == 55
    print(f"\n4096-GPU spngd step: min {benchmark.stats['min'] * 1e3:.1f} ms, median "
          f"{benchmark.stats['median'] * 1e3:.1f} ms")
    assert benchmark.stats["min"] <= 0.25


def test_65536(benchmark, models):
    w, d, c = models

    def huge():
        return simulate(w, d, c, ["sgd", "spngd", "kaisa"], gpus=[65536], batch_per_gpu=32,
                        factor_interval=10, inverse_interval=100)

    pred = benchmark.pedantic(huge, rounds=1, iterations=1)
    s = pred.summary.set_index("strategy")
    assert list(s["classes"]) == [1, 55, 55]
    assert (s["step_us"] > 0).all()
    print(f"\n65,536 GPUs, 3 strategies: {benchmark.stats['min']:.3f} s")
