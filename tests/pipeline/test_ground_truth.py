"""kfacperf.pipeline.ground_truth: the plan, its order, the estimates and the time guard."""
from __future__ import annotations

import shlex
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from kfacperf.bench.kernels import Budget
from kfacperf.cli import build_parser
from kfacperf.cli.commands.profile import build_config
from kfacperf.pipeline.ground_truth import checks as C
from kfacperf.pipeline.ground_truth import plan as G
from kfacperf.pipeline.ground_truth import report as R
from kfacperf.pipeline.ground_truth import run as X
from kfacperf.pipeline.ground_truth.driver import DEFAULT_BUDGET_S
from kfacperf.pipeline.ground_truth.estimates import CostGuess


def test_the_most_valuable_runs_come_first():
    plan = G.make_plan(G.FULL)
    kinds = [t.kind for t in plan]
    first = plan[:16]
    assert all(t.kind == G.PROFILE and t.tier == 1 for t in first)
    got = {(t.run.batch, t.run.precision, t.run.label) for t in first}
    assert got == {(b, p, l) for b in (32, 64, 128, 256) for p in ("bf16", "tf32")
                   for l in ("sgd", "kfac-10-100")}
    # calibration batch sizes before validation ones
    assert [t.run.batch for t in first[:8]] == [32] * 4 + [128] * 4
    assert {t.run.role for t in first[:8]} == {G.CALIBRATION}
    assert {t.run.role for t in first[8:]} == {G.VALIDATION}
    assert kinds[16] == G.OVERHEAD
    fresh = [(t.run.batch, t.run.precision) for t in plan if t.run and t.run.label == "kfac-1-1"]
    # in the first precision the inverse stage's calibration, then its only held-out steps
    # (the 10/100 runs' warm-up leaves their inverse step out), before the kernel timings
    assert fresh[:2] == [(32, "bf16"), (64, "bf16")]
    assert [t.run.role for t in plan[17:19]] == [G.CALIBRATION, G.VALIDATION]
    assert kinds[19] == G.KERNELS
    assert fresh[2:4] == [(32, "tf32"), (64, "tf32")]
    assert fresh[4:] == [(b, p) for b in (128, 256) for p in ("bf16", "tf32")]
    assert kinds[20:26] == [G.PROFILE] * 6
    assert kinds[26:] == [G.NSYS]
    assert [t.tier for t in plan] == sorted(t.tier for t in plan)
    names = [t.name for t in plan]
    assert len(set(names)) == len(names)
    assert G.make_plan(replace(G.FULL, nsys=False))[-1].kind == G.PROFILE


def test_the_recorded_command_is_the_run_the_library_makes():
    """Each run's ``kfacperf profile`` command (what run.json records), parsed by the CLI,
    gives exactly the ProfileConfig the driver hands the library, its --out aside (relative
    to the output folder in the command)."""
    out = Path("/somewhere/gt")
    settings = replace(G.FULL, workload_options={"image_size": 160, "name": "x y"})
    for task in G.make_plan(settings):
        if task.run is None:
            continue
        r = task.run
        config = r.profile_config(settings, out)
        words = shlex.split(config.command)
        assert words[:2] == ["kfacperf", "profile"]
        parsed = build_config(build_parser().parse_args(words[1:]))
        assert {**asdict(parsed), "out": None, "command": None} == {
            **asdict(config), "out": None, "command": None}, r.name
        assert parsed.out == f"traces/{r.precision}/{r.name}"  # relative: no machine's paths
        assert config.out == str(out / parsed.out) and "--force" in words
        assert (config.workload, config.precision, config.batch_size) == (
            "resnet50", r.precision, r.batch)
        assert (config.steps, config.warmup, config.device) == (r.steps, r.warmup, "cuda")
        assert config.workload_options == {"image_size": 160, "name": "x y"}
        if r.optimizer == "kfac":
            assert (config.resolved_strategy, config.inverse_method) == ("spngd", "eigen")
            assert (config.factor_interval, config.inverse_interval) == (
                r.factor_interval, r.inverse_interval)
        else:
            assert config.resolved_strategy == "sgd"


def test_stale_runs_measure_factor_steps_and_warm_up_past_the_inverse():
    stale = next(t.run for t in G.make_plan(G.FULL) if t.run and t.run.label == "kfac-10-100")
    assert stale.warmup >= 1  # step 0 (the only inverse step) is warm-up
    measured = range(stale.warmup, stale.warmup + stale.steps)
    assert sum(s % 10 == 0 for s in measured) >= 3  # factor steps among the measured
    assert stale.step_kinds() == {"inverse": 1, "factor": 4, "plain": 45}
    fresh = next(t.run for t in G.make_plan(G.FULL) if t.run and t.run.label == "kfac-1-1")
    assert fresh.step_kinds() == {"inverse": fresh.steps + fresh.warmup}


def test_estimates_learn_from_measured_runs():
    guess = CostGuess()
    run = G.ProfileRun(workload="resnet50", precision="bf16", optimizer="sgd", batch=32,
                       role=G.CALIBRATION, steps=30, warmup=5)
    step = guess.step_s(run, "plain")
    assert step == pytest.approx(0.015 + 32 * 0.00045)
    assert guess.run_s(run) == pytest.approx(guess.run_overhead_s + 35 * step)
    # the run measured every step at twice the guess, and 1 s besides the steps
    measured = [2e6 * step] * 35
    guess.learn(run, {"plain": measured}, wall_s=1.0 + 35 * 2 * step)
    assert guess.step_s(run, "plain") == pytest.approx(2 * step)
    assert guess.run_s(run) == pytest.approx(1.0 + 35 * 2 * step)
    inverse = replace(run, optimizer="kfac", steps=3, warmup=2)
    assert guess.step_s(inverse, "inverse", corrected=False) > guess.inverse_s


def _context(out: Path, settings: G.Settings = G.DRY, **kw) -> X.Context:
    (out / "logs").mkdir(exist_ok=True)
    kw.setdefault("budget", Budget(None))
    kw.setdefault("guess", CostGuess())
    kw.setdefault("log", lambda s: None)
    return X.Context(settings=settings, out=out, **kw)


def test_what_the_guard_cannot_fit_is_skipped_and_named(tmp_path):
    now = [0.0]
    budget = Budget(100.0, clock=lambda: now[0])
    plan = [G.Task(kind=G.OVERHEAD, name=f"t{i}", tier=1) for i in range(3)]
    ran = []

    def fake_overhead(o, ctx):
        ran.append(o.task.name)
        now[0] += 45.0  # each takes a little longer than guessed

    lines: list[str] = []
    seen = []
    ctx = _context(tmp_path, budget=budget, guess=CostGuess(overhead_task_s=40.0),
                   log=lines.append)
    outcomes = X.execute(plan, ctx, after_each=lambda so_far: seen.append(len(so_far)),
                         runners={G.OVERHEAD: fake_overhead})
    assert ran == ["t0", "t1"]
    assert seen == [1, 2, 3]  # the summary on disk is kept current, skipped tasks included
    assert [o.status for o in outcomes] == ["ok", "ok", "skipped"]
    assert "needs ~40 s, 10 s left" in outcomes[2].detail
    assert "skipped" in lines[-1]
    text = R.summary_text(outcomes)
    assert "2 ok, 0 failed, 1 skipped" in text and "skipped: t2" in text


def test_the_kernel_timings_run_on_less_than_their_estimate_but_not_on_nothing(tmp_path):
    """Slow inverses can leave less than the kernel timings' estimate; they cut themselves
    to what is left, so they still run from X.KERNELS_MIN_S on, with that time as their
    budget; below it they are skipped."""
    now = [0.0]
    budget = Budget(X.KERNELS_MIN_S + 5, clock=lambda: now[0])
    kernels = G.Task(kind=G.KERNELS, name="kernel timings", tier=4)
    given: list[float] = []

    def fake_kernels(o, ctx):
        given.append(min(ctx.budget.left(), 1.5 * o.estimate_s))
        now[0] += X.KERNELS_MIN_S

    ctx = _context(tmp_path, budget=budget, guess=CostGuess(kernels_task_s=80.0))
    outcomes = X.execute([kernels, kernels], ctx, runners={G.KERNELS: fake_kernels})
    assert [o.status for o in outcomes] == ["ok", "skipped"]
    assert given == [pytest.approx(X.KERNELS_MIN_S + 5)]
    assert "needs ~30 s, 5 s left" in outcomes[1].detail


def test_a_failing_task_is_reported_and_the_next_one_runs(tmp_path):
    def boom(o, ctx):
        raise RuntimeError("CUDA out of memory")

    plan = [G.Task(kind=G.OVERHEAD, name=n, tier=1) for n in ("a", "b")]
    outcomes = X.execute(plan, _context(tmp_path), runners={G.OVERHEAD: boom})
    assert [o.status for o in outcomes] == ["failed", "failed"]
    assert "CUDA out of memory" in outcomes[0].detail
    assert (tmp_path / "logs" / "errors.log").read_text().count(
        "RuntimeError: CUDA out of memory") == 2


def test_profile_runs_failing_alike_skip_the_other_profiles_but_not_the_kernels(tmp_path):
    """Two profile runs failing with one cause (told apart from their log names) stop the
    other profile runs, which would fail alike at the device's expense; the kernel timings,
    which do not profile, still run."""
    profiles = [t for t in G.make_plan(G.DRY) if t.kind == G.PROFILE][:4]
    plan = [*profiles, G.Task(kind=G.KERNELS, name="kernel timings", tier=4)]

    def broken(o, ctx):
        raise X.ProfileFailed(f"CUDA error: invalid argument (logs/{o.task.name}.log)")

    ran = []
    outcomes = X.execute(plan, _context(tmp_path), runners={
        G.PROFILE: broken, G.KERNELS: lambda o, ctx: ran.append(o.task.name)})
    assert [o.status for o in outcomes] == ["failed", "failed", "skipped", "skipped", "ok"]
    assert outcomes[2].detail == ("the last 2 profile runs failed alike: ProfileFailed: CUDA "
                                  "error: invalid argument")
    assert ran == ["kernel timings"]

    def differently(o, ctx):
        raise X.ProfileFailed(f"failure {o.task.name}")

    outcomes = X.execute(plan, _context(tmp_path), runners={
        G.PROFILE: differently, G.KERNELS: lambda o, ctx: None})
    assert [o.status for o in outcomes] == ["failed"] * 4 + ["ok"]


def test_a_profile_the_library_refuses_fails_its_task_with_the_reason(tmp_path):
    """A profile run goes through kfacperf.runtime.runner.profile; a run it refuses (here: no
    CUDA device) fails the task with the library's reason, in the run's log too."""
    settings = replace(G.DRY, device="cuda")
    run = next(t for t in G.make_plan(settings) if t.run is not None)
    [o] = X.execute([run], _context(tmp_path, settings))
    assert o.status == "failed" and "no CUDA device" in o.detail
    log = (tmp_path / "logs" / f"{run.run.name}.log").read_text()
    assert log.startswith("$ kfacperf profile --workload resnet20") and "no CUDA device" in log


def test_the_plan_fits_the_budget_on_the_guesses_except_its_tail():
    plan = G.make_plan(G.FULL)
    guess = CostGuess()
    total = sum(guess.task_s(t) for t in plan)
    up_to_kernels = sum(guess.task_s(t) for t in plan if t.tier <= 4)
    assert up_to_kernels < DEFAULT_BUDGET_S < total + 60
    text = R.plan_text(plan, guess, DEFAULT_BUDGET_S)
    assert "resnet50-bf16-sgd-b32" in text.splitlines()[1]
    assert "time guard" in text.splitlines()[-1]


def test_a_gpu_trace_without_cuda_events_or_telemetry_is_flagged():
    full = {"power": 12, "clocks": 12, "memory": 12, "utilisation": 12}
    assert C.check_problems({"timing": "cuda_events", "telemetry_samples": 12,
                             "telemetry_rows": full}, gpu=True) == []
    cpu_like = {"timing": "perf_counter_ns", "telemetry_samples": 0}
    assert C.check_problems(cpu_like, gpu=True) == [
        "timed by perf_counter_ns, not CUDA events", "no NVML telemetry"]
    assert C.check_problems(cpu_like, gpu=False) == []
    no_power = {"timing": "cuda_events", "telemetry_samples": 12,
                "telemetry_rows": {**full, "power": 0, "utilisation": 0}}
    assert C.check_problems(no_power, gpu=True) == ["telemetry without power, utilisation"]


def test_telemetry_rows_count_the_samples_that_measured_each_quantity():
    import math

    from kfacperf.trace.schema import telemetry_frame

    nan = math.nan
    tel = telemetry_frame({"rank": [0, 0, 0], "gpu": [0, 0, 0], "t_us": [0.0, 1e5, 2e5],
                           "power_w": [300.0, nan, 310.0], "sm_clock_mhz": [1980.0] * 3,
                           "mem_clock_mhz": [2619.0, 2619.0, nan],
                           "mem_used_mib": [1000.0] * 3, "gpu_util_pct": [99.0] * 3})
    assert C.telemetry_rows(tel) == {"power": 2, "clocks": 2, "memory": 3, "utilisation": 0}
    assert C.telemetry_rows(None) == {"power": 0, "clocks": 0, "memory": 0, "utilisation": 0}
    # every quantity is measured by columns the telemetry table has (one spelling)
    from kfacperf.trace.schema import TELEMETRY_COLUMNS

    assert {c for cols in C.TELEMETRY_QUANTITIES.values() for c in cols} <= set(
        TELEMETRY_COLUMNS)


def test_a_gap_says_how_much_of_it_is_the_preconditioners_modelled_work():
    checks = {"timing": "cuda_events", "telemetry_samples": 3,
              "telemetry_rows": {"power": 3, "clocks": 3, "memory": 3, "utilisation": 3},
              "coverage": {"problems": ["plain steps: a median 6.0% of the step in no stage "
                                        "(limit 5%)"], "median_host_work_pct": 5.2}}
    assert C.check_problems(checks, gpu=True) == [
        "plain steps: a median 6.0% of the step in no stage (limit 5%); 5.2% is the "
        "preconditioner's work between stages, which the model adds"]


def test_the_nvtx_check_is_skipped_where_neither_tool_is_installed(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    task = G.Task(kind=G.NSYS, name="nvtx check (nsys or ncu)", tier=7)
    [o] = X.execute([task], _context(tmp_path, G.FULL))
    assert (o.status, o.detail) == ("skipped", "neither nsys nor ncu is installed here")


def _fake_ncu(bin_dir: Path, *, kernels: int) -> None:
    """An ``ncu`` that records its arguments and prints what ncu prints per kernel."""
    bin_dir.mkdir(exist_ok=True)
    lines = "".join(f'echo "==PROF== Profiling \\"kernel_{i}\\" - {i}: 0%....100%"\n'
                    for i in range(kernels))
    (bin_dir / "ncu").write_text(f'#!/bin/sh\necho "$@" > "{bin_dir}/args"\n{lines}'
                                 + ("" if kernels else 'echo "==WARNING== No kernels were '
                                    'profiled."\n'))
    (bin_dir / "ncu").chmod(0o755)


def test_without_nsys_the_nvtx_check_asks_ncu_for_kernels_inside_a_range(tmp_path,
                                                                          monkeypatch):
    bin_dir = tmp_path / "bin"
    _fake_ncu(bin_dir, kernels=3)
    monkeypatch.setenv("PATH", str(bin_dir))
    task = G.Task(kind=G.NSYS, name="nvtx check (nsys or ncu)", tier=7)
    [o] = X.execute([task], _context(tmp_path, G.FULL))
    assert (o.status, o.detail) == ("ok", "ncu profiled 3 kernel(s) inside NVTX range "
                                          "kfacperf@forward/")
    args = (bin_dir / "args").read_text().split()
    assert args[:4] == ["--nvtx", "--nvtx-include", "kfacperf@forward/", "--launch-count"]
    assert "kfacperf.cli" in args and "--optimizer" in args
    assert args[args.index("--optimizer") + 1] == "sgd"
    assert "==PROF== Profiling" in (tmp_path / "logs" / "nvtx-check.log").read_text()
    _fake_ncu(bin_dir, kernels=0)  # the ranges never arrived: a failed check, not an ok
    [o] = X.execute([task], _context(tmp_path, G.FULL))
    assert o.status == "failed" and "profiled 0 kernel(s) inside NVTX range" in o.detail


def test_with_nsys_the_nvtx_check_keeps_only_the_range_summary(tmp_path, monkeypatch):
    """nsys is preferred: its report is turned into the NVTX summary CSV, and the report
    itself (large) is deleted."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nsys").write_text(
        '#!/bin/sh\n'
        'if [ "$1" = profile ]; then\n'
        '  while [ "$1" != -o ]; do shift; done; touch "$2.nsys-rep"; exit 0\n'
        'fi\n'
        'while [ "$1" != --output ]; do shift; done\n'
        'printf "Range,Instances\\n:step,3\\n:forward,3\\n" > "$2_nvtx_sum.csv"\n')
    (bin_dir / "nsys").chmod(0o755)
    _fake_ncu(bin_dir, kernels=1)  # present too, and not used
    monkeypatch.setenv("PATH", str(bin_dir))
    task = G.Task(kind=G.NSYS, name="nvtx check (nsys or ncu)", tier=7)
    [o] = X.execute([task], _context(tmp_path, G.FULL))
    assert (o.status, o.detail) == ("ok", "nvtx_nvtx_sum.csv: 2 NVTX range name(s)")
    assert not list((tmp_path / "nsys").glob("*.nsys-rep"))
    assert not (bin_dir / "args").exists()
