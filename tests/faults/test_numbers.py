"""Numbers too large, too small or not finite: each is refused with a clear bound, before any
memory is spent, and no prediction that is not finite (or longer than a year per step) is
ever printed as a result.
"""
from __future__ import annotations

import json

import pytest

from helpers.faults import CLUSTER, assert_one_line_error, run_cli

SIM = ["simulate", "--workload", "mlp", "--device", "h100", "--cluster", "dgx-h100-ndr"]


@pytest.mark.parametrize("argv, names", [
    (["--gpus", "2147483648"], "above the largest simulated, 1,048,576"),
    (["--gpus", "1-2147483648"], "above the largest simulated"),
    (["--gpus", "268435456", "--strategy", "spngd"], "above the largest simulated"),
    (["--gpus", "1,2,...,99999999999999999999"], "above the largest simulated"),
    (["--gpus", "8", "--bucket-mb", "inf"], "--bucket-mb must be > 0 and at most"),
    (["--gpus", "8", "--bucket-mb", "nan"], "--bucket-mb"),
    (["--gpus", "8", "--bucket-mb", "1e400"], "--bucket-mb"),
    (["--gpus", "8", "--compute-scale", "1e-300"], "--compute-scale must be a number from"),
    (["--gpus", "8", "--bandwidth-scale", "1e300"], "--bandwidth-scale must be a number from"),
    (["--gpus", "8", "--batch-per-gpu", "1000000000000000000"], "not a usable result"),
])
def test_simulate_bounds(capsys, argv, names):
    result = run_cli(capsys, [*SIM, *argv])
    assert_one_line_error(result, names=names)
    assert "ms" not in result.out  # no table of results


def test_the_largest_gpu_count_is_simulated(capsys):
    """The bound is a promise: the largest count runs (a few seconds, a few hundred MB)."""
    from kfacperf.sim.sweep import MAX_GPUS

    result = run_cli(capsys, [*SIM, "--gpus", str(MAX_GPUS), "--strategy", "spngd",
                              "--no-events", "--json"])
    assert result.status == 0, result.err
    [row] = json.loads(result.out)
    assert row["gpus"] == MAX_GPUS and 0 < row["step_us"] < 3.15e13


def test_a_non_finite_prediction_is_never_a_result(monkeypatch):
    """Whatever the cost model returns, a NaN or infinite step is an error naming the point."""
    from kfacperf.sim import sweep
    from kfacperf.sim.costs.model import CostModel

    monkeypatch.setattr(CostModel, "collective_us", lambda self, *a, **k: float("inf"))
    with pytest.raises(ValueError, match=r"sgd on 8 GPUs has step_us = inf"):
        sweep.simulate("mlp", "h100", "dgx-h100-ndr", ["sgd"], gpus=[8])


def _raw(tmp_path, time_us=None, **extra) -> str:
    data = json.loads((CLUSTER.parent / "commbench.json").read_text())
    if time_us is not None:
        data["points"][0]["time_us"] = time_us
    data.update(extra)
    path = tmp_path / "raw.json"
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize("value, names", [
    (1e300, "key 'points[0].time_us': must be <= 3.6e+09"),
    (1e-300, "key 'points[0].time_us': must be at least 0.001 µs"),
])
def test_commbench_raw_times_out_of_range(tmp_path, capsys, value, names):
    out = tmp_path / "c.toml"
    result = run_cli(capsys, ["commbench", "--from-raw", _raw(tmp_path, value), "--out", out])
    assert_one_line_error(result, names=names)
    assert not out.exists()


def test_commbench_raw_slowdown_out_of_range(tmp_path, capsys):
    result = run_cli(capsys, ["commbench", "--from-raw", _raw(tmp_path, slowdowns={"2": 1e300})])
    assert_one_line_error(result, names="key 'slowdowns.2': must be <= 1000")


@pytest.mark.parametrize("argv, names", [
    (["--timeout", "inf"], "--timeout must be at most 86400"),
    (["--timeout", "nan"], "--timeout"),
    (["--nproc", "2147483648"], "--nproc must be at most"),
    (["--bucket-cap-mb", "inf"], "--bucket-cap-mb must be > 0 and at most 1e+06"),
    # 0 and negative buckets are refused as simulate --bucket-mb refuses them
    (["--bucket-cap-mb", "0"], "--bucket-cap-mb must be > 0 and at most 1e+06, got 0.0"),
    (["--bucket-cap-mb", "-5"], "--bucket-cap-mb must be > 0 and at most 1e+06, got -5.0"),
    # each error names the flag as it is typed, not the setting's internal name
    (["--timeout", "0"], "--timeout must be > 0, got 0.0"),
    (["--telemetry-interval", "0"], "--telemetry-interval must be > 0, got 0.0"),
    (["--lr", "nan"], "--lr must be a finite number >= 0, got nan"),
    (["--momentum", "-1"], "--momentum must be a finite number >= 0"),
    (["--factor-decay", "2"], "--factor-decay must be in [0, 1)"),
    (["--damping", "inf"], "--damping must be a finite number > 0"),
    (["--kl-clip", "0"], "--kl-clip must be a finite number > 0, or none"),
])
def test_profile_bounds_before_any_process_starts(tmp_path, capsys, argv, names):
    result = run_cli(capsys, ["profile", "--workload", "mlp", "--out", tmp_path / "t", *argv])
    assert_one_line_error(result, names=names)
    assert not (tmp_path / "t").exists()
