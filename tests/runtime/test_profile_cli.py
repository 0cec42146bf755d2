"""`kfacperf profile` and `kfacperf export` end to end.

Two multi-process launches: a successful 2-rank KAISA run started under the user's own
torchrun, and a 2-rank SP-NGD run started by `kfacperf profile` in which rank 1 dies.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from kfacperf.cli import main
from kfacperf.trace.schema import RUN_KEYS
from kfacperf.trace.store import load_trace
from kfacperf.trace.summary import summarize

SMALL = ["--workload", "mlp", "--workload-option", "in_features=24",
         "--workload-option", "hidden=[16,12]", "--batch-size", "8"]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("KFACPERF_TEST_CRASH_AFTER", None)
    return env


def test_two_ranks_under_an_existing_torchrun(tmp_path):
    out = tmp_path / "kaisa"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", "-m", "kfacperf.cli", "profile", *SMALL, "--optimizer", "kfac", "--strategy",
           "kaisa", "--grad-worker-fraction", "0.5", "--steps", "3", "--warmup", "1",
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "step time:" in proc.stdout and proc.stdout.count("step time:") == 1  # rank 0 only
    assert "[kfacperf] step 4/4 (measured)" in proc.stderr  # progress: not on stdout
    assert "[kfacperf]" not in proc.stdout

    trace = load_trace(out)
    assert not (out / "parts").exists()
    run = trace.run
    assert not [k for k in RUN_KEYS if k not in run]
    assert (run["world_size"], run["strategy"], run["optimizer"]) == (2, "kaisa", "kfac")
    assert (run["grad_worker_fraction"], run["batch_per_rank"]) == (0.5, 8)
    assert (run["steps"], run["warmup"], run["threads_per_rank"]) == (3, 1, 1)
    assert run["completed"] is True and "profile" in run["command"]
    assert run["device"]["kind"] == "cpu" and run["device"]["gpu"] is None
    assert run["flush_denormal"] is (platform.machine() in ("x86_64", "AMD64"))
    assert run["workload_options"] == {"in_features": 24, "hidden": [16, 12]}
    if platform.libc_ver()[0] == "glibc":  # freed memory kept in the process by default
        assert run["heap"] == "kept"
    assert run["page_faults_per_step"] >= 0

    ev = trace.events
    for rank in (0, 1):
        steps = ev[(ev["rank"] == rank) & (ev["stage"] == "step")]["step"].tolist()
        assert sorted(steps) == [0, 1, 2, 3]
    stages = set(ev["stage"].astype(str))
    # (f = 1/2 at P = 2: one gradient worker per layer, the one that inverts: no inverse_comm)
    assert {"forward", "backward", "factor_compute", "factor_comm", "inverse",
            "grad_comm", "precondition", "precond_comm", "update", "step"} <= stages
    # the DDP hook's bytes, through timer and trace, add up to every gradient in fp32
    from kfacperf.workloads import get_workload

    model = get_workload("mlp", in_features=24, hidden=(16, 12)).build_model()
    n_params = sum(p.numel() for p in model.parameters())
    grad = ev[ev["stage"] == "grad_comm"].groupby(["rank", "step"])["bytes"].sum()
    assert set(grad.tolist()) == {4 * n_params}
    # every stage of a step lies within that step's own row on its rank
    spans = ev[ev["stage"] == "step"].set_index(["rank", "step"])
    for r in ev[ev["stage"] != "step"].itertuples():
        s = spans.loc[(r.rank, r.step)]
        assert s.start_us - 1 <= r.start_us and r.start_us + r.dur_us <= s.start_us + s.dur_us + 1
    s = summarize(trace)
    assert s.measured_steps == 3 and s.comm_us > 0


def test_a_rank_that_aborts_while_exiting_after_a_complete_run_is_a_warning(tmp_path):
    """gloo can abort a rank while Python finalizes, after the trace is complete: the run
    is complete (exit 0) and the user is warned; every step of every rank is there."""
    out = tmp_path / "exit"
    env = _env()
    env["KFACPERF_TEST_CRASH_AFTER"] = "1:exit"
    cmd = [sys.executable, "-m", "kfacperf.cli", "profile", *SMALL, "--optimizer", "sgd",
           "--nproc", "2", "--steps", "2", "--warmup", "1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "kfacperf profile: warning: rank 1 was killed by SIGABRT" in proc.stderr
    assert "the trace is complete" in proc.stderr and "step time:" in proc.stdout
    trace = load_trace(out)
    assert trace.completed
    ev = trace.events
    assert ev[ev["stage"] == "step"].groupby("rank")["step"].nunique().to_dict() == {0: 3, 1: 3}


def test_a_rank_that_dies_leaves_its_finished_steps_and_a_clear_error(tmp_path):
    out = tmp_path / "crash"
    env = _env()
    env["KFACPERF_TEST_CRASH_AFTER"] = "1:2"  # rank 1 exits abruptly after step 2
    cmd = [sys.executable, "-m", "kfacperf.cli", "profile", *SMALL, "--optimizer", "kfac",
           "--strategy", "spngd", "--nproc", "2", "--steps", "5", "--warmup", "1",
           "--timeout", "20", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    err = proc.stderr
    assert "kfacperf profile: error: the run failed: rank 1 exited with status 13." in err
    assert "rank 1: 3/6 steps recorded, last finished step 2; exited with status 13" in err
    assert "marked incomplete (completed=false)" in err
    trace = load_trace(out)
    assert trace.completed is False and trace.run["completed"] is False
    ev = trace.events
    steps = {r: sorted(ev[(ev["rank"] == r) & (ev["stage"] == "step")]["step"]) for r in (0, 1)}
    assert steps[1] == [0, 1, 2]
    assert steps[0][:2] == [0, 1] and max(steps[0]) <= 3
    finished = ev[(ev["rank"] == 1) & (ev["step"] == 2)]
    assert {"forward", "backward", "factor_comm", "update"} <= set(finished["stage"].astype(str))
    assert summarize(trace).measured_steps >= 2  # an incomplete trace still summarizes


BASELINE = (Path(__file__).resolve().parents[2] / "traces" / "reference" / "p1"
            / "resnet20-sgd-b32-r1")
"""A committed one-process SGD trace of resnet20 at batch 32."""


def test_bad_input_is_a_clear_error_before_any_process_starts(tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    cases = [
        (["--workload", "mlp", "--out", str(tmp_path / "full")], "already exists and is not empty"),
        (["--workload", "nope", "--out", str(tmp_path / "a")], "unknown workload 'nope'"),
        (["--workload", "mlp", "--workload-option", "depth=3", "--out", str(tmp_path / "b")],
         "no option(s) depth"),
        (["--workload", "mlp", "--optimizer", "sgd", "--strategy", "spngd"],
         "--optimizer sgd runs the DDP baseline"),
        (["--workload", "mlp", "--factor-interval", "2", "--inverse-interval", "3"],
         "--inverse-interval (3) must be a multiple of --factor-interval (2)"),
        (["--workload", "mlp", "--nnodes", "2"], "needs --rdzv-endpoint"),
        (["--workload", "mlp", "--optimizer", "sgd", "--fisher", "mc"],
         "--bn-blocks and --fisher are K-FAC settings"),
        (["--workload", "mlp", "--strategy", "kaisa", "--fused", "--out", str(tmp_path / "d")],
         "--fused is an SP-NGD option (one fused all-reduce); --strategy kaisa does not take it"),
        (["--workload", "mlp", "--optimizer", "sgd", "--fused"], "--fused is an SP-NGD option"),
        (["--workload", "mlp", "--nproc", "3", "--strategy", "kaisa", "--grad-worker-fraction",
          "0.5", "--out", str(tmp_path / "e")],
         "--grad-worker-fraction: kaisa grad_worker_fraction=0.5 gives 1.5 gradient workers"),
        (["--workload", "mlp", "--nproc", "2", "--out", str(tmp_path / "f"), "--baseline",
          str(BASELINE)], "has workload='resnet20' but --workload/--nproc/--batch-size has "
                          "workload='mlp'"),
        (["--workload", "resnet20", "--batch-size", "16", "--out", str(tmp_path / "g"),
          "--baseline", str(BASELINE)], "has batch_per_rank=32 but"),
    ]
    import torch

    if not torch.cuda.is_available():
        cases.append((["--workload", "mlp", "--device", "cuda", "--out", str(tmp_path / "c")],
                      "--device cuda: no CUDA device is available"))
    for argv, message in cases:
        assert main(["profile", *argv]) == 2
        err = capsys.readouterr().err
        assert "kfacperf profile: error:" in err and message in err, (argv, err)
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    assert not any((tmp_path / d).exists() for d in "defg")  # nothing ran
    from kfacperf.runtime.config import ProfileConfig

    assert ProfileConfig(workload="mlp", out="t", strategy="spngd", fused=True).fused


def test_export_command(tmp_path, capsys):
    from kfacperf.trace.store import write_trace

    events = {"rank": [0, 1], "step": [0, 0], "stage": ["forward", "grad_comm"],
              "layer": ["", ""], "lane": ["compute", "comm"], "start_us": [0.0, 5.0],
              "dur_us": [10.0, 3.0], "bytes": [0, 64], "flops": [0.0, 0.0]}
    write_trace(tmp_path / "t", run={"world_size": 2, "completed": True}, events=events)
    assert main(["export", "--chrome", str(tmp_path / "t"), "--out", str(tmp_path / "t.json")]) == 0
    doc = json.loads((tmp_path / "t.json").read_text())
    x = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    assert [(e["pid"], e["name"], e["args"]["bytes"]) for e in x] == [
        (0, "forward", 0), (1, "grad_comm", 64)]
    assert main(["export", "--chrome", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_one_process_runs_in_process_sgd_baseline_and_isolate(tmp_path, capsys):
    sgd, kfac = tmp_path / "sgd", tmp_path / "kfac"
    common = [*SMALL, "--nproc", "1", "--steps", "3", "--warmup", "1"]
    assert main(["profile", *common, "--optimizer", "sgd", "--default-heap", "--out",
                 str(sgd)]) == 0
    assert main(["profile", *common, "--optimizer", "kfac", "--strategy", "local", "--isolate",
                 "--out", str(kfac), "--baseline", str(sgd)]) == 0
    out = capsys.readouterr().out
    assert "overhead over SGD:" in out
    a, b = load_trace(sgd), load_trace(kfac)
    assert (a.run["strategy"], a.run["world_size"], a.completed) == ("sgd", 1, True)
    assert a.run["heap"] == "default"
    assert set(a.events["stage"].astype(str)) == {"step", "forward", "backward", "update"}
    assert b.run["isolate"] is True and "inverse" in set(b.events["stage"].astype(str))
    s = summarize(b, baseline=a)
    assert s.kfac_overhead == pytest.approx(s.step_us / summarize(a).step_us)
    assert f"{s.kfac_overhead:.3f}x" in out
    assert "RANK" not in os.environ  # the in-process rank's environment was restored


def test_rank_commands_for_one_and_several_nodes():
    from kfacperf.runtime.config import ProfileConfig
    from kfacperf.runtime.runner import (
        launch_command,
        rank_environments,
        under_torchrun,
        worker_command,
    )

    one = ProfileConfig(workload="mlp", out="t", nproc=4)
    cmd = worker_command(one)
    assert cmd[-3:-1] == ["-m", "kfacperf.runtime.worker"]
    assert ProfileConfig.from_json(cmd[-1]) == one  # the ranks get exactly this config
    envs = rank_environments(one, {"PATH": "/bin"})
    assert [e["RANK"] for e in envs] == ["0", "1", "2", "3"]
    assert {e["MASTER_ADDR"] for e in envs} == {"127.0.0.1"}  # the store binds to loopback
    assert len({e["MASTER_PORT"] for e in envs}) == 1 and envs[0]["WORLD_SIZE"] == "4"
    multi = ProfileConfig(workload="mlp", out="t", nproc=8, nnodes="2", node_rank=1,
                          rdzv_endpoint="head:29500")
    cmd = launch_command(multi)
    assert cmd[1:3] == ["-m", "kfacperf.runtime.torchrun"]
    assert cmd[cmd.index("--nproc-per-node") + 1] == "8" and "--standalone" not in cmd
    assert cmd[-3:-1] == ["-m", "kfacperf.runtime.worker"]
    for flag, value in (("--nnodes", "2"), ("--node-rank", "1"), ("--rdzv-endpoint", "head:29500"),
                        ("--rdzv-backend", "c10d"), ("--max-restarts", "0")):
        assert cmd[cmd.index(flag) + 1] == value
    env = {k: "0" for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    assert under_torchrun(env) and not under_torchrun({"RANK": "0"})


def test_fisher_settings_are_recorded_and_the_mc_pass_is_a_backward_row(tmp_path):
    out = tmp_path / "mc"
    assert main(["profile", *SMALL, "--nproc", "1", "--steps", "2", "--warmup", "1",
                 "--strategy", "local", "--factor-interval", "2", "--inverse-interval", "2",
                 "--bn-blocks", "unit", "--fisher", "mc", "--out", str(out)]) == 0
    trace = load_trace(out)
    assert (trace.run["bn_blocks"], trace.run["fisher"]) == ("unit", "mc")
    ev = trace.events[trace.events["stage"].astype(str) == "backward"]
    rows = sorted(zip(ev["step"], ev["layer"].astype(str)))
    assert rows == [(0, ""), (0, "mc_fisher"), (1, ""), (2, ""), (2, "mc_fisher")]


def test_node_flags_are_checked_before_anything_runs(tmp_path, capsys):
    out = tmp_path / "t"
    (out).mkdir()
    (out / "run.json").write_text("{}")  # an earlier trace: --node-rank must not bypass --force
    cases = [
        (["--node-rank", "1"], "--node-rank must be 0 on one node"),
        (["--nnodes", "abc", "--rdzv-endpoint", "127.0.0.1:29400"], "--nnodes must be"),
        (["--nnodes", "0", "--rdzv-endpoint", "127.0.0.1:29400"], "--nnodes must be"),
        (["--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "127.0.0.1:29400"],
         "--node-rank must be in [0, 1]"),
    ]
    for argv, message in cases:
        assert main(["profile", *SMALL, "--steps", "1", "--out", str(out), *argv]) == 2
        err = capsys.readouterr().err
        assert "kfacperf profile: error:" in err and message in err, (argv, err)
    assert (out / "run.json").read_text() == "{}"


def test_a_baseline_is_checked_against_the_default_batch_before_the_run(tmp_path, capsys):
    out = tmp_path / "t"
    assert main(["profile", "--workload", "resnet20", "--out", str(out), "--baseline",
                 str(BASELINE)]) == 2  # resnet20's default batch is 128, the baseline's 32
    assert "has batch_per_rank=32 but" in capsys.readouterr().err
    assert not out.exists()


USER_MODEL = '''
import torch
from torch import nn


def build(fail_after: int = 2):
    calls = [0]

    def make_batch(n, gen):
        return torch.randn(n, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)

    def loss_fn(outputs, targets):
        calls[0] += 1
        if calls[0] > fail_after:
            raise ValueError("the user's loss gave up")
        return nn.functional.cross_entropy(outputs, targets)

    return nn.Sequential(nn.Linear(6, 3)), make_batch, loss_fn


def wrong_inputs():
    def make_batch(n, gen):
        return torch.randn(n, 7, generator=gen), torch.randint(0, 3, (n,), generator=gen)

    return nn.Sequential(nn.Linear(6, 3)), make_batch
'''


def test_a_users_error_mid_run_on_one_process_is_a_failed_run(tmp_path, capsys):
    (tmp_path / "m.py").write_text(USER_MODEL)
    out = tmp_path / "t"
    assert main(["profile", "--workload", f"{tmp_path / 'm.py'}:build", "--batch-size", "4",
                 "--steps", "4", "--warmup", "1", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "the run failed: rank 0 failed: ValueError: the user's loss gave up" in err, err
    assert "rank 0: 2/5 steps recorded" in err
    trace = load_trace(out, partial=True)
    assert trace.run["completed"] is False and "gave up" in trace.run["failure"]


def test_a_forward_that_fails_on_make_batch_inputs_is_one_line(tmp_path, capsys):
    (tmp_path / "m.py").write_text(USER_MODEL)
    out = tmp_path / "t"
    assert main(["profile", "--workload", f"{tmp_path / 'm.py'}:wrong_inputs",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "the model's forward on make_batch(1, generator)'s inputs failed: RuntimeError" \
        in err and "Traceback" not in err, err
    assert not out.exists()


def test_a_rank_that_fails_under_the_users_torchrun_says_why_in_one_line(tmp_path,
                                                                        monkeypatch):
    from kfacperf.runtime import runner, worker
    from kfacperf.runtime.config import ProfileConfig
    from kfacperf.trace.store import read_run, write_run

    out = tmp_path / "t"
    out.mkdir()
    write_run(out, {"world_size": 2, "completed": False})
    for k, v in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "x",
                 "MASTER_PORT": "1", runner.PREPARED_ENV: "1"}.items():
        monkeypatch.setenv(k, v)

    def fails(config):
        raise RuntimeError("the model broke in step 3")

    monkeypatch.setattr(worker, "run_worker", fails)
    outcome = runner.profile(ProfileConfig(workload="mlp", out=str(out)))
    assert not outcome.ok and outcome.exit_status == 1
    assert outcome.message.startswith("rank 0 failed: RuntimeError: the model broke in step 3")
    assert read_run(out / "run.json")["failure"] == (
        "rank 0 failed: RuntimeError: the model broke in step 3")


def test_a_per_rank_export_replaced_with_force_keeps_no_rank_of_the_old_one(tmp_path):
    from kfacperf.trace.store import write_trace

    def trace(name, ranks):
        events = {"rank": list(ranks), "step": [0] * len(ranks),
                  "stage": ["forward"] * len(ranks), "layer": [""] * len(ranks),
                  "lane": ["compute"] * len(ranks), "start_us": [0.0] * len(ranks),
                  "dur_us": [10.0] * len(ranks), "bytes": [0] * len(ranks),
                  "flops": [0.0] * len(ranks)}
        write_trace(tmp_path / name, run={"world_size": len(ranks), "completed": True},
                    events=events)
        return str(tmp_path / name)

    two, one, out = trace("two", [0, 1]), trace("one", [0]), tmp_path / "chrome"
    assert main(["export", "--chrome", two, "--per-rank", "--out", str(out)]) == 0
    assert main(["export", "--chrome", one, "--per-rank", "--out", str(out), "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["rank0.json"]


def test_an_interrupt_as_a_complete_run_ends_is_reported_as_an_interrupt(
        tmp_path, monkeypatch) -> None:
    """Ctrl-C that lands after every rank recorded every step: the trace is complete, and
    the outcome still says it was interrupted (a caller such as the demo must stop)."""
    from kfacperf.runtime import launch, runner, stopped_runs
    from kfacperf.runtime.config import ProfileConfig

    monkeypatch.setattr(launch, "start", lambda *a, **k: [])
    monkeypatch.setattr(launch, "supervise",
                        lambda *a, **k: launch.Supervision(ok=False, interrupted="SIGINT"))
    complete = object()
    monkeypatch.setattr(stopped_runs, "finished_trace", lambda config, out: complete)
    config = ProfileConfig(workload="mlp", out=str(tmp_path / "t"), nproc=2, steps=1, warmup=0)
    outcome = runner.profile(config)
    assert outcome.ok and outcome.trace is complete
    assert outcome.interrupted == "SIGINT" and "interrupted by SIGINT" in outcome.message


def test_more_cpu_threads_than_cores_is_a_warning_and_an_empty_out_an_error(
        monkeypatch, capsys) -> None:
    from kfacperf.runtime import runner
    from kfacperf.runtime.config import ProfileConfig

    monkeypatch.setattr(runner.os, "cpu_count", lambda: 4)
    fits = ProfileConfig(workload="mlp", out="t", nproc=2, threads_per_rank=2, device="cpu")
    assert runner.cpu_oversubscription(fits) == ""
    crowded = ProfileConfig(workload="mlp", out="t", nproc=3, threads_per_rank=2, device="cpu")
    assert "3 rank(s) x 2 thread(s) on 4 CPU core(s)" in runner.cpu_oversubscription(crowded)
    on_gpus = ProfileConfig(workload="mlp", out="t", nproc=8, device="cuda")
    assert runner.cpu_oversubscription(on_gpus) == ""
    assert main(["profile", "--workload", "mlp", "--out", "", "--steps", "1"]) == 2
    assert "--out must name a directory" in capsys.readouterr().err


def test_sequence_first_is_the_optimizers_batch_first_false() -> None:
    from kfacperf.cli.app import build_parser
    from kfacperf.cli.commands.profile import build_config

    parser = build_parser()
    base = ["profile", "--workload", "mlp", "--optimizer", "kfac", "--out", "x"]
    assert build_config(parser.parse_args(base)).batch_first is True
    assert build_config(parser.parse_args([*base, "--sequence-first"])).batch_first is False
