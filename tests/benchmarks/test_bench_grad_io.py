"""K-FAC's gradient I/O, one layer at a time against all layers at once, side by side.

Run: .venv/bin/pytest tests/benchmarks/test_bench_grad_io.py --benchmark-enable -s

ResNet-50's 54 K-FAC layers on the CPU, gradients and preconditioned matrices of their real
shapes: :meth:`KFACLayer.load_grad` / :meth:`KFACLayer.write_grad` per layer against
:func:`~kfacperf.kfac.grad_io.load_grads` / :func:`~kfacperf.kfac.grad_io.write_grads`,
interleaved round by round so machine noise hits both alike.  On a CPU the work is the
bytes, so the target is only that batching costs nothing there (median ratio <= 1.1); what
it saves is launches, on a GPU (the ground-truth traces' host-work share shows it).
"""
from __future__ import annotations

import statistics
import time

import torch

from kfacperf.kfac.grad_io import load_grads, write_grads
from kfacperf.kfac.preconditioner import KFACPreconditioner
from kfacperf.workloads import get_workload

ROUNDS = 15


def _layers():
    torch.set_num_threads(1)
    model = get_workload("resnet50").build_model(seed=0)
    layers = list(KFACPreconditioner(model, damping=1e-3, lr=0.1).layers.values())
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    for layer in layers:
        layer.load_grad()
        layer.precond_grad = torch.randn_like(layer.grad)
    return layers


def _ratios(layers) -> dict[str, float]:
    scale = torch.tensor(0.5)

    def one_by_one_load():
        for layer in layers:
            layer.load_grad()

    def one_by_one_write():
        for layer in layers:
            layer.write_grad(layer.precond_grad, scale)

    pairs = {"load": (one_by_one_load, lambda: load_grads(layers)),
             "write": (one_by_one_write, lambda: write_grads(layers, scale))}
    out = {}
    for name, (single, batched) in pairs.items():
        ratios = []
        for i in range(ROUNDS):
            times = {}
            for which, f in ((0, single), (1, batched))[:: 1 if i % 2 else -1]:
                t0 = time.perf_counter()
                f()
                times[which] = time.perf_counter() - t0
            ratios.append(times[1] / times[0])
        out[name] = statistics.median(ratios[2:])  # the first rounds warm the allocator
    return out


def test_batched_gradient_io_costs_nothing_on_a_cpu(benchmark):
    layers = _layers()
    ratios = benchmark.pedantic(_ratios, args=(layers,), rounds=1, iterations=1)
    print(f"ResNet-50, 54 layers, batched / one by one: load {ratios['load']:.3f}x, "
          f"write {ratios['write']:.3f}x")
    assert ratios["load"] <= 1.1 and ratios["write"] <= 1.1
