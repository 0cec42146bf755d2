"""scripts/gpu-ground-truth.sh --dry-run: every output is there, well-formed and usable.

The dry run is the GPU plan tiny on the CPU (CIFAR ResNet-20, batch 2 and 4), so this checks
the script's wiring end to end without a GPU: the traces load with the project's loader and
calibrate/validate read them, and the JSON files hold what docs/gpu-ground-truth.md says.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kfacperf.bench import kernels as K
from kfacperf.cli import main
from kfacperf.pipeline.ground_truth import archive as A
from kfacperf.pipeline.ground_truth import plan as G
from kfacperf.pipeline.ground_truth.finish import main as finish_main
from kfacperf.sim.models import load_device
from kfacperf.trace.store import load_trace

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu-ground-truth.sh"


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The dry run as on a device machine: $OUT set (the return folder), the outputs in a
    folder of their own."""
    out = tmp_path_factory.mktemp("gpu-ground-truth")
    returned = tmp_path_factory.mktemp("returned")
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               OUT=str(returned))
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    return out, proc


def returned_folder(dry_run) -> Path:
    out, proc = dry_run
    return Path(next(line.split(": ", 1)[1] for line in
                     (out / "command.txt").read_text().splitlines()
                     if line.startswith("return folder: ")))


pytestmark = pytest.mark.slow


def test_the_dry_run_finishes_and_prints_the_summary(dry_run):
    out, proc = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "14 ok, 0 failed, 0 skipped" in proc.stdout
    assert "gpu-ground-truth: finished in" in proc.stdout
    for name in ("command.txt", "nvidia-smi.txt", "versions.txt", "env.json", "plan.txt",
                 "summary.txt", "summary.json", "timer_overhead.json", "kernels.json",
                 "kernels.txt", "ground-truth.log", "files.txt"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "command.txt").read_text().startswith(
        "command: scripts/gpu-ground-truth.sh --dry-run --out ")
    assert "torch " in (out / "versions.txt").read_text()
    assert not (out / "wheels.txt").exists()  # a dry run installs nothing
    listed = (out / "files.txt").read_text()
    assert "kernels.json" in listed and "traces/bf16/resnet20-bf16-sgd-b2/run.json" in listed


def test_the_return_folder_is_what_a_device_machine_hands_back(dry_run, tmp_path):
    """At most 8 files, two folders down, plain names: the archive of everything, the summary
    and the log; the archive unpacks to the output folder, byte for byte."""
    out, _ = dry_run
    returned = returned_folder(dry_run)
    assert sorted(p.name for p in returned.iterdir()) == [
        "ground-truth.log", A.ARCHIVE_NAME, "summary.txt"]
    assert A.return_problems(returned) == []
    A.unpack(returned / A.ARCHIVE_NAME, tmp_path / "back")
    back = {p.relative_to(tmp_path / "back"): p.read_bytes()
            for p in (tmp_path / "back").rglob("*") if p.is_file()}
    assert back == {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert (returned / "summary.txt").read_bytes() == (out / "summary.txt").read_bytes()


def test_finish_lands_checks_calibrates_and_validates_the_run(dry_run, tmp_path, capsys):
    returned = returned_folder(dry_run)
    into = tmp_path / "h200"
    rc = finish_main([str(returned / A.ARCHIVE_NAME), "--into", str(into)])
    printed = capsys.readouterr().out
    assert rc == 1  # tiny CPU runs at batch 2 do not predict batch 4 within the GPU targets
    assert "12 trace(s), 0 with a problem; 2 precision(s) validated" in printed
    runs = [t.run for t in G.make_plan(G.DRY) if t.run is not None]
    for r in runs:
        assert (into / r.precision / r.name / "run.json").is_file()
    checks = json.loads((into / "checks.json").read_text())
    assert sorted(checks) == sorted(r.name for r in runs)
    for name, c in checks.items():
        assert c["coverage"]["worst_double_pct"] < 1e-6, name
        assert c["telemetry_rows"] == {"power": 0, "clocks": 0, "memory": 0, "utilisation": 0}
    for precision in ("bf16", "tf32"):
        result = json.loads((into / f"validation-{precision}.json").read_text())
        assert sorted(r["run"] for r in result["runs"]) == sorted(
            r.name for r in runs if r.precision == precision and r.role == G.VALIDATION)
        assert all(Path(t).name.endswith("-b2") for t in result["calibration"]["traces"])
        device = load_device(into / f"dry-run-{precision}.toml")
        assert not device.stage("forward").assumed  # fitted, not guessed
    for name in ("kernels.json", "timer_overhead.json", "summary.txt", "env.json",
                 "versions.txt", "command.txt", "finish.txt"):
        assert (into / name).is_file(), name
    assert "targets missed" in (into / "finish.txt").read_text()
    assert "preset: not folded (a dry run's outputs)" in printed  # CPU peaks: no GPU preset
    assert not list(into.glob("*-preset.toml"))
    # the kernel timings' inverse terms beside the measured inverse steps of the 1/1 runs
    inverse = json.loads((into / "kernel-inverse.json").read_text())
    assert inverse["sizes"] == list(K.DRY_PLAN.inverse_sizes)
    assert sorted(r["trace"] for r in inverse["traces"]) == sorted(
        r.name for r in runs if r.label == "kfac-1-1")
    assert all(r["measured_ms"] > 0 and r["from_kernels_ms"] > 0 for r in inverse["traces"])
    table = (into / "accuracy.md").read_text().splitlines()
    assert [row.split(" | ")[:2] for row in table[2:]] == [["| bf16", "3"], ["| tf32", "3"]]
    bf16 = json.loads((into / "validation-bf16.json").read_text())
    assert f"{bf16['median_abs_error_pct']:.1f} %" in table[2]
    # six cells a row: a |error| in a cell is escaped
    assert all(len(row.replace("\\|", "").split("|")) == 8 for row in table)
    # an existing --into is never written into without --force
    assert finish_main([str(returned / A.ARCHIVE_NAME), "--into", str(into)]) == 2
    assert "--force" in capsys.readouterr().err


def test_a_gpu_run_lands_as_its_gpu_with_the_preset_proposed(dry_run, tmp_path, capsys):
    """The dry run's outputs relabelled as an H200's (what a device run's env.json and
    run.json say): finish maps them to the h200 preset's peaks, validates on the GPU cluster,
    flags the missing telemetry, and proposes the preset with the bf16 fit."""
    out, _ = dry_run
    gpu = tmp_path / "run"
    shutil.copytree(out, gpu)
    env = json.loads((gpu / "env.json").read_text())
    env["settings"]["device"] = "cuda"
    (gpu / "env.json").write_text(json.dumps(env))
    for path in gpu.glob("traces/*/*/run.json"):
        run = json.loads(path.read_text())
        run["device"] = {"kind": "gpu", "name": "NVIDIA H200", "torch_device": "cuda:0"}
        run["timing"] = "cuda_events"
        path.write_text(json.dumps(run))
    into = tmp_path / "h200"
    rc = finish_main([str(gpu), "--into", str(into)])
    printed = capsys.readouterr().out
    assert rc == 1 and "12 trace(s), 12 with a problem" in printed
    checks = json.loads((into / "checks.json").read_text())
    # a CPU has no NVML; at batch 2 the K-FAC 10/100 steps are mostly the preconditioner's
    # host work between stages, which only a GPU trace is held to
    assert all(c["problems"][0] == "no NVML telemetry" for c in checks.values())
    assert all(len(c["problems"]) == 1 for name, c in checks.items() if "10-100" not in name)
    assert "cluster dgx-h100-ndr" in printed
    h200 = load_device("h200")
    fitted = load_device(into / "h200-bf16.toml")
    preset = load_device(into / "h200-preset.toml")
    assert (preset.name, preset.bf16_tflops, preset.memory_GB) == (
        "h200", h200.bf16_tflops, h200.memory_GB)
    assert fitted.bf16_tflops == h200.bf16_tflops  # fitted against the preset's own peaks
    for kind, stage in fitted.stages.items():
        assert preset.stages[kind] == (h200.stages[kind] if stage.assumed else stage), kind
    assert not preset.inverse_methods["cholesky"].assumed
    assert "bf16 calibration traces in h200/bf16 (batch 2 per GPU)" in preset.source
    assert str(tmp_path) not in preset.source  # a committed preset names no absolute path
    assert "preset: h200-preset.toml" in printed
    # the H100 SXM5 is the same GH100 compute: it gets the same terms, as assumptions
    h100 = load_device(into / "h100-sxm5-preset.toml")
    assert (h100.name, h100.mem_bandwidth_GBps) == ("h100-sxm5", 3350.0)
    for kind, stage in preset.stages.items():
        assert h100.stages[kind].efficiency == stage.efficiency and h100.stages[kind].assumed
    assert "preset: h100-sxm5-preset.toml" in printed


def test_an_output_folder_in_use_is_refused_without_force(dry_run, tmp_path):
    out, _ = dry_run
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("OUT", None)
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "not empty" in proc.stderr and "--force" in proc.stderr
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(tmp_path),
                           "--return", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "is the output folder" in proc.stderr


def test_every_planned_trace_loads_and_says_what_ran(dry_run):
    out, _ = dry_run
    runs = [t.run for t in G.make_plan(G.DRY) if t.run is not None]
    assert len(runs) == 12
    for r in runs:
        trace = load_trace(out / "traces" / r.precision / r.name)
        run = trace.run
        assert trace.completed, r.name
        assert (run["workload"], run["precision"], run["batch_per_rank"]) == (
            "resnet20", r.precision, r.batch)
        assert (run["steps"], run["warmup"], run["world_size"]) == (r.steps, r.warmup, 1)
        assert run["command"] == r.command(G.DRY)  # relative --out: no machine's paths
        assert run["command"].startswith("kfacperf profile --workload resnet20")
        assert f"--out traces/{r.precision}/{r.name} --force" in run["command"]
        assert run["timing"] == "perf_counter_ns"  # a GPU run says cuda_events
        assert run["nvtx"] == "nvtx"  # the nvtx package's domain (the wheel on the GPU)
        assert run["precision_flags"]["autocast"] == ("bfloat16" if r.precision == "bf16"
                                                      else None)
        if r.optimizer == "kfac":
            assert (run["strategy"], run["inverse_method"]) == ("spngd", "eigen")
            assert (run["factor_interval"], run["inverse_interval"]) == (
                r.factor_interval, r.inverse_interval)
        steps = trace.events[trace.events["stage"] == "step"]["step"]
        assert sorted(steps) == list(range(r.warmup + r.steps))
    summary = json.loads((out / "summary.json").read_text())
    assert [t["name"] for t in summary["tasks"]] == [t.name for t in G.make_plan(G.DRY)]
    assert {t["status"] for t in summary["tasks"]} == {"ok"}
    assert summary["finished"] is True and summary["not_reached"] == []
    for t in summary["tasks"]:
        if t["kind"] == G.PROFILE:  # a GPU run: cuda_events and telemetry samples
            assert (t["timing"], t["telemetry_samples"]) == ("perf_counter_ns", 0)
            assert t["nvtx"] == "nvtx"
            assert t["precision"] == t["run"]["precision"] and t["step_ms"]


def test_the_json_outputs_hold_their_keys(dry_run):
    out, _ = dry_run
    env = json.loads((out / "env.json").read_text())
    for key in ("python", "kfacperf", "cuda_available", "nccl", "settings", "packages"):
        assert key in env
    assert env["device"]["type"] == "cpu" and env["device"]["torch_version"]
    assert env["settings"]["workload"] == "resnet20" and env["settings"]["dry_run"] is True
    overhead = json.loads((out / "timer_overhead.json").read_text())
    assert overhead["target"] == 0.01 and len(overhead["results"]) == 2
    for r in overhead["results"]:
        for key in ("name", "overhead_median", "overhead_of_medians", "cpu_overhead_median",
                    "replay_us_per_step", "replay_overhead", "meets_target", "step_ms_off",
                    "step_ms_on", "rows_per_step"):
            assert key in r
    kernels = json.loads((out / "kernels.json").read_text())
    plan = K.DRY_PLAN
    assert kernels["format"] == K.FORMAT and kernels["dry_run"] is True
    for dtype in plan.inverse_dtypes:
        assert sorted(r["n"] for r in kernels["eigh"] if r["dtype"] == dtype) == list(
            plan.inverse_sizes)
        assert sorted(r["n"] for r in kernels["cholesky"]
                      if r["dtype"] == dtype and r["op"] == "spd_inverse") == list(
            plan.inverse_sizes)
    assert max(plan.inverse_sizes) == 128
    assert all(r["residual"] < 1e-3 for r in kernels["eigh"] + kernels["cholesky"])
    assert {(f["layer"], f["batch"], f["precision"]) for f in kernels["factors"]} == {
        (n, b, p) for n in plan.factor_layers for b in plan.factor_batches
        for p in plan.factor_precisions}
    assert {(g["n"], g["precision"]) for g in kernels["gemm"]} == {
        (n, p) for n in plan.gemm_sizes for p in plan.gemm_precisions}


def test_calibrate_and_validate_read_the_traces(dry_run, capsys):
    out, _ = dry_run
    bf16 = out / "traces" / "bf16"
    cal = sorted(str(p) for p in bf16.glob("*-b2"))
    hold = sorted(str(p) for p in bf16.glob("*-b4"))
    assert len(cal) == len(hold) == 3
    assert main(["validate", "--calibrate", *cal, "--holdout", *hold, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["runs"]) == 3
    # both precisions at once: each trace fitted and predicted at its own peaks
    cal = sorted(str(p) for p in (out / "traces").glob("*/*-b2"))
    hold = sorted(str(p) for p in (out / "traces").glob("*/*-b4"))
    assert len(cal) == len(hold) == 6
    assert main(["validate", "--calibrate", *cal, "--holdout", *hold, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["runs"]) == 6


def test_an_interpreter_without_torch_is_one_clear_line(tmp_path):
    """A python without torch (the system one, here) is refused before anything runs, with
    what to do; no traceback, no output folder."""
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\nexec {sys.executable} -S -c 'raise SystemExit(1)' \"$@\"\n")
    fake.chmod(0o755)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=str(fake))
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "cannot import torch" in proc.stderr and "PYTHON" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not out.exists()


def test_help_is_the_header_and_stops_before_the_code():
    proc = subprocess.run(["bash", str(SCRIPT), "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0
    assert proc.stdout.startswith("Ground truth on a real GPU")
    assert "must import torch" in proc.stdout and "set -euo" not in proc.stdout
