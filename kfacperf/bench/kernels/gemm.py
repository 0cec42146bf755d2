"""GEMM rates: square matmuls in each precision (``fp32`` with TF32 off, ``tf32``, ``bf16``),
the device's effective peaks."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from kfacperf.bench.kernels.plan import FULL_PLAN, Budget, KernelPlan
from kfacperf.bench.kernels.records import GemmTiming, Skipped, note_skipped
from kfacperf.bench.kernels.timing import CallTimer, measure


def time_gemm(sizes: Iterable[int], *, precisions: Iterable[str], device: Any,
              timer: CallTimer, plan: KernelPlan = FULL_PLAN, budget: Budget | None = None,
              skipped: list[Skipped] | None = None) -> list[GemmTiming]:
    """Square matmuls: ``fp32`` (float32, TF32 off), ``tf32`` (float32, TF32 on), ``bf16``."""
    import torch

    from kfacperf.runtime import precision as P

    budget = budget or Budget()
    out: list[GemmTiming] = []
    sizes = tuple(sizes)
    for prec in precisions:
        dtype = torch.bfloat16 if prec == "bf16" else torch.float32
        for n in sizes:
            if budget.left() <= 0:
                note_skipped(skipped, "gemm", f"n={n} {prec}", "time budget spent")
                continue
            gen = torch.Generator(device=device).manual_seed(n)
            a = torch.randn(n, n, generator=gen, device=device).to(dtype)
            b = torch.randn(n, n, generator=gen, device=device).to(dtype)
            c = torch.empty(n, n, device=device, dtype=dtype)

            def call(a: Any = a, b: Any = b, c: Any = c) -> None:
                torch.matmul(a, b, out=c)

            with P.float32_math(prec):
                t = measure(call, timer=timer, warmup=plan.warmup, repeats=plan.repeats,
                            min_repeats=plan.min_repeats, target_s=plan.target_s)
            out.append(GemmTiming(n=n, precision=prec, timing=t,
                                  tflops=2.0 * n**3 / (t.median_us * 1e-6) / 1e12))
            del a, b, c
    return out
