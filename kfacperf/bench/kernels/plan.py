"""What the kernel timings measure and how long they may take: :class:`KernelPlan` (the
GPU plan and the tiny one for a CPU), :class:`Budget` (a deadline on a monotonic clock) and
the rule that skips an inverse size predicted too slow."""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kfacperf import vocab as S

INVERSE_SIZES: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048, 4096, 8192)
"""Matrix sizes of the inverse timings (ResNet-50's factors have dims 64 to 4608)."""
INVERSE_DTYPES: tuple[str, ...] = (S.FP64, S.FP32)
"""In the order they are timed: float64 first, the preconditioner's own dtype (and what the
landing fits the inverse terms to), so a budget cut leaves it whole."""
GEMM_SIZES: tuple[int, ...] = (1024, 2048, 4096, 8192)
GEMM_PRECISIONS: tuple[str, ...] = S.COMPUTE_DTYPES
FACTOR_BATCHES: tuple[int, ...] = (32, 64, 128, 256)
FACTOR_PRECISIONS: tuple[str, ...] = S.COMPUTE_DTYPES
RESNET50_FACTOR_LAYERS: tuple[str, ...] = (
    "conv1",                  # 7x7/2, 3 -> 64 channels at 224x224: A 147, G 64
    "layer1.0.conv1",         # 1x1, 64 -> 64 at 56x56
    "layer1.0.conv2",         # 3x3, 64 at 56x56: A 576
    "layer2.0.conv2",         # 3x3/2, 128, 56x56 -> 28x28: A 1152
    "layer3.0.downsample.0",  # 1x1/2 projection, 512 -> 1024
    "layer3.1.conv2",         # 3x3, 256 at 14x14: A 2304
    "layer4.0.conv3",         # 1x1, 512 -> 2048 at 7x7: G 2048
    "layer4.1.conv2",         # 3x3, 512 at 7x7: A 4608, the largest factor
    "fc",                     # Linear 2048 -> 1000 with bias: A 2049, G 1000
)
"""Layers whose factor computation is timed: every kind of layer ResNet-50 has (stem,
1x1, 3x3, strided, projection, classifier) and its largest factors."""


@dataclass(frozen=True, kw_only=True)
class KernelPlan:
    """What :func:`run_all` measures, and how often."""

    inverse_sizes: tuple[int, ...] = INVERSE_SIZES
    inverse_dtypes: tuple[str, ...] = INVERSE_DTYPES
    gemm_sizes: tuple[int, ...] = GEMM_SIZES
    gemm_precisions: tuple[str, ...] = GEMM_PRECISIONS
    factor_layers: tuple[str, ...] = RESNET50_FACTOR_LAYERS
    factor_batches: tuple[int, ...] = FACTOR_BATCHES
    factor_precisions: tuple[str, ...] = FACTOR_PRECISIONS
    image_size: int = 224
    warmup: int = 1
    repeats: int = 10
    min_repeats: int = 2
    target_s: float = 1.0  # about this long per record (repeats permitting)
    max_call_s: float = 5.0  # skip an inverse size predicted to take longer per call


FULL_PLAN = KernelPlan()
"""The GPU plan: about 1.5 minutes on an H200 (most of it eigh of 4096 and 8192)."""

DRY_PLAN = KernelPlan(
    inverse_sizes=(16, 32, 64, 128), gemm_sizes=(64, 128),
    # every kind of layer (7x7 stem, 3x3, strided 1x1 projection, 1x1 with G 2048, linear),
    # without the wide 3x3 ones whose A (up to 4608) costs seconds on a CPU
    factor_layers=("conv1", "layer1.0.conv2", "layer3.0.downsample.0", "layer4.0.conv3", "fc"),
    factor_batches=(2,), image_size=32, repeats=3, min_repeats=2, target_s=0.05, max_call_s=2.0,
)
"""The same measurements tiny, for a CPU (a few seconds)."""


class Budget:
    """Seconds left until a deadline (None: no deadline), on a monotonic ``clock``."""

    def __init__(self, seconds: float | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.deadline = None if seconds is None else clock() + seconds

    def left(self) -> float:
        return math.inf if self.deadline is None else self.deadline - self._clock()

    def allows(self, estimate_s: float) -> bool:
        """Whether something estimated to take ``estimate_s`` ends before the deadline."""
        return estimate_s <= self.left()


def predicted_call_s(done: Sequence[tuple[int, float]], n: int, power: float = 3.0) -> float:
    """A call at size ``n`` predicted from the largest size timed (``(size, µs)`` pairs) by
    ``n^power`` scaling; 0 when nothing was timed yet."""
    if not done:
        return 0.0
    size, us = max(done)
    return us / 1e6 * float((n / size) ** power)


def skip_reason(done: Sequence[tuple[int, float]], n: int, plan: KernelPlan, budget: Budget,
                calls_per_size: int = 1) -> str:
    """Why size ``n`` is not timed (empty: it is): a call predicted from the sizes ``done``
    to take longer than ``plan.max_call_s``, or warm-up plus minimum repeats of
    ``calls_per_size`` such calls that would outrun ``budget``."""
    call_s = predicted_call_s(done, n)
    if call_s > plan.max_call_s:
        return (f"predicted {call_s:.1f} s per call (n^3 from the largest size timed) > "
                f"{plan.max_call_s:g} s")
    need = call_s * calls_per_size * (plan.warmup + plan.min_repeats)
    if not budget.allows(need):
        return f"time budget: predicted {need:.1f} s, {max(0.0, budget.left()):.1f} s left"
    return ""

