"""How long each task of the plan is expected to take (:class:`CostGuess`), corrected by
what finished runs measured: what the time guard decides with."""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from kfacperf import vocab as S
from kfacperf.pipeline.ground_truth.plan import KERNELS, NSYS, OVERHEAD, ProfileRun, Task


@dataclass
class CostGuess:
    """Rough seconds per task, corrected by measured runs.

    Step times (ResNet-50 at 224x224 on one H200, as guessed before any measurement): SGD
    ``floor + batch x per image`` (bf16 0.45 ms, tf32 0.7 ms, fp32 1.2 ms per image); K-FAC
    adds ``plain_extra_s`` to every step (preconditioning), ``factor_base_s + batch x
    factor_per_image_s`` to factor steps and ``inverse_s`` (float64 eigendecompositions of
    all 108 factors, dims up to 4608) to inverse steps; each run costs ``run_overhead_s``
    more (model, first-call set-up, trace).  After each run, the ratio of measured to
    guessed step time per kind of step scales later guesses of that kind.
    """

    floor_s: float = 0.015
    per_image_s: dict[str, float] = field(default_factory=lambda: {
        S.BF16: 0.00045, S.TF32: 0.0007, S.FP32: 0.0012})
    plain_extra_s: float = 0.012
    factor_base_s: float = 0.03
    factor_per_image_s: float = 0.0008
    inverse_s: float = 6.0
    run_overhead_s: float = 4.0
    overhead_task_s: float = 25.0
    kernels_task_s: float = 80.0
    nsys_task_s: float = 75.0
    ratios: dict[str, list[float]] = field(default_factory=dict)
    run_overheads: list[float] = field(default_factory=list)

    def step_s(self, run: ProfileRun, kind: str, *, corrected: bool = True) -> float:
        """Seconds of one step of ``kind`` (a step kind's name) of ``run``; ``corrected``:
        scaled by what finished runs measured."""
        base = self.floor_s + run.batch * self.per_image_s.get(run.precision, 0.001)
        if run.optimizer == S.KFAC:
            base += self.plain_extra_s
            if kind in (S.FACTOR_STEP.name, S.INVERSE_STEP.name):
                base += self.factor_base_s + run.batch * self.factor_per_image_s
            if kind == S.INVERSE_STEP.name:
                base += self.inverse_s
        if corrected and self.ratios.get(kind):
            base *= statistics.median(self.ratios[kind])
        return base

    def run_s(self, run: ProfileRun) -> float:
        """Seconds of the whole run: its steps and the set-up around them."""
        overhead = (statistics.mean(self.run_overheads) if self.run_overheads
                    else self.run_overhead_s)
        return overhead + sum(n * self.step_s(run, k) for k, n in run.step_kinds().items())

    def task_s(self, task: Task) -> float:
        """Seconds of any task of the plan."""
        if task.run is not None:
            return self.run_s(task.run)
        return {OVERHEAD: self.overhead_task_s, KERNELS: self.kernels_task_s,
                NSYS: self.nsys_task_s}[task.kind]

    def learn(self, run: ProfileRun, step_us: dict[str, list[float]], wall_s: float) -> None:
        """Take in a finished run: its step times (µs, per kind, every step) and wall time."""
        for kind, times in step_us.items():
            if times:
                guess = self.step_s(run, kind, corrected=False)
                self.ratios.setdefault(kind, []).append(statistics.median(times) / 1e6 / guess)
        stepping = sum(sum(t) for t in step_us.values()) / 1e6
        self.run_overheads.append(max(0.0, wall_s - stepping))


