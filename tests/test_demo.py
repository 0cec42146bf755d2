"""`run_demo` end to end with the smallest settings: a tiny MLP, 2 measured steps, 1 and 2
processes, a two-size commbench, three GPU counts.

Every headline number is recomputed here straight from the files the demo wrote (the
traces' events.parquet and the predictions' summary.parquet, read with pandas), not through
the library's summaries.
"""
from __future__ import annotations

import io
import json
import math
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import tomllib

from kfacperf.pipeline import DemoConfig, run_demo
from kfacperf.pipeline.config import KIB, MIB
from kfacperf.plan import load_convergence
from kfacperf.sim.models.presets import models_dir

pytestmark = pytest.mark.slow

OPTIONS = {"in_features": 24, "hidden": [16, 12]}


def _step_times(trace: Path) -> pd.Series:
    """Per measured step, the slowest rank's ``step`` event."""
    run = json.loads((trace / "run.json").read_text())
    ev = pd.read_parquet(trace / "events.parquet")
    steps = ev[(ev["stage"].astype(str) == "step") & (ev["step"] >= run["warmup"])]
    per_step = steps.groupby("step")["dur_us"].max()
    assert len(per_step) == run["steps"]
    assert set(steps["rank"]) == set(range(run["world_size"]))
    return per_step


def _row(summary: pd.DataFrame, strategy: str, gpus: int) -> pd.Series:
    sel = summary[(summary["strategy"] == strategy) & (summary["gpus"] == gpus)]
    assert len(sel) == 1, (strategy, gpus)
    return sel.iloc[0]


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")
            if p.is_file()}


def test_demo_end_to_end(tmp_path, monkeypatch):
    # the demo reads presets from a private copy of models/, which it must leave untouched
    shutil.copytree(models_dir(), tmp_path / "models")
    monkeypatch.setenv("KFACPERF_MODELS", str(tmp_path / "models"))
    committed = _snapshot(models_dir())
    out = tmp_path / "demo"
    config = DemoConfig(
        workload="mlp", workload_options=OPTIONS, strategies=("spngd",), steps=2, warmup=1,
        batch_size=8, out=str(out), commbench_sizes=(4 * KIB, 1 * MIB), commbench_reps=2,
        commbench_warmup=1, scale_gpus=(1, 8, 4096), whatif_bandwidth=(0.5,),
        plan_gpus=(8, 1024),
    )
    stream = io.StringIO()
    result = run_demo(config, stream=stream)
    printed = stream.getvalue()

    # one progress line per phase, each with its time
    phase_lines = [ln for ln in printed.splitlines() if re.match(r"\[\d+/\d+\] ", ln)]
    assert len(phase_lines) == 11 and all(re.search(r"\d+\.\d s ", ln) for ln in phase_lines)
    assert [p.name for p in result.phases][-2:] == ["plan resnet50 on abci-v100", "report"]
    assert len(result.phases) == 11

    # the page
    assert result.report == out / "index.html" and result.report.is_file()
    html = result.report.read_text()
    assert html.lstrip().lower().startswith("<!doctype html") and "mlp-spngd-p2" in html

    # measured step times, from the events
    traces = {(r.strategy, r.nproc): out / "traces" / f"mlp-{r.strategy}-p{r.nproc}"
              for r in result.runs}
    assert set(traces) == {("sgd", 1), ("spngd", 1), ("sgd", 2), ("spngd", 2)}
    times = {k: _step_times(p) for k, p in traces.items()}
    for (strategy, nproc), path in traces.items():
        run = json.loads((path / "run.json").read_text())
        assert (run["world_size"], run["strategy"], run["batch_per_rank"]) == (nproc, strategy, 8)
        assert run["completed"] is True and run["threads_per_rank"] == 1
        assert run["workload_options"] == OPTIONS and "kfacperf profile" in run["command"]
    # (every step of a 1/1 run does the same work, so the median step; as kfacperf validate)
    for r in result.runs:
        key = (r.strategy, r.nproc)
        assert r.measured_step_us == pytest.approx(times[key].median(), rel=1e-9)
        assert r.role == ("calibration" if r.nproc == 1 else "held out")
        if r.strategy == "spngd":
            assert r.measured_overhead == pytest.approx(
                times[key].median() / times[("sgd", r.nproc)].median(), rel=1e-9)
        else:
            assert math.isnan(r.measured_overhead)

    # held-out runs: measured as above, the same number as the runs' table, predicted as the
    # local prediction file has it for that strategy and world size
    local = pd.read_parquet(out / "predictions" / "mlp-local" / "summary.parquet")
    assert sorted(local["gpus"].unique()) == [1, 2]
    assert [(h.strategy, h.nproc) for h in result.held_out] == [("sgd", 2), ("spngd", 2)]
    for h in result.held_out:
        measured = float(times[(h.strategy, h.nproc)].median())
        predicted = float(_row(local, h.strategy, h.nproc)["step_us"])
        assert h.name == f"mlp-{h.strategy}-p{h.nproc}"
        assert h.measured_step_us == pytest.approx(measured, rel=1e-9)
        run_row = next(r for r in result.runs if (r.strategy, r.nproc) == (h.strategy, h.nproc))
        assert h.measured_step_us == pytest.approx(run_row.measured_step_us, rel=1e-12)
        assert h.predicted_step_us == pytest.approx(predicted, rel=1e-6)
        assert h.error_pct == pytest.approx((predicted - measured) / measured * 100, rel=1e-6)

    # the device model is fitted from the 1-process traces only (held-out runs do not leak)
    device = tomllib.loads((out / "models" / "devices" / "local-cpu.toml").read_text())
    assert "mlp-sgd-p1" in device["source"] and "mlp-spngd-p1" in device["source"]
    assert "-p2" not in device["source"]
    assert (out / "models" / "clusters" / "local-cpu.toml").is_file()

    # K-FAC overhead at 4,096 GPUs on each cluster preset, from their summaries
    assert {(s.cluster, s.device) for s in result.scale} == {("dgx-h100-ndr", "h100-sxm5"),
                                                             ("abci-v100", "v100-sxm2")}
    for s in result.scale:
        summary = pd.read_parquet(out / "predictions" / f"resnet50-{s.cluster}" / "summary.parquet")
        assert s.gpus == 4096 and sorted(summary["gpus"].unique()) == [1, 8, 4096]
        step = float(_row(summary, s.strategy, 4096)["step_us"])
        sgd = float(_row(summary, "sgd", 4096)["step_us"])
        assert s.step_us == pytest.approx(step, rel=1e-9)
        assert s.kfac_overhead == pytest.approx(step / sgd, rel=1e-9)
    assert {s.strategy for s in result.scale} == {"sgd", "spngd", "kaisa"}
    assert (out / "predictions" / "resnet50-dgx-h100-ndr-bw0.5x" / "summary.parquet").is_file()

    # what was printed and written agrees with the result
    text = result.text()
    assert str(result.report) in text
    lines = text.splitlines()
    for r in result.runs:
        line = next(ln for ln in lines if ln.strip().startswith(r.name + " "))
        assert f"{r.measured_step_us / 1e3:,.1f} ms" in line
    for h in result.held_out:
        line = [ln for ln in lines if ln.strip().startswith(h.name + " ")][-1]
        assert f"{h.measured_step_us / 1e3:,.1f} ms" in line
        assert f"{h.predicted_step_us / 1e3:,.1f} ms" in line and f"{h.error_pct:+.1f}%" in line
    for s in result.scale:
        if s.strategy != "sgd":
            assert f"{s.strategy} {s.kfac_overhead:.2f}x" in text
    saved = json.loads((out / "demo.json").read_text())
    assert saved == json.loads(json.dumps(result.to_dict()))
    held = json.loads((out / "validation.json").read_text())
    assert [row["run"] for row in held["runs"]] == [h.name for h in result.held_out]
    for row, h in zip(held["runs"], result.held_out):
        assert row["predicted_step_us"] == pytest.approx(h.predicted_step_us, rel=1e-12)
    assert sorted(held["calibration"]["traces"]) == sorted(
        str(traces[k]) for k in (("sgd", 1), ("spngd", 1)))

    # the plan: time to solution = steps at the global batch x step time, from plan.json
    plan = json.loads((out / "plan.json").read_text())
    assert saved["plan"] == str(out / "plan.json") and "Plan: time to solution" in html
    steps = {"sgd": load_convergence("mlperf-v0.7-lars-resnet50"),
             "kfac": load_convergence("spngd-resnet50")}
    assert {(c["gpus"], c["strategy"] == "sgd") for c in plan["best"]} == {
        (8, True), (8, False), (1024, True), (1024, False)}
    for c in plan["best"]:
        model = steps["sgd" if c["strategy"] == "sgd" else "kfac"]
        assert c["global_batch"] == c["gpus"] * 32
        assert c["steps"] == pytest.approx(model.at(c["global_batch"]).steps, rel=1e-12)
        assert c["time_s"] == pytest.approx(c["steps"] * c["step_us"] / 1e6, rel=1e-12)
        assert c["gpu_hours"] == pytest.approx(c["gpus"] * c["time_s"] / 3600, rel=1e-12)
        assert c["memory"]["total"] <= 16e9
        row = next(ln for ln in lines if ln.strip().startswith(f"{c['gpus']:,} "))
        assert f"{c['step_us'] / 1e3:,.1f}" in row
    spngd = next(c for c in plan["best"] if c["gpus"] == 1024 and c["strategy"] != "sgd")
    assert spngd["steps"] == 1760  # SP-NGD Table 1 at 32,768

    assert _snapshot(models_dir()) == committed  # committed presets untouched
