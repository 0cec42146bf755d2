"""kfacperf.instrument's overhead: a user-written K-FAC loop, plain vs instrumented.

Run: .venv/bin/pytest tests/benchmarks/test_bench_loop.py --benchmark-enable -s

``test_loop_overhead``: the same training loop of CIFAR ResNet-20 (batch 32, one thread,
K-FAC on one process, factors and inverses every step) written twice in one process: once
plainly (the user's SGD behind a :class:`KFACPreconditioner` with no timer) and once inside
``kfacperf.instrument`` (the real stage timer, NVTX, rows appended and flushed to the trace's
parts every step, the forward hook and the step context), on models with the same seed and
the same data, stepped alternately so machine noise hits both alike.  The A/B overhead is
the median of the per-pair ratios minus 1, in wall and in thread CPU time; on a shared
machine both swing by a few percent with other processes' load, so, as in
``test_bench_profiler.py``, the instrumentation's own cost is also measured directly and
asserted: the recorded stage calls of one step replayed with empty bodies into a fresh
timer (``step_end`` included), plus what the loop API adds around them (its step context,
the forward hook, ``backward``/``update`` wrappers), measured on a model whose forward,
backward and update cost next to nothing (instrumented minus plain).  Target: <= 1% of the
step; the A/B CPU estimate is only checked against gross regressions (5%).
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import kfacperf
from kfacperf.bench.overhead import replay_cost_us, stage_calls
from kfacperf.kfac.preconditioner import KFACPreconditioner
from kfacperf.trace.parts import read_event_parts
from kfacperf.workloads import get_workload

BATCH = 32
PAIRS = 20
WARMUP_PAIRS = 2
SETTINGS = {"damping": 1e-3, "factor_interval": 1, "inverse_interval": 1}


def _plain_step(model, opt, precond, x, y) -> None:
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    precond.step()
    opt.step()


def _instrumented_step(run, opt, x, y) -> None:
    with run.step():
        loss = F.cross_entropy(run.model(x), y)
        opt.zero_grad()
        run.backward(loss)
        run.update()


def _overhead(tmp_path) -> dict:
    torch.set_num_threads(1)
    w = get_workload("resnet20")
    plain = w.build_model(seed=0)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    precond = KFACPreconditioner(plain, lr=0.1, **SETTINGS)
    traced = w.build_model(seed=0)
    traced_opt = torch.optim.SGD(traced.parameters(), lr=0.1, momentum=0.9)
    run = kfacperf.instrument(traced, traced_opt, out=tmp_path / "trace", strategy="local",
                              warmup=WARMUP_PAIRS, **SETTINGS)
    ratios, cpu_ratios, t_off, t_on = [], [], [], []
    for i in range(WARMUP_PAIRS + PAIRS):
        x, y = w.make_batch(BATCH, seed=0, step=i)
        times, cpu = {}, {}
        for on in ((False, True) if i % 2 == 0 else (True, False)):  # alternate who goes first
            c0, t0 = time.thread_time(), time.perf_counter()
            if on:
                _instrumented_step(run, traced_opt, x, y)
            else:
                _plain_step(plain, plain_opt, precond, x, y)
            times[on] = time.perf_counter() - t0
            cpu[on] = time.thread_time() - c0
        if i >= WARMUP_PAIRS:
            ratios.append(times[True] / times[False])
            cpu_ratios.append(cpu[True] / cpu[False])
            t_on.append(times[True])
            t_off.append(times[False])
    parts = tmp_path / "trace" / "parts"
    events = read_event_parts(parts)
    calls, rows = stage_calls(events, WARMUP_PAIRS), len(events)
    run.close()
    timer_us = replay_cost_us(calls, cuda=False, scratch=tmp_path / "replay", repeats=300)
    loop_us = _loop_wrapper_cost_us(tmp_path / "wrapper")
    step_us = 1e6 * statistics.median(t_off)
    return {
        "timer_replay_us_per_step": timer_us,
        "loop_wrapper_us_per_step": loop_us,
        "direct_overhead": (timer_us + loop_us) / step_us,
        "overhead_median": statistics.median(ratios) - 1,
        "cpu_overhead_median": statistics.median(cpu_ratios) - 1,
        "step_ms_off": 1e3 * statistics.median(t_off),
        "step_ms_on": 1e3 * statistics.median(t_on),
        "rows_per_step": rows / (WARMUP_PAIRS + PAIRS),
        "pairs": PAIRS,
    }


class _Scalar(nn.Module):
    """One Linear(1, 1) on one example: forward, backward and update cost next to nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def _loop_wrapper_cost_us(folder, *, repeats: int = 2000) -> float:
    """What the loop API adds per step beyond the stage calls it records: the same trivial
    step, instrumented (strategy sgd: its stages are the step's four) minus plain, minus the
    timer's own cost of those four stage calls."""
    x, y = torch.ones(1, 1), torch.ones(1, 1)
    plain, traced = _Scalar(), _Scalar()
    opt_p = torch.optim.SGD(plain.parameters(), lr=0.0)
    opt_t = torch.optim.SGD(traced.parameters(), lr=0.0)
    run = kfacperf.instrument(traced, opt_t, out=folder / "trace", strategy="sgd")
    on, off = [], []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        loss = F.mse_loss(plain(x), y)
        opt_p.zero_grad()
        loss.backward()
        opt_p.step()
        t1 = time.perf_counter_ns()
        with run.step():
            loss = F.mse_loss(run.model(x), y)
            opt_t.zero_grad()
            run.backward(loss)
            run.update()
        t2 = time.perf_counter_ns()
        off.append((t1 - t0) / 1e3)
        on.append((t2 - t1) / 1e3)
    run.close()
    calls = [("forward", "", 0.0), ("backward", "", 0.0), ("update", "", 0.0)]
    timer = replay_cost_us(calls, cuda=False, scratch=folder / "replay", repeats=300)
    return max(0.0, statistics.median(on) - statistics.median(off) - timer)


def test_loop_overhead(benchmark, tmp_path):
    result = benchmark.pedantic(_overhead, args=(tmp_path,), rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    print(
        f"\nResNet-20 K-FAC (local, 1/1) in a user's loop, batch {BATCH}, 1 thread: step "
        f"{result['step_ms_off']:.1f} ms plain, {result['step_ms_on']:.1f} ms instrumented; "
        f"A/B {100 * result['overhead_median']:+.2f}% wall, "
        f"{100 * result['cpu_overhead_median']:+.2f}% thread CPU (median of {PAIRS} pairs); "
        f"{result['rows_per_step']:.0f} rows/step; measured directly: stage timer "
        f"{result['timer_replay_us_per_step']:.0f} us + loop API "
        f"{result['loop_wrapper_us_per_step']:.0f} us per step = "
        f"{100 * result['direct_overhead']:.3f}% of the step"
    )
    assert result["direct_overhead"] <= 0.01
    assert result["cpu_overhead_median"] <= 0.05
