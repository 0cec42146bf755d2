"""The ground-truth run plan: what is measured, in which order, with which settings.

Most valuable first (:func:`make_plan`), as tiers:

1. profiles of the workload with SGD and with K-FAC at factor/inverse intervals 10/100, in
   every precision, at the calibration batch sizes (32 and 128 per GPU), then at the
   validation batch sizes (64 and 256);
2. the stage timer's overhead (:mod:`kfacperf.bench.overhead`);
3. K-FAC at intervals 1/1 (eigendecompositions every step) in the first precision (the
   one users train in): at the first calibration size (the traces that calibrate the
   inverse stage), then at the first validation size (the only held-out inverse steps: the
   10/100 runs' warm-up leaves their one inverse step out);
4. the kernel timings (:mod:`kfacperf.bench.kernels`);
5. the same two K-FAC 1/1 runs in the other precisions;
6. K-FAC 1/1 at the other calibration size, every precision;
7. K-FAC 1/1 at the other validation size, every precision;
8. the NVTX check, under ``nsys`` or ``ncu`` (:mod:`kfacperf.pipeline.ground_truth.nsys`).

Float64 eigendecompositions are the largest unknown of the plan: the first inverse step
measured sets the estimates of the 1/1 runs, and the time guard cuts from the end, so the
order above is what survives a slow inverse.

K-FAC runs use strategy ``spngd`` on one process (the same work as ``local``, and what the
reference traces and ``kfacperf validate`` use) with the ``eigen`` inverse method.
"""
from __future__ import annotations

import json
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kfacperf import vocab as S
from kfacperf.bench.overhead import OverheadConfig
from kfacperf.runtime.config import ProfileConfig
from kfacperf.trace.measure import run_step_kind

PROFILE, OVERHEAD, KERNELS, NSYS = "profile", "overhead", "kernels", "nsys"
"""The kinds of task."""
CALIBRATION, VALIDATION = "calibration", "validation"
"""The role of a profile run's batch size."""


@dataclass(frozen=True, kw_only=True)
class StepCount:
    """Measured steps and warm-up steps of one kind of run."""

    steps: int
    warmup: int


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything the plan is made of."""

    workload: str = "resnet50"
    workload_options: dict[str, Any] = field(default_factory=dict)
    device: str = "cuda"
    precisions: tuple[str, ...] = (S.BF16, S.TF32)
    calibration_batches: tuple[int, ...] = (32, 128)
    validation_batches: tuple[int, ...] = (64, 256)
    stale_intervals: tuple[int, int] = (10, 100)
    sgd: StepCount = StepCount(steps=30, warmup=5)
    # 10/100: warm-up 10 leaves the inverse step 0 out; 40 measured steps hold 4 factor steps
    stale: StepCount = StepCount(steps=40, warmup=10)
    fresh: StepCount = StepCount(steps=3, warmup=1)  # 1/1: every step inverts
    telemetry_interval_s: float = 0.1
    overhead_batch: int = 32
    overhead_pairs: int = 40
    overhead_warmup_pairs: int = 3
    dry_run: bool = False
    nsys: bool = True

    @property
    def batches(self) -> tuple[int, ...]:
        return tuple(sorted({*self.calibration_batches, *self.validation_batches}))


FULL = Settings()
"""The plan for one H200 (about eight minutes)."""
DRY = Settings(
    workload="resnet20", device="cpu", calibration_batches=(2,), validation_batches=(4,),
    sgd=StepCount(steps=2, warmup=1), stale=StepCount(steps=10, warmup=1),
    fresh=StepCount(steps=1, warmup=1), overhead_batch=2, overhead_pairs=3,
    overhead_warmup_pairs=1, dry_run=True, nsys=False,
)
"""The same plan tiny on a CPU (CIFAR ResNet-20, batch 2 and 4, a few steps)."""


@dataclass(frozen=True, kw_only=True)
class ProfileRun:
    """One profile run of the matrix."""

    workload: str
    precision: str
    optimizer: str  # "sgd" or "kfac"
    batch: int
    role: str  # CALIBRATION or VALIDATION
    steps: int
    warmup: int
    factor_interval: int = 1
    inverse_interval: int = 1

    @property
    def label(self) -> str:
        if self.optimizer == S.SGD:
            return "sgd"
        return f"kfac-{self.factor_interval}-{self.inverse_interval}"

    @property
    def name(self) -> str:
        return f"{self.workload}-{self.precision}-{self.label}-b{self.batch}"

    @property
    def relative_dir(self) -> Path:
        """Where the trace lands in the output folder: ``traces/PRECISION/NAME``."""
        return Path("traces") / self.precision / self.name

    def trace_dir(self, out: Path) -> Path:
        return out / self.relative_dir

    def options(self, settings: Settings) -> list[tuple[str, str, Any]]:
        """The run's settings as ``(kfacperf profile flag, ProfileConfig field, value)``: the
        one list both :meth:`command` and :meth:`profile_config` are made from."""
        opts: list[tuple[str, str, Any]] = [("--workload", "workload", self.workload),
                                            ("--optimizer", "optimizer", self.optimizer)]
        if self.optimizer == S.KFAC:
            opts += [("--strategy", "strategy", S.SPNGD),
                     ("--inverse-method", "inverse_method", S.EIGEN),
                     ("--factor-interval", "factor_interval", self.factor_interval),
                     ("--inverse-interval", "inverse_interval", self.inverse_interval)]
        return opts + [
            ("--precision", "precision", self.precision),
            ("--batch-size", "batch_size", self.batch),
            ("--steps", "steps", self.steps), ("--warmup", "warmup", self.warmup),
            ("--device", "device", settings.device),
            ("--telemetry-interval", "telemetry_interval_s", settings.telemetry_interval_s)]

    def cli_args(self, settings: Settings, out: str) -> list[str]:
        """The ``kfacperf profile`` arguments (after the subcommand) of this run into ``out``."""
        args = []
        for flag, _, value in self.options(settings):
            args += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
        for key, value in settings.workload_options.items():
            text = value if isinstance(value, str) else json.dumps(value)
            args += ["--workload-option", f"{key}={text}"]
        return [*args, "--out", out]

    def command(self, settings: Settings) -> str:
        """The equivalent ``kfacperf profile`` command, run from the output folder (``--out``
        is relative to it, so ``run.json`` holds no machine's paths)."""
        args = ["kfacperf", "profile", *self.cli_args(settings, str(self.relative_dir)),
                "--force"]
        return " ".join(shlex.quote(a) for a in args)

    def profile_config(self, settings: Settings, out: Path) -> ProfileConfig:
        """The run as the library takes it, its trace under the output folder ``out``."""
        values = {name: value for _, name, value in self.options(settings)}
        return ProfileConfig(**values, workload_options=dict(settings.workload_options),
                             out=str(self.trace_dir(out)), command=self.command(settings))

    def step_kinds(self) -> dict[str, int]:
        """How many of the run's steps (warm-up included) are of each kind."""
        run = {"optimizer": self.optimizer, "factor_interval": self.factor_interval,
               "inverse_interval": self.inverse_interval}
        kinds: dict[str, int] = {}
        for s in range(self.steps + self.warmup):
            k = run_step_kind(s, run)
            kinds[k] = kinds.get(k, 0) + 1
        return kinds


@dataclass(frozen=True, kw_only=True)
class Task:
    """One line of the plan."""

    kind: str  # PROFILE, OVERHEAD, KERNELS or NSYS
    name: str
    tier: int
    run: ProfileRun | None = None


def profile_runs(settings: Settings, batches: Sequence[int], role: str,
                 kinds: Sequence[str],
                 precisions: Sequence[str] | None = None) -> list[ProfileRun]:
    """Per batch size and precision (default: every one of ``settings``), a run of each
    kind: ``sgd``, ``stale`` (K-FAC at ``settings.stale_intervals``) or ``fresh`` (K-FAC
    1/1)."""
    fi, ii = settings.stale_intervals
    out = []
    for b in batches:
        for p in settings.precisions if precisions is None else precisions:
            common: dict[str, Any] = dict(workload=settings.workload, precision=p, batch=b,
                                          role=role)
            for kind in kinds:
                if kind == "sgd":
                    out.append(ProfileRun(optimizer=S.SGD, steps=settings.sgd.steps,
                                          warmup=settings.sgd.warmup, **common))
                elif kind == "stale":
                    out.append(ProfileRun(optimizer=S.KFAC, factor_interval=fi,
                                          inverse_interval=ii, steps=settings.stale.steps,
                                          warmup=settings.stale.warmup, **common))
                else:
                    out.append(ProfileRun(optimizer=S.KFAC, steps=settings.fresh.steps,
                                          warmup=settings.fresh.warmup, **common))
    return out


def make_plan(settings: Settings) -> list[Task]:
    """The tasks in the order they run (see the module docstring)."""
    def profiles(tier: int, runs: list[ProfileRun]) -> list[Task]:
        return [Task(kind=PROFILE, name=r.name, tier=tier, run=r) for r in runs]

    cal, val = settings.calibration_batches, settings.validation_batches
    plan = profiles(1, profile_runs(settings, cal, CALIBRATION, ("sgd", "stale")))
    plan += profiles(1, profile_runs(settings, val, VALIDATION, ("sgd", "stale")))
    plan.append(Task(kind=OVERHEAD, name="timer overhead", tier=2))
    first, rest = settings.precisions[:1], settings.precisions[1:]
    plan += profiles(3, profile_runs(settings, cal[:1], CALIBRATION, ("fresh",), first))
    plan += profiles(3, profile_runs(settings, val[:1], VALIDATION, ("fresh",), first))
    plan.append(Task(kind=KERNELS, name="kernel timings", tier=4))
    plan += profiles(5, profile_runs(settings, cal[:1], CALIBRATION, ("fresh",), rest))
    plan += profiles(5, profile_runs(settings, val[:1], VALIDATION, ("fresh",), rest))
    plan += profiles(6, profile_runs(settings, cal[1:], CALIBRATION, ("fresh",)))
    plan += profiles(7, profile_runs(settings, val[1:], VALIDATION, ("fresh",)))
    if settings.nsys:
        plan.append(Task(kind=NSYS, name="nvtx check (nsys or ncu)", tier=8))
    return plan


def overhead_configs(settings: Settings) -> list[OverheadConfig]:
    """The configurations whose timer overhead is measured: SGD and K-FAC 10/100 (the most
    stage calls per millisecond of step) at the overhead batch, first precision.  K-FAC uses
    the cholesky inverse method here: the one inverse step (step 0, a warm-up pair) then
    costs milliseconds instead of seconds, and the stage calls are the same."""
    fi, ii = settings.stale_intervals
    common: dict[str, Any] = dict(
        workload=settings.workload, workload_options=dict(settings.workload_options),
        batch=settings.overhead_batch, precision=settings.precisions[0],
        pairs=settings.overhead_pairs, warmup_pairs=settings.overhead_warmup_pairs)
    return [OverheadConfig(optimizer=S.SGD, **common),
            OverheadConfig(optimizer=S.KFAC, factor_interval=fi, inverse_interval=ii,
                           inverse_method=S.CHOLESKY, **common)]
