"""Inputs that used to give a silent wrong answer: each is now an error naming the file, key
or value, or (for JSON output) valid JSON.
"""
from __future__ import annotations

import json

import pandas as pd
import pytest

from helpers.faults import CLUSTER, TRACE_1P, TRACE_2P, assert_one_line_error, copy_trace, run_cli


def strict_json(text: str):
    """``json.loads`` that refuses NaN and Infinity, as every JSON reader but Python's does."""
    def refuse(name):
        raise ValueError(f"{name} in JSON output")

    return json.loads(text, parse_constant=refuse)


def test_calibrating_from_all_zero_durations_is_an_error(tmp_path, capsys):
    trace = copy_trace(TRACE_1P, tmp_path / "zeros")
    ev = pd.read_parquet(trace / "events.parquet")
    ev["dur_us"] = 0.0
    ev.to_parquet(trace / "events.parquet", index=False)
    out = tmp_path / "fitted.toml"
    result = run_cli(capsys, ["calibrate", trace, "--out", out])
    assert_one_line_error(result, names="no compute stage with a positive duration")
    assert not out.exists()


def test_commbench_from_raw_without_collectives_does_not_pretend(tmp_path, capsys):
    raw = json.loads((CLUSTER.parent / "commbench.json").read_text())
    raw["points"] = []
    path = tmp_path / "probe.json"
    path.write_text(json.dumps(raw))
    out = tmp_path / "cluster.toml"
    result = run_cli(capsys, ["commbench", "--from-raw", path, "--out", out])
    assert_one_line_error(result, names=f"not writing --out {out}")
    assert "no collective was measured" in result.err and not out.exists()


@pytest.mark.parametrize("argv, names", [
    (["--ops", "all_reduce", "--out", "{tmp}/c.toml"], "needs all four collectives"),
    (["--sizes", "4KiB", "--raw", "{tmp}/r.json"], "give at least 2 message sizes"),
    (["--sizes", "4KiB,4KiB"], "give at least 2 message sizes"),
    (["--ops", "all_reduce,alltoall"], "unknown collective(s) alltoall"),
])
def test_commbench_refuses_what_it_could_not_fit_before_measuring(
        tmp_path, capsys, monkeypatch, argv, names):
    """An --out that needs four collectives and --ops naming one, or a single message size
    (no fit of latency and bandwidth), was refused only after measuring for seconds to
    minutes: now before any process starts."""
    from kfacperf.bench import commbench as cb

    def measured(*args, **kwargs):
        raise AssertionError("measured before refusing")

    monkeypatch.setattr(cb, "run_commbench", measured)
    result = run_cli(capsys, ["commbench", *[a.replace("{tmp}", str(tmp_path)) for a in argv]])
    assert_one_line_error(result, names=names)
    assert not list(tmp_path.iterdir())


def test_a_cluster_fit_from_one_message_size_says_so():
    from kfacperf.bench.results import Point
    from kfacperf.calibrate.cluster import fit_points

    points = [Point(op="all_reduce", world_size=2, nbytes=4096, time_us=100.0, reps=5)]
    with pytest.raises(ValueError, match="1 point.*1 message size.*needs at least 2 sizes"):
        fit_points(points, "all_reduce")


def test_export_writes_valid_json_for_a_missing_number(tmp_path, capsys):
    trace = copy_trace(TRACE_1P, tmp_path / "t")
    ev = pd.read_parquet(trace / "events.parquet")
    ev["flops"] = float("nan")  # unknown FLOPs
    ev.to_parquet(trace / "events.parquet", index=False)
    out = tmp_path / "chrome.json"
    assert run_cli(capsys, ["export", "--chrome", trace, "--out", out]).status == 0
    doc = strict_json(out.read_text())
    flops = [e["args"]["flops"] for e in doc["traceEvents"] if e.get("ph") == "X"]
    assert flops and all(f is None for f in flops)


def test_validate_json_is_valid_json(capsys, monkeypatch):
    """Whatever the result holds (a missing number is NaN in pandas), --json prints JSON."""
    import kfacperf.validation as validation

    class Result:
        def to_dict(self):
            return {"median_abs_error_pct": float("nan"), "runs": [{"spread_pct": float("inf")}]}

    monkeypatch.setattr(validation, "validate", lambda *a, **k: Result())
    result = run_cli(capsys, ["validate", "--calibrate", TRACE_1P, "--holdout", TRACE_2P,
                              "--json"])
    assert result.status == 0
    assert strict_json(result.out) == {"median_abs_error_pct": None,
                                       "runs": [{"spread_pct": None}]}


@pytest.mark.parametrize("key, value, names", [
    ("factor_interval", 0, "key 'factor_interval' must be an integer >= 1, got 0"),
    ("inverse_interval", 3, "key 'inverse_interval' must be a multiple of factor_interval"),
    ("batch_per_rank", "32", "key 'batch_per_rank' must be an integer >= 1, got '32'"),
    ("grad_worker_fraction", 1.5, "key 'grad_worker_fraction' must be a number in (0, 1]"),
    ("world_size", True, "key 'world_size' must be an integer >= 1, got True"),
    ("strategy", ["sgd"], "key 'strategy' must be a string"),
])
def test_run_json_values_that_make_no_sense(tmp_path, capsys, key, value, names):
    trace = copy_trace(TRACE_2P, tmp_path / "t")
    run = json.loads((trace / "run.json").read_text())
    run[key] = value
    if key == "inverse_interval":
        run["factor_interval"] = 2
    (trace / "run.json").write_text(json.dumps(run))
    result = run_cli(capsys, ["validate", "--calibrate", TRACE_1P, "--holdout", trace,
                              "--cluster", CLUSTER])
    assert_one_line_error(result, names=names)


def test_workload_params_must_be_dim_a_times_dim_g(tmp_path, capsys):
    from kfacperf.sim.models.presets import models_dir

    text = (models_dir() / "workloads" / "mlp.toml").read_text()
    bad = tmp_path / "mlp-bad.toml"
    bad.write_text(text.replace("params = 401920", "params = 401921", 1))
    result = run_cli(capsys, ["simulate", "--workload", bad, "--device", "h100", "--cluster",
                              "dgx-h100-ndr", "--gpus", "1"])
    assert_one_line_error(result, names="mlp-bad.toml")
    assert "params 401,921 is not dim_a x dim_g = 785 x 512 = 401,920" in result.err


def test_json_ready_makes_plain_valid_json_of_what_results_hold(tmp_path):
    """Nested NaN/inf as null, numpy scalars as Python numbers, paths as strings: the demo's
    result and every --json output go through this one helper."""
    import numpy as np

    from kfacperf.safety import dumps_json, json_ready

    data = {"a": [float("nan"), np.float64(2.5), (np.int64(3), float("-inf"))],
            "where": tmp_path / "x.json", "name": "ok", "n": None}
    ready = json_ready(data)
    assert ready == {"a": [None, 2.5, [3, None]], "where": str(tmp_path / "x.json"),
                     "name": "ok", "n": None}
    assert type(ready["a"][1]) is float and type(ready["a"][2][0]) is int
    assert strict_json(dumps_json(data)) == ready
