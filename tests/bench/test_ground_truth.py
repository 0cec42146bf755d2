"""kfacperf.bench.ground_truth: the plan, its order, the estimates and the time guard."""
from __future__ import annotations

from dataclasses import replace

import pytest

from kfacperf.bench import ground_truth as G
from kfacperf.bench.kernels import Budget
from kfacperf.cli import build_parser
from kfacperf.cli.commands.profile import build_config


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
    assert fresh == [(b, p) for b in (32, 128, 64, 256) for p in ("bf16", "tf32")]
    assert [t.name for t in plan[17:19]] == ["resnet50-bf16-kfac-1-1-b32",
                                             "resnet50-tf32-kfac-1-1-b32"]
    assert kinds[19] == G.KERNELS  # after the 1/1 traces that calibrate the inverse stage
    assert kinds[20:26] == [G.PROFILE] * 6
    assert kinds[26:] == [G.NSYS]
    assert [t.tier for t in plan] == sorted(t.tier for t in plan)
    names = [t.name for t in plan]
    assert len(set(names)) == len(names)
    assert G.make_plan(replace(G.FULL, nsys=False))[-1].kind == G.PROFILE


def test_every_run_is_a_valid_kfacperf_profile_command():
    for task in G.make_plan(G.FULL):
        if task.run is None:
            continue
        argv = task.run.argv(G.FULL)
        config = build_config(build_parser().parse_args(["profile", *argv]))
        r = task.run
        assert (config.workload, config.precision, config.batch_size) == (
            "resnet50", r.precision, r.batch)
        assert (config.steps, config.warmup, config.device) == (r.steps, r.warmup, "cuda")
        assert config.out == f"traces/{r.precision}/{r.name}"  # relative: no machine's paths
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
    guess = G.CostGuess()
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


def test_what_the_guard_cannot_fit_is_skipped_and_named(tmp_path, monkeypatch):
    now = [0.0]
    budget = Budget(100.0, clock=lambda: now[0])
    plan = [G.Task(kind=G.OVERHEAD, name=f"t{i}", tier=1) for i in range(3)]
    guess = G.CostGuess(overhead_task_s=40.0)
    ran = []

    def fake_overhead(o, settings, out):
        ran.append(o.task.name)
        now[0] += 45.0  # each takes a little longer than guessed

    monkeypatch.setattr(G, "_do_overhead", fake_overhead)
    (tmp_path / "logs").mkdir()
    lines: list[str] = []
    seen = []
    outcomes = G.execute(plan, G.DRY, tmp_path, budget=budget, guess=guess, log=lines.append,
                         after_each=lambda so_far: seen.append(len(so_far)))
    assert ran == ["t0", "t1"]
    assert seen == [1, 2, 3]  # the summary on disk is kept current, skipped tasks included
    assert [o.status for o in outcomes] == ["ok", "ok", "skipped"]
    assert "needs ~40 s, 10 s left" in outcomes[2].detail
    assert "skipped" in lines[-1]
    text = G.summary_text(outcomes)
    assert "2 ok, 0 failed, 1 skipped" in text and "skipped: t2" in text


def test_a_failing_task_is_reported_and_the_next_one_runs(tmp_path, monkeypatch):
    def boom(o, settings, out):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(G, "_do_overhead", boom)
    (tmp_path / "logs").mkdir()
    plan = [G.Task(kind=G.OVERHEAD, name=n, tier=1) for n in ("a", "b")]
    outcomes = G.execute(plan, G.DRY, tmp_path, budget=Budget(None), log=lambda s: None)
    assert [o.status for o in outcomes] == ["failed", "failed"]
    assert "CUDA out of memory" in outcomes[0].detail
    assert (tmp_path / "logs" / "errors.log").read_text().count(
        "RuntimeError: CUDA out of memory") == 2


def test_the_plan_fits_the_budget_on_the_guesses_except_its_tail():
    plan = G.make_plan(G.FULL)
    guess = G.CostGuess()
    total = sum(guess.task_s(t) for t in plan)
    up_to_kernels = sum(guess.task_s(t) for t in plan if t.tier <= 4)
    assert up_to_kernels < G.DEFAULT_BUDGET_S < total + 60
    text = G.plan_text(plan, guess, G.DEFAULT_BUDGET_S)
    assert "resnet50-bf16-sgd-b32" in text.splitlines()[1]
    assert "time guard" in text.splitlines()[-1]


def test_a_gpu_trace_without_cuda_events_or_telemetry_is_flagged():
    assert G.check_problems({"timing": "cuda_events", "telemetry_samples": 12}, gpu=True) == []
    cpu_like = {"timing": "perf_counter_ns", "telemetry_samples": 0}
    assert G.check_problems(cpu_like, gpu=True) == [
        "timed by perf_counter_ns, not CUDA events", "no NVML telemetry"]
    assert G.check_problems(cpu_like, gpu=False) == []


def test_the_nsys_check_is_skipped_where_nsys_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(G.shutil, "which", lambda name: None)
    (tmp_path / "logs").mkdir()
    task = G.Task(kind=G.NSYS, name="nvtx check under nsys", tier=7)
    [o] = G.execute([task], G.FULL, tmp_path, budget=Budget(None), log=lambda s: None)
    assert (o.status, o.detail) == ("skipped", "nsys is not installed here")
