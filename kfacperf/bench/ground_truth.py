"""Ground truth on a real GPU: the profile matrix, the timer's overhead and the kernels, in
one run with a time budget (``scripts/gpu-ground-truth.sh`` drives it; see
``docs/gpu-ground-truth.md``).

The plan, most valuable first (:func:`make_plan`):

1. ``kfacperf profile`` of the workload with SGD and with K-FAC at factor/inverse intervals
   10/100, in every precision, at the calibration batch sizes (32 and 128 per GPU), then at
   the validation batch sizes (64 and 256);
2. the stage timer's overhead (:mod:`kfacperf.bench.overhead`);
3. K-FAC at intervals 1/1 (eigendecompositions every step) at the first calibration size,
   every precision: the traces that calibrate the inverse stage;
4. the kernel timings (:mod:`kfacperf.bench.kernels`);
5. K-FAC 1/1 at the other calibration size;
6. K-FAC 1/1 at the validation sizes;
7. where Nsight Systems is installed, one short K-FAC run under ``nsys`` whose NVTX range
   summary (a small CSV) shows the stage timer's ranges arrive.

K-FAC runs use strategy ``spngd`` on one process (the same work as ``local``, and what the
reference traces and ``kfacperf validate`` use) with the ``eigen`` inverse method.  Every
profile runs in this process through ``kfacperf.cli`` (no torch start-up per run), with
``sys.argv`` set to the equivalent ``kfacperf profile ...`` command, which is what each
``run.json`` records.

**Time guard.** Each task has an estimate (:class:`CostGuess`: rough H200 step times for
ResNet-50, corrected by what finished runs measured); a task that would end after the
budget is skipped, said so, and the next (smaller) one is tried.  The plan with its
estimates is printed first (``plan.txt``), the summary table last (``summary.txt``,
``summary.json``).

``--dry-run``: the same plan tiny on the CPU (CIFAR ResNet-20, batch 2 and 4, a few steps;
kernel sizes up to 128), with no time guard.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from kfacperf.bench.kernels import Budget, write_json

PROFILE, OVERHEAD, KERNELS, NSYS = "profile", "overhead", "kernels", "nsys"
CALIBRATION, VALIDATION = "calibration", "validation"
DEFAULT_BUDGET_S = 450.0


# --------------------------------------------------------------------------- settings


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
    precisions: tuple[str, ...] = ("bf16", "tf32")
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
DRY = Settings(
    workload="resnet20", device="cpu", calibration_batches=(2,), validation_batches=(4,),
    sgd=StepCount(steps=2, warmup=1), stale=StepCount(steps=10, warmup=1),
    fresh=StepCount(steps=1, warmup=1), overhead_batch=2, overhead_pairs=3,
    overhead_warmup_pairs=1, dry_run=True, nsys=False,
)


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True, kw_only=True)
class ProfileRun:
    """One ``kfacperf profile`` run of the matrix."""

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
        if self.optimizer == "sgd":
            return "sgd"
        return f"kfac-{self.factor_interval}-{self.inverse_interval}"

    @property
    def name(self) -> str:
        return f"{self.workload}-{self.precision}-{self.label}-b{self.batch}"

    def trace_dir(self, out: Path) -> Path:
        """Where the trace lands: ``traces/PRECISION/NAME`` in the output folder."""
        return out / self.relative_dir

    @property
    def relative_dir(self) -> Path:
        return Path("traces") / self.precision / self.name

    def argv(self, settings: Settings) -> list[str]:
        """The ``kfacperf profile`` arguments (after the subcommand), run from the output
        folder (``--out`` is relative to it, so ``run.json`` holds no machine's paths)."""
        args = ["--workload", self.workload]
        for key, value in settings.workload_options.items():
            args += ["--workload-option", f"{key}={value}"]
        args += ["--optimizer", self.optimizer]
        if self.optimizer == "kfac":
            args += ["--strategy", "spngd", "--inverse-method", "eigen",
                     "--factor-interval", str(self.factor_interval),
                     "--inverse-interval", str(self.inverse_interval)]
        args += ["--precision", self.precision, "--batch-size", str(self.batch),
                 "--steps", str(self.steps), "--warmup", str(self.warmup),
                 "--device", settings.device,
                 "--telemetry-interval", f"{settings.telemetry_interval_s:g}",
                 "--out", str(self.relative_dir), "--force"]
        return args

    def step_kinds(self) -> dict[str, int]:
        """How many of the run's steps (warm-up included) are of each kind."""
        from kfacperf.trace.measure import run_step_kind as step_kind

        run = {"optimizer": self.optimizer, "factor_interval": self.factor_interval,
               "inverse_interval": self.inverse_interval}
        kinds: dict[str, int] = {}
        for s in range(self.steps + self.warmup):
            k = step_kind(s, run)
            kinds[k] = kinds.get(k, 0) + 1
        return kinds


@dataclass(frozen=True, kw_only=True)
class Task:
    """One line of the plan."""

    kind: str  # PROFILE, OVERHEAD, KERNELS or NSYS
    name: str
    tier: int
    run: ProfileRun | None = None


def make_plan(settings: Settings) -> list[Task]:
    """The tasks in the order they run (see the module docstring)."""
    fi, ii = settings.stale_intervals

    def runs(batches: Sequence[int], role: str, kinds: Sequence[str]) -> list[ProfileRun]:
        out = []
        for b in batches:
            for p in settings.precisions:
                for kind in kinds:
                    common = dict(workload=settings.workload, precision=p, batch=b, role=role)
                    if kind == "sgd":
                        out.append(ProfileRun(optimizer="sgd", steps=settings.sgd.steps,
                                              warmup=settings.sgd.warmup, **common))
                    elif kind == "stale":
                        out.append(ProfileRun(optimizer="kfac", factor_interval=fi,
                                              inverse_interval=ii, steps=settings.stale.steps,
                                              warmup=settings.stale.warmup, **common))
                    else:
                        out.append(ProfileRun(optimizer="kfac", steps=settings.fresh.steps,
                                              warmup=settings.fresh.warmup, **common))
        return out

    def profiles(tier: int, rs: list[ProfileRun]) -> list[Task]:
        return [Task(kind=PROFILE, name=r.name, tier=tier, run=r) for r in rs]

    cal, val = settings.calibration_batches, settings.validation_batches
    plan = profiles(1, runs(cal, CALIBRATION, ("sgd", "stale")))
    plan += profiles(1, runs(val, VALIDATION, ("sgd", "stale")))
    plan.append(Task(kind=OVERHEAD, name="timer overhead", tier=2))
    plan += profiles(3, runs(cal[:1], CALIBRATION, ("fresh",)))
    plan.append(Task(kind=KERNELS, name="kernel timings", tier=4))
    plan += profiles(5, runs(cal[1:], CALIBRATION, ("fresh",)))
    plan += profiles(6, runs(val, VALIDATION, ("fresh",)))
    if settings.nsys:
        plan.append(Task(kind=NSYS, name="nvtx check under nsys", tier=7))
    return plan


def overhead_configs(settings: Settings) -> list[Any]:
    """The configurations whose timer overhead is measured: SGD and K-FAC 10/100 (the most
    stage calls per millisecond of step) at the overhead batch, first precision.  K-FAC uses
    the cholesky inverse method here: the one inverse step (step 0, a warm-up pair) then
    costs milliseconds instead of seconds, and the stage calls are the same."""
    from kfacperf.bench.overhead import OverheadConfig

    fi, ii = settings.stale_intervals
    common = dict(workload=settings.workload, workload_options=dict(settings.workload_options),
                  batch=settings.overhead_batch, precision=settings.precisions[0],
                  pairs=settings.overhead_pairs, warmup_pairs=settings.overhead_warmup_pairs)
    return [OverheadConfig(optimizer="sgd", **common),
            OverheadConfig(optimizer="kfac", factor_interval=fi, inverse_interval=ii,
                           inverse_method="cholesky", **common)]


# --------------------------------------------------------------------------- estimates


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
        "bf16": 0.00045, "tf32": 0.0007, "fp32": 0.0012})
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
        base = self.floor_s + run.batch * self.per_image_s.get(run.precision, 0.001)
        if run.optimizer == "kfac":
            base += self.plain_extra_s
            if kind in ("factor", "inverse"):
                base += self.factor_base_s + run.batch * self.factor_per_image_s
            if kind == "inverse":
                base += self.inverse_s
        if corrected and self.ratios.get(kind):
            base *= statistics.median(self.ratios[kind])
        return base

    def run_s(self, run: ProfileRun) -> float:
        overhead = (statistics.mean(self.run_overheads) if self.run_overheads
                    else self.run_overhead_s)
        return overhead + sum(n * self.step_s(run, k) for k, n in run.step_kinds().items())

    def task_s(self, task: Task) -> float:
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


# --------------------------------------------------------------------------- execution


@dataclass
class Outcome:
    """What became of one task."""

    task: Task
    status: str  # "ok", "failed", "skipped"
    estimate_s: float
    wall_s: float = 0.0
    detail: str = ""
    step_ms: dict[str, float] = field(default_factory=dict)  # measured median per kind
    checks: dict[str, Any] = field(default_factory=dict)  # what the trace says it recorded
    result: Any = None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.task.name, "kind": self.task.kind,
                             "tier": self.task.tier, "status": self.status,
                             "estimate_s": round(self.estimate_s, 1),
                             "wall_s": round(self.wall_s, 1), "detail": self.detail,
                             "step_ms": {k: round(v, 3) for k, v in self.step_ms.items()},
                             **self.checks}
        if self.task.run is not None:
            d["run"] = asdict(self.task.run)
        return d


def trace_checks(trace: Any) -> dict[str, Any]:
    """What a trace says it recorded: its clock, telemetry samples and precision."""
    tel = trace.telemetry
    return {"timing": trace.run.get("timing"), "precision": trace.run.get("precision"),
            "telemetry_samples": 0 if tel is None else int(len(tel)),
            "device_name": (trace.run.get("device") or {}).get("name")}


def check_problems(checks: dict[str, Any], *, gpu: bool) -> list[str]:
    """What a GPU trace lacks: CUDA-event timing and NVML telemetry."""
    if not gpu:
        return []
    problems = []
    if checks.get("timing") != "cuda_events":
        problems.append(f"timed by {checks.get('timing')}, not CUDA events")
    if not checks.get("telemetry_samples"):
        problems.append("no NVML telemetry")
    return problems


def trace_step_times(trace_dir: Path) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Per kind of step: every step's time (µs, warm-up included) and the median over the
    measured steps (ms)."""
    from kfacperf.trace.store import load_trace

    return step_times(load_trace(trace_dir))


def step_times(trace: Any) -> tuple[dict[str, list[float]], dict[str, float]]:
    """:func:`trace_step_times` of a loaded trace."""
    from kfacperf.trace.measure import run_step_kind as step_kind

    ev = trace.events
    steps = ev[ev["stage"].astype(str) == "step"].groupby("step")["dur_us"].max()
    warmup = int(trace.run.get("warmup") or 0)
    every: dict[str, list[float]] = {}
    measured: dict[str, list[float]] = {}
    for step, us in steps.items():
        kind = step_kind(int(step), trace.run)
        every.setdefault(kind, []).append(float(us))
        if int(step) >= warmup:
            measured.setdefault(kind, []).append(float(us))
    return every, {k: statistics.median(v) / 1e3 for k, v in measured.items()}


def run_profile(run: ProfileRun, settings: Settings, out: Path, log_path: Path) -> int:
    """``kfacperf profile`` in this process, its output in ``log_path``; the exit status."""
    from kfacperf import cli

    argv = ["profile", *run.argv(settings)]
    saved = sys.argv
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log), working_directory(out):
        print("$ kfacperf " + " ".join(shlex.quote(a) for a in argv), flush=True)
        sys.argv = ["kfacperf", *argv]  # what run.json records as the command
        try:
            return int(cli.main(argv) or 0)
        except SystemExit as exc:
            return int(exc.code or 0) if isinstance(exc.code, int) else 1
        except Exception:
            traceback.print_exc()
            return 1
        finally:
            sys.argv = saved


@contextlib.contextmanager
def working_directory(path: Path) -> Iterator[None]:
    """Run the block in ``path`` (``contextlib.chdir`` of Python 3.11+)."""
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def _free_device_memory() -> None:
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_nsys(settings: Settings, out: Path, log_path: Path, timeout_s: float) -> str:
    """One short K-FAC run under Nsight Systems; keeps only its NVTX range summary (CSV)."""
    nsys = shutil.which("nsys")
    if nsys is None:
        raise FileNotFoundError("nsys is not installed")
    where = out / "nsys"
    where.mkdir(parents=True, exist_ok=True)
    run = ProfileRun(workload=settings.workload, precision=settings.precisions[0],
                     optimizer="kfac", batch=settings.calibration_batches[0], role="check",
                     steps=2, warmup=1)
    argv = run.argv(settings)
    argv[argv.index("--out") + 1] = str((where / "trace").resolve())
    report = where / "kfac-1-1"
    cmd = [nsys, "profile", "--trace=cuda,nvtx", "--sample=none", "--cpuctxsw=none",
           "--force-overwrite=true", "-o", str(report),
           sys.executable, "-m", "kfacperf.cli", "profile", *argv]
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
        log.flush()
        subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s, check=True)
        rep = report.with_suffix(".nsys-rep")
        for name in ("nvtx_sum", "nvtxsum"):  # the report's name in newer / older nsys
            r = subprocess.run([nsys, "stats", "--report", name, "--format", "csv",
                                "--force-export=true", "--output", str(where / "nvtx"),
                                str(rep)], stdout=log, stderr=subprocess.STDOUT,
                               timeout=timeout_s)
            if r.returncode == 0:
                break
    csvs = sorted(where.glob("nvtx*.csv"))
    for p in [*where.glob("*.nsys-rep"), *where.glob("*.sqlite")]:
        p.unlink()  # large; the CSV is what is kept
    shutil.rmtree(where / "trace", ignore_errors=True)
    if not csvs:
        raise RuntimeError("nsys stats wrote no NVTX summary")
    ranges = sum(1 for _ in csvs[0].open()) - 1
    return f"{csvs[0].name}: {ranges} NVTX range name(s)"


def execute(plan: Sequence[Task], settings: Settings, out: Path, *, budget: Budget,
            guess: CostGuess | None = None, log: Callable[[str], None] = print,
            after_each: Callable[[list[Outcome]], None] | None = None) -> list[Outcome]:
    """Run the plan under the time guard; every task's outcome, in plan order.
    ``after_each`` gets the outcomes so far after every task (to keep a summary on disk)."""
    guess = guess or CostGuess()
    outcomes: list[Outcome] = []
    for i, task in enumerate(plan, 1):
        est = guess.task_s(task)
        head = f"[{i}/{len(plan)}] {task.name}"
        why = ""
        if task.kind == NSYS and shutil.which("nsys") is None:
            why = "nsys is not installed here"
        elif not budget.allows(est):
            why = f"time guard: needs ~{est:.0f} s, {max(0.0, budget.left()):.0f} s left"
        if why:
            outcomes.append(Outcome(task=task, status="skipped", estimate_s=est, detail=why))
            log(f"{head}: skipped ({why})")
            if after_each is not None:
                after_each(outcomes)
            continue
        t0 = time.monotonic()
        o = Outcome(task=task, status="ok", estimate_s=est)
        try:
            if task.kind == PROFILE:
                _do_profile(task, o, settings, out, guess)
            elif task.kind == OVERHEAD:
                _do_overhead(o, settings, out)
            elif task.kind == KERNELS:
                _do_kernels(o, settings, out, budget, est, log)
            elif task.kind == NSYS:
                o.detail = run_nsys(settings, out, out / "logs" / "nsys.log",
                                    timeout_s=max(10.0, budget.left()))
        except Exception as exc:  # one task failing does not stop the others
            o.status, o.detail = "failed", f"{type(exc).__name__}: {exc}"
            with open(out / "logs" / "errors.log", "a") as f:
                f.write(f"--- {task.name}\n{traceback.format_exc()}\n")
        o.wall_s = time.monotonic() - t0
        _free_device_memory()
        outcomes.append(o)
        steps = "  ".join(f"{k} {v:.1f} ms" for k, v in o.step_ms.items())
        left = budget.left()
        log(f"{head}: {o.status} in {o.wall_s:.1f} s (estimated {est:.0f} s"
            + (f"; {max(0.0, left):.0f} s left)" if math.isfinite(left) else ")")
            + (f"  {steps}" if steps else "") + (f"  {o.detail}" if o.detail else ""))
        if after_each is not None:
            after_each(outcomes)
    return outcomes


def _do_profile(task: Task, o: Outcome, settings: Settings, out: Path,
                guess: CostGuess) -> None:
    run = task.run
    assert run is not None
    t0 = time.monotonic()
    rc = run_profile(run, settings, out, out / "logs" / f"{run.name}.log")
    wall = time.monotonic() - t0
    if rc != 0:
        o.status, o.detail = "failed", f"kfacperf profile exited {rc} (logs/{run.name}.log)"
        return
    from kfacperf.trace.store import load_trace

    trace = load_trace(run.trace_dir(out))
    every, o.step_ms = step_times(trace)
    o.checks = trace_checks(trace)
    problems = check_problems(o.checks, gpu=settings.device == "cuda")
    if problems:
        o.detail = "; ".join(problems)
    guess.learn(run, every, wall)


def _do_overhead(o: Outcome, settings: Settings, out: Path) -> None:
    from kfacperf.bench.overhead import OUTPUT_FILE, measure_timer_overhead

    results = [measure_timer_overhead(c, device=settings.device)
               for c in overhead_configs(settings)]
    write_json(out / OUTPUT_FILE, {"target": 0.01, "results": results})
    o.result = results
    o.detail = "; ".join(f"{r['name']}: {100 * r['overhead_median']:+.2f}% "
                         f"({'meets' if r['meets_target'] else 'misses'} <=1%)" for r in results)


def _do_kernels(o: Outcome, settings: Settings, out: Path, budget: Budget, est: float,
                log: Callable[[str], None]) -> None:
    import torch

    from kfacperf.bench import kernels

    # at most 1.5x its estimate, and never past the run's budget
    allowed = min(budget.left(), 1.5 * est)
    report = kernels.run_all(out, dry_run=settings.dry_run, budget_s=allowed,
                             device=torch.device(settings.device), log=log)
    o.result = report
    o.detail = f"{len(report.eigh)} eigh, {len(report.cholesky)} cholesky, " \
               f"{len(report.factors)} factor, {len(report.gemm)} gemm record(s); " \
               f"{len(report.skipped)} skipped"
    (out / "kernels.txt").write_text("\n".join(kernels.summary_lines(report)) + "\n")


# --------------------------------------------------------------------------- reports


def plan_text(plan: Sequence[Task], guess: CostGuess, budget_s: float | None) -> str:
    lines = [f"{'#':>3}  {'tier':>4}  {'task':<40} {'steps':>14} {'est s':>7} {'cum s':>7}"]
    cum = 0.0
    for i, t in enumerate(plan, 1):
        est = guess.task_s(t)
        cum += est
        steps = f"{t.run.warmup}+{t.run.steps}" if t.run else ""
        lines.append(f"{i:>3}  {t.tier:>4}  {t.name:<40} {steps:>14} {est:>7.0f} {cum:>7.0f}")
    lines.append(f"estimated total {cum:.0f} s" + (
        f" against a budget of {budget_s:.0f} s: the time guard skips what does not fit"
        if budget_s is not None and math.isfinite(budget_s) else ""))
    return "\n".join(lines)


def summary_text(outcomes: Sequence[Outcome]) -> str:
    """The table printed at the end."""
    head = ["task", "status", "wall s", "est s", "plain ms", "factor ms", "inverse ms",
            "img/s", "note"]
    rows = [head]
    for o in outcomes:
        run = o.task.run
        plain = o.step_ms.get("plain")
        rate = f"{run.batch / (plain / 1e3):.0f}" if run is not None and plain else ""
        note = o.detail
        rows.append([o.task.name, o.status, f"{o.wall_s:.1f}", f"{o.estimate_s:.0f}",
                     _ms(o.step_ms.get("plain")), _ms(o.step_ms.get("factor")),
                     _ms(o.step_ms.get("inverse")), rate, note])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head) - 1)]
    lines = []
    for r in rows:
        cells = [c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells + [r[-1]]).rstrip())
    counts = {s: sum(o.status == s for o in outcomes) for s in ("ok", "failed", "skipped")}
    lines.append(f"{counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} skipped")
    skipped = [o for o in outcomes if o.status == "skipped"]
    if skipped:
        lines.append("skipped: " + ", ".join(o.task.name for o in skipped))
    return "\n".join(lines)


def _ms(v: float | None) -> str:
    return "" if v is None else f"{v:.1f}"


def environment(settings: Settings, argv: Sequence[str]) -> dict[str, Any]:
    """torch, CUDA, cuDNN, the device and this run's settings (``env.json``)."""
    import torch

    from kfacperf import __version__

    env: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(),
        "hostname": platform.node(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
        "cudnn": (torch.backends.cudnn.version()
                  if torch.backends.cudnn.is_available() else None),
        "nccl": _nccl_version(torch),
        "kfacperf": __version__, "argv": list(argv), "settings": asdict(settings),
        "start_time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["gpu"] = {"name": props.name, "capability": list(torch.cuda.get_device_capability(0)),
                      "memory_total_mib": props.total_memory / 2**20,
                      "multiprocessors": props.multi_processor_count,
                      "count": torch.cuda.device_count()}
    for mod in ("numpy", "pandas", "pyarrow", "pynvml", "nvtx", "simpy", "plotly"):
        try:
            m = __import__(mod)
            env.setdefault("packages", {})[mod] = getattr(m, "__version__", "?")
        except Exception as exc:  # recorded, not fatal: the run says what it had
            env.setdefault("packages", {})[mod] = f"missing: {exc}"
    return env


def _nccl_version(torch: Any) -> str | None:
    try:
        v = torch.cuda.nccl.version()  # a tuple in recent torch, an int in old ones
    except Exception:  # no NCCL in this build
        return None
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kfacperf.bench.ground_truth",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--dry-run", action="store_true", help="the same steps tiny, on a CPU")
    parser.add_argument("--budget-s", type=float, default=None,
                        help=f"time budget in seconds (default {DEFAULT_BUDGET_S:g}; "
                             "none for --dry-run)")
    parser.add_argument("--precisions", default=None,
                        help="comma-separated, from fp32,tf32,bf16 (default bf16,tf32)")
    parser.add_argument("--no-nsys", action="store_true", help="leave out the nsys check")
    parser.add_argument("--plan-only", action="store_true", help="print the plan and stop")
    args = parser.parse_args(argv)
    import torch

    from kfacperf.precision import check

    settings = DRY if args.dry_run else FULL
    if args.precisions:
        settings = replace(settings, precisions=tuple(
            check(p.strip()) for p in args.precisions.split(",") if p.strip()))
    if args.no_nsys:
        settings = replace(settings, nsys=False)
    budget_s = args.budget_s if args.budget_s is not None else (
        None if args.dry_run else DEFAULT_BUDGET_S)
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    plan = make_plan(settings)
    guess = CostGuess()
    text = plan_text(plan, guess, budget_s)
    (out / "plan.txt").write_text(text + "\n")
    print(text, flush=True)
    if args.plan_only:
        return 0
    if settings.device == "cuda" and not torch.cuda.is_available():
        print("ground truth: no CUDA device here (use --dry-run on a CPU)", file=sys.stderr)
        return 2
    torch.set_num_threads(1)  # as kfacperf profile's ranks (--threads-per-rank 1)
    try:
        env = environment(settings, sys.argv if argv is None else argv)
    except Exception as exc:  # describing the machine must never cost the measurements
        env = {"error": f"{type(exc).__name__}: {exc}"}
    write_json(out / "env.json", env)
    budget = Budget(budget_s)

    def write_summary(outcomes: list[Outcome]) -> str:
        """summary.txt and summary.json of the tasks so far (kept current after every task,
        so a run stopped from outside still says what it did)."""
        done = {o.task.name for o in outcomes}
        pending = [t.name for t in plan if t.name not in done]
        summary = summary_text(outcomes) + (
            f"\nnot reached: {', '.join(pending)}" if pending else "")
        (out / "summary.txt").write_text(summary + "\n")
        write_json(out / "summary.json", {
            "budget_s": budget_s, "dry_run": settings.dry_run, "finished": not pending,
            "tasks": [o.to_json() for o in outcomes], "not_reached": pending,
            "learned_step_ratios": {k: statistics.median(v) for k, v in guess.ratios.items()
                                    if v},
        })
        return summary

    outcomes = execute(plan, settings, out, budget=budget, guess=guess,
                       after_each=write_summary)
    print("\n" + write_summary(outcomes), flush=True)
    return 0 if all(o.status != "failed" for o in outcomes) else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
