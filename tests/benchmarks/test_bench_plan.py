"""Plan speed: ResNet-50 on the DGX-H100 preset, 11 GPU counts from 4 to 4,096.

Run: .venv/bin/pytest tests/benchmarks/test_bench_plan.py --benchmark-enable --benchmark-only -s

The default grid (sgd; spngd and kaisa with every grad-worker fraction; eight interval pairs
plus the convergence model's own; fp32/fp16/bf16 factors; packed or not; batch 32 per GPU)
is over 5,000 configurations.  Target: the whole plan in <= 10 s, checked on the fastest
round (the machine is shared, so slower rounds measure the neighbours).
"""
from __future__ import annotations

import pytest

from kfacperf.plan import plan
from kfacperf.sim.models import load_cluster, load_device, load_workload

GPUS = [2**i for i in range(2, 13)]


@pytest.fixture(scope="module")
def models():
    return load_workload("resnet50"), load_device("h100"), load_cluster("dgx-h100-ndr")


def test_plan_11_gpu_counts(benchmark, models):
    w, d, c = models

    def run():
        return plan(w, d, c, gpus=GPUS,
                    convergence=["mlperf-v0.7-lars-resnet50", "spngd-resnet50"])

    result = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=0)
    s = result.stats
    assert s["configurations"] >= 1000
    assert len(result.choices) == 2 * len(GPUS)
    print(f"\nplan: {s['configurations']:,} configurations at {len(GPUS)} GPU counts, "
          f"{s['simulated_steps']} steps simulated, {s['bounded']:,} bounded out; min "
          f"{benchmark.stats['min']:.2f} s, median {benchmark.stats['median']:.2f} s")
    assert benchmark.stats["min"] <= 10.0
