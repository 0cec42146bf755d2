"""``kfacperf plan``: the side-by-side table, the Pareto front, JSON, the file it writes, and
one-line errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from kfacperf.cli import main
from kfacperf.plan.result import load_plan

SMALL = ["--workload", "resnet50", "--device", "v100", "--cluster", "abci-v100",
         "--gpus", "256,1024", "--intervals", "1/1,10/10", "--comm-dtypes", "fp16",
         "--symmetric", "on", "--convergence", "mlperf-v0.7-lars-resnet50", "spngd-resnet50"]


def test_text_shows_sgd_and_kfac_side_by_side_and_the_front(capsys: pytest.CaptureFixture) -> None:
    assert main(["plan", *SMALL]) == 0
    out, err = capsys.readouterr()
    assert "plan: 256 GPUs (1/2)" in err and "plan: 1,024 GPUs (2/2)" in err  # progress
    lines = out.splitlines()
    head = next(ln for ln in lines if ln.strip().startswith("GPUs") and "K-FAC" in ln)
    assert head.index("SGD") < head.index("K-FAC") < head.index("K-FAC/SGD")
    row = next(ln for ln in lines if ln.strip().startswith("1,024"))
    assert ("spngd" in row or "kaisa" in row) and "sgd b32" in row
    assert "12/12 fp16 sym" in row and "1,760" in row  # SP-NGD's steps
    assert any(ln.startswith("Pareto front") for ln in lines)
    assert "mlperf-v0.7-lars-resnet50" in out and "spngd-resnet50" in out


def test_json_and_out_file_agree_and_are_not_overwritten(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "plan.json"
    assert main(["plan", *SMALL, "--json", "--quiet", "--out", str(out)]) == 0
    printed, err = capsys.readouterr()
    assert err == ""
    data = json.loads(printed)
    assert data["format"] == "kfacperf-plan-1"
    assert json.loads(out.read_text())["best"] == data["best"]
    plan = load_plan(out)
    best = plan.best(1024, "kfac")
    assert best is not None and best.global_batch == 32768 and best.steps == 1760
    assert best.time_s == pytest.approx(best.steps * best.step_us / 1e6)
    assert best.gpu_hours == pytest.approx(1024 * best.time_s / 3600)
    assert [c["gpus"] for c in data["pareto"]] == [c.gpus for c in plan.pareto()]
    assert main(["plan", *SMALL, "--quiet", "--out", str(out)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert main(["plan", *SMALL, "--quiet", "--out", str(out), "--force"]) == 0


@pytest.mark.parametrize("extra, message", [
    (["--intervals", "10"], "--intervals '10': '10' is not FACTOR/INVERSE"),
    (["--intervals", "3/10"], "inverse interval a multiple of the factor interval"),
    (["--batch-per-gpu", "32,x"], "--batch-per-gpu '32,x': 'x' is not a whole number"),
    (["--bucket-mb", "0"], "--bucket-mb '0': values must be > 0"),
    (["--comm-dtypes", "fp8"], "factor communication precision 'fp8' unknown"),
    (["--strategies", "adam"], "unknown strategy 'adam'"),
    (["--memory-gb", "-1"], "--memory-gb must be > 0"),
    (["--memory-fraction", "1.5"], "memory fraction must be in (0, 1]"),
    (["--convergence", "nope"], "unknown convergence preset 'nope'"),
])
def test_bad_input_is_one_error_line(extra: list[str], message: str,
                                     capsys: pytest.CaptureFixture) -> None:
    assert main(["plan", *SMALL, "--quiet", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kfacperf plan: error: ") and message in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_unknown_convergence_data_and_unknown_memory_are_errors(
        capsys: pytest.CaptureFixture) -> None:
    args = ["plan", "--workload", "resnet20", "--device", "v100", "--cluster", "abci-v100",
            "--gpus", "8", "--quiet"]
    assert main(args) == 2
    assert "no convergence data for sgd on 'resnet20'" in capsys.readouterr().err
    args = ["plan", "--workload", "resnet50", "--device", "cpu", "--cluster", "abci-v100",
            "--gpus", "8", "--quiet", "--strategies", "sgd"]
    assert main(args) == 2
    assert "device 'local-cpu' has no memory capacity" in capsys.readouterr().err
    assert main(args + ["--memory-gb", "64"]) == 0


def test_plan_and_its_report_never_import_torch(tmp_path: Path) -> None:
    import subprocess
    import sys

    out = tmp_path / "plan.json"
    code = ("import sys; from kfacperf.cli import main; "
            f"rc = main(['plan', *{SMALL!r}, '--quiet', '--out', {str(out)!r}]) or "
            f"main(['report', '--plan', {str(out)!r}, '--out', {str(tmp_path / 'r.html')!r}]); "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "r.html").is_file()


def test_short_runs_and_small_gpu_hours_keep_their_figures():
    """A toy workload's plan takes seconds: '0 s' and '0.0' GPU-h would make every row of
    the Pareto front look alike."""
    from kfacperf.plan.text import fmt_duration, fmt_gpu_hours

    assert [fmt_duration(s) for s in (0.499, 1.5, 9.87, 42.0, 600.0, 7200.0)] == [
        "0.499 s", "1.5 s", "9.87 s", "42 s", "10.0 min", "2.0 h"]
    assert [fmt_gpu_hours(h) for h in (0.000123, 0.5, 1.0, 1234.56)] == [
        "0.000123", "0.5", "1.0", "1,234.6"]
