"""The demo's settings, phase runner and failure handling, without the full pipeline."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kfacperf.cli import main
from kfacperf.pipeline import (
    ClusterTarget,
    DemoConfig,
    DemoPhaseError,
    quick_config,
    run_demo,
)
from kfacperf.pipeline import demo as demo_mod
from kfacperf.pipeline.phases import DemoStepFailed, PhaseRunner


@pytest.mark.parametrize("settings, needle", [
    ({"strategies": ("sgd",)}, "unknown strategy 'sgd'"),
    ({"strategies": ()}, "at least one K-FAC strategy"),
    ({"strategies": ("spngd", "spngd")}, "strategy given twice"),
    ({"steps": 0}, "steps must be a positive integer"),
    ({"warmup": -1}, "warmup must be a non-negative integer"),
    ({"batch_size": 0}, "batch_size must be a positive integer"),
    ({"predict_nprocs": (1,)}, "predict_nprocs are multi-process runs"),
    ({"commbench_sizes": (4096, 4096)}, "two or more message sizes"),
    ({"scale_factor_interval": 3, "scale_inverse_interval": 10}, "must be a multiple"),
    ({"scale_gpus": (0, 8)}, "scale_gpus must be a positive integer"),
    ({"whatif_bandwidth": (0.0,)}, "bandwidth scales must be > 0"),
])
def test_bad_settings_are_named(settings, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        DemoConfig(**settings)


def test_quick_config_is_small_and_keeps_overrides():
    q = quick_config(workload="mlp", steps=4)
    full = DemoConfig()
    assert q.steps == 4 and q.warmup < full.warmup
    assert len(q.scale_gpus) < len(full.scale_gpus) and max(q.scale_gpus) == 4096
    assert q.nprocs == (1, 2) and q.profiled_strategies == ("sgd", "spngd")


def test_the_users_own_model_gets_an_absolute_reference_and_file_safe_names(tmp_path,
                                                                          monkeypatch):
    from kfacperf.pipeline.config import DemoPaths

    monkeypatch.chdir(tmp_path)
    config = DemoConfig(workload="nets/my_net.py:build")
    assert config.workload == f"{tmp_path}/nets/my_net.py:build"
    paths = DemoPaths(root=tmp_path / "demo")
    assert (paths.trace(config.workload, "spngd", 2)
            == tmp_path / "demo/traces/my_net-build-spngd-p2")
    assert paths.local_prediction(config.workload).name == "my_net-build-local"


def test_out_inside_models_and_bad_presets_fail_before_anything_runs(tmp_path, monkeypatch):
    models = tmp_path / "models"
    models.mkdir()
    monkeypatch.setenv("KFACPERF_MODELS", str(models))
    with pytest.raises(ValueError, match="inside the committed models"):
        run_demo(DemoConfig(out=str(models / "demo")))
    assert not (models / "demo").exists()
    monkeypatch.delenv("KFACPERF_MODELS")
    out = tmp_path / "demo"
    with pytest.raises(ValueError, match="no-such-cluster"):
        run_demo(quick_config(out=str(out), clusters=(
            ClusterTarget(cluster="no-such-cluster", device="h100"),)))
    with pytest.raises(ValueError, match="unknown workload 'nope'"):
        run_demo(quick_config(out=str(out), workload="nope"))
    with pytest.raises(ValueError, match="unknown convergence preset 'nope'"):
        run_demo(quick_config(out=str(out), plan_convergence=("nope",)))
    assert not out.exists()


def test_phase_output_goes_to_its_log_and_a_failure_names_the_phase(tmp_path):
    stream = io.StringIO()
    runner = PhaseRunner(total=3, log_dir=tmp_path / "logs", stream=stream)

    def noisy() -> int:
        print("python-level line")
        os.write(2, b"fd-level line\n")
        subprocess.run([sys.executable, "-c", "print('child process line')"], check=True)
        return 7

    assert runner.run("first phase", noisy, note=lambda v: f"value {v}") == 7
    log = tmp_path / "logs" / "01-first-phase.log"
    text = log.read_text()
    for line in ("python-level line", "fd-level line", "child process line"):
        assert line in text and line not in stream.getvalue()
    assert runner.run("quiet phase", lambda: None) is None
    assert not (tmp_path / "logs" / "02-quiet-phase.log").exists()  # empty logs are dropped

    def broken() -> None:
        print("working on it")
        raise DemoStepFailed("rank 1 stopped at step 3")

    with pytest.raises(DemoPhaseError) as info:
        runner.run("third phase", broken)
    err = info.value
    assert err.phase == "third phase" and err.finished == ("first phase", "quiet phase")
    assert "phase 'third phase' failed: rank 1 stopped at step 3" in str(err)
    assert "working on it" in str(err) and str(err.log) in str(err)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3 and "value 7" in lines[0] and "FAILED after" in lines[2]
    assert lines[0].startswith("[1/3] first phase") and lines[2].startswith("[3/3] third phase")


def test_a_failing_phase_stops_the_demo_and_keeps_what_finished(tmp_path, monkeypatch):
    real = demo_mod._profile
    calls = []

    def profile_then_fail(config, paths, strategy, nproc):
        calls.append((strategy, nproc))
        if len(calls) == 2:
            raise DemoStepFailed("the run failed (torchrun exited with status 1)")
        return real(config, paths, strategy, nproc)

    monkeypatch.setattr(demo_mod, "_profile", profile_then_fail)
    out = tmp_path / "demo"
    config = quick_config(out=str(out), workload="mlp",
                          workload_options={"in_features": 8, "hidden": [8]}, steps=1, warmup=0,
                          batch_size=4)
    stream = io.StringIO()
    with pytest.raises(DemoPhaseError) as info:
        run_demo(config, stream=stream)
    assert info.value.phase == "profile spngd, 1 process"
    assert info.value.finished == ("profile sgd, 1 process",)
    assert (out / "traces" / "mlp-sgd-p1" / "events.parquet").is_file()
    assert not (out / "index.html").exists() and not (out / "demo.json").exists()
    assert "FAILED" in stream.getvalue().splitlines()[-1]


def test_cli_reports_bad_flags_and_failed_phases(tmp_path, monkeypatch, capsys):
    assert main(["demo", "--strategies", "sgd", "--out", str(tmp_path / "a")]) == 2
    assert "unknown strategy 'sgd'" in capsys.readouterr().err
    assert main(["demo", "--steps", "0", "--out", str(tmp_path / "b")]) == 2
    assert "steps must be a positive integer" in capsys.readouterr().err

    import kfacperf.pipeline as pipeline

    def fail(config, **kwargs):
        raise DemoPhaseError(phase="commbench (gloo, 2 ranks)", message="no fit",
                             log=Path("x.log"), finished=("profile sgd, 1 process",))

    monkeypatch.setattr(pipeline, "run_demo", fail)
    assert main(["demo", "--quick", "--out", str(tmp_path / "c")]) == 1
    err = capsys.readouterr().err
    assert "phase 'commbench (gloo, 2 ranks)' failed: no fit" in err
    assert "profile sgd, 1 process" in err


def test_an_earlier_demos_directory_is_reused_without_force(tmp_path):
    from kfacperf.pipeline.config import DemoPaths

    paths = DemoPaths(root=tmp_path / "demo")
    for d in (paths.traces, paths.logs, paths.predictions, paths.models):
        d.mkdir(parents=True)
    for f in (paths.report, paths.results, paths.validation, paths.plan):
        f.write_text("{}")
    demo_mod.check_out(paths.root)  # every file a finished demo writes
    (paths.root / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="--force"):
        demo_mod.check_out(paths.root)
    demo_mod.check_out(paths.root, force=True)


def test_an_interrupt_stops_the_demo_even_after_a_complete_profile(tmp_path, monkeypatch):
    from kfacperf.runtime import runner

    def interrupted_after_the_last_step(cfg, force=False):
        return runner.ProfileOutcome(
            ok=True, trace=object(), interrupted="SIGINT",
            message="interrupted by SIGINT after every rank had recorded every step")

    monkeypatch.setattr(runner, "profile", interrupted_after_the_last_step)
    config = quick_config(out=str(tmp_path / "demo"), workload="mlp",
                          workload_options={"in_features": 8, "hidden": [8]})
    with pytest.raises(DemoPhaseError) as info:
        run_demo(config, stream=io.StringIO())
    assert info.value.phase == "profile sgd, 1 process" and "SIGINT" in str(info.value)


def test_the_plan_phase_replaces_an_earlier_demos_plan(tmp_path):
    from kfacperf.pipeline.config import DemoPaths
    from kfacperf.pipeline.scale_phases import plan_on_cluster
    from kfacperf.plan.result import load_plan

    config = quick_config(workload="mlp", out=str(tmp_path / "demo"))
    paths = DemoPaths(root=tmp_path / "demo")
    paths.root.mkdir(parents=True)
    paths.plan.write_text("{}")  # what an earlier demo left
    result = plan_on_cluster(config, paths)
    assert load_plan(paths.plan).gpus == result.gpus
