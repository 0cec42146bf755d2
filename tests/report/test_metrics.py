import math

import numpy as np
import pandas as pd
import pytest

from kfacperf import vocab as stages
from kfacperf.report import matching, metrics
from kfacperf.report.inputs import load_runs


def _load(synth, tmp_path, name, *, strategy, world_size, warmup=0, steps=4, **kw):
    events = synth.make_events(strategy=strategy, world_size=world_size, steps=steps, **kw)
    run = synth.run_json(strategy=strategy, world_size=world_size, warmup=warmup, steps=steps)
    synth.write_trace_dir(tmp_path / name, run, events)
    return load_runs([tmp_path / name])[0], events


def test_breakdown_is_per_step_mean_over_measured_steps(synth, tmp_path):
    run, events = _load(synth, tmp_path, "r", strategy="spngd", world_size=3, warmup=1)
    got = metrics.rank_stage_breakdown(run.summary)
    ev = events.astype({"stage": str})
    ev = ev[(ev["step"] >= 1) & (ev["stage"] != stages.STEP)]
    want = ev.groupby(["rank", "stage"])["dur_us"].sum() / 3  # steps 1, 2, 3
    assert list(got.index) == [0, 1, 2]
    assert stages.STEP not in got.columns
    assert list(got.columns) == metrics.ordered_stages(list(got.columns))
    for (rank, stage), value in want.items():
        assert got.loc[rank, stage] == pytest.approx(value)
    # the warm-up step is not in the events the report draws
    assert run.events["step"].min() == 1


def test_critical_rank_and_stage_totals(synth, tmp_path):
    run, events = _load(synth, tmp_path, "r", strategy="kaisa", world_size=3)
    assert metrics.critical_rank(run.summary) == 2  # compute grows with the rank
    totals = metrics.stage_totals(run.summary, 2)
    ev = events[(events["rank"] == 2)].astype({"stage": str})
    fwd = ev.loc[ev["stage"] == stages.FORWARD, "dur_us"].sum() / 4
    assert totals[stages.FORWARD] == pytest.approx(fwd)
    assert metrics.stage_totals(run.summary, 7).empty


def test_layer_times_and_comparison(synth, tmp_path):
    run, events = _load(synth, tmp_path, "r", strategy="spngd", world_size=2, layers=("a", "b"))
    lt = metrics.layer_times(run.events, 1, run.summary.measured_steps)
    ev = events[(events["rank"] == 1)].astype({"stage": str, "layer": str})
    inv_a = ev.loc[(ev["stage"] == stages.INVERSE) & (ev["layer"] == "a"), "dur_us"].sum() / 4
    assert lt[(stages.INVERSE, "a")] == pytest.approx(inv_a)
    assert all(layer for _, layer in lt.index)  # whole-model stages are not per layer
    predicted = pd.Series({(stages.INVERSE, "a"): inv_a * 1.1, (stages.INVERSE, "zzz"): 5.0})
    comp = metrics.layer_comparison(lt, predicted)
    row = comp[(comp["stage"] == stages.INVERSE) & (comp["layer"] == "a")].iloc[0]
    assert row["error_pct"] == pytest.approx(10.0)
    only_pred = comp[comp["layer"] == "zzz"].iloc[0]
    assert only_pred["measured_us"] == 0 and math.isnan(only_pred["error_pct"])
    order = [metrics.ordered_stages(list(comp["stage"])).index(s) for s in comp["stage"]]
    assert order == sorted(order)


def test_stage_comparison_errors_and_total_last():
    measured = pd.Series({stages.BACKWARD: 200.0, stages.FORWARD: 100.0})
    predicted = pd.Series({stages.FORWARD: 110.0, stages.GRAD_COMM: 50.0})
    comp = metrics.stage_comparison(measured, predicted, 400.0, 380.0)
    assert list(comp["stage"]) == [stages.FORWARD, stages.BACKWARD, stages.GRAD_COMM, stages.STEP]
    err = dict(zip(comp["stage"], comp["error_pct"]))
    assert err[stages.FORWARD] == pytest.approx(10.0)
    assert err[stages.BACKWARD] == pytest.approx(-100.0)
    assert math.isnan(err[stages.GRAD_COMM])  # nothing measured: no relative error
    assert err[stages.STEP] == pytest.approx(-5.0)


def test_error_pct_edge_cases():
    assert metrics.error_pct(105.0, 100.0) == pytest.approx(5.0)
    assert math.isnan(metrics.error_pct(1.0, 0.0))
    assert math.isnan(metrics.error_pct(None, 1.0))
    assert math.isnan(metrics.error_pct(float("nan"), 1.0))


def test_pick_step_prefers_the_fullest_step(synth):
    ev = synth.make_events(strategy="spngd", world_size=1, steps=4, inverse_interval=2)
    assert metrics.pick_step(ev) == 0  # inverse runs at steps 0 and 2
    assert metrics.pick_step(ev[ev["step"] >= 1]) == 2
    assert metrics.pick_step(ev, 3) == 3
    with pytest.raises(ValueError, match="step 9"):
        metrics.pick_step(ev, 9)


def test_headline_overhead_and_match(synth, tmp_path):
    sgd, sgd_ev = _load(synth, tmp_path, "sgd", strategy="sgd", world_size=2)
    kfac, kfac_ev = _load(synth, tmp_path, "kfac", strategy="spngd", world_size=2)
    summary = synth.make_summary()
    pred_dir = synth.write_prediction_dir(tmp_path / "p", synth.prediction_meta(), summary,
                                          synth.make_stage_times(summary),
                                          synth.make_prediction_events(["spngd"], [2]))
    from kfacperf.report.inputs import load_predictions

    pred = load_predictions([pred_dir])[0]
    head = matching.headline([sgd, kfac], [pred]).set_index("run")

    def step_time(ev):  # independent: slowest rank's step row, mean over steps
        rows = ev[ev["stage"].astype(str) == stages.STEP]
        return rows.groupby("step")["dur_us"].max().mean()

    assert head.loc["kfac", "measured_step_us"] == pytest.approx(step_time(kfac_ev))
    assert head.loc["kfac", "kfac_overhead_measured"] == pytest.approx(step_time(kfac_ev) / step_time(sgd_ev))
    assert np.isnan(head.loc["sgd", "kfac_overhead_measured"])
    want = summary[(summary["strategy"] == "spngd") & (summary["gpus"] == 2)].iloc[0]
    assert head.loc["kfac", "predicted_step_us"] == pytest.approx(want["step_us"])
    assert head.loc["kfac", "kfac_overhead_predicted"] == pytest.approx(want["kfac_overhead"])
    assert head.loc["kfac", "error_pct"] == pytest.approx(
        (want["step_us"] - step_time(kfac_ev)) / step_time(kfac_ev) * 100)


def test_critical_rank_is_the_one_with_most_compute_not_the_longest_step(synth, tmp_path):
    # rank 1 waits in a long collective for rank 0's inverse: its step row is longer
    ev = synth.make_events(strategy="spngd", world_size=2, steps=1, skew=0.0).astype(
        {"stage": str, "layer": str, "lane": str})
    ev = ev[~((ev["rank"] == 1) & (ev["stage"] == stages.INVERSE))]
    step_end = ev["start_us"].max() + 200_000
    ev.loc[(ev["rank"] == 1) & (ev["stage"] == stages.STEP), "dur_us"] = step_end
    ev.loc[(ev["rank"] == 0) & (ev["stage"] == stages.STEP), "dur_us"] = step_end - 10
    synth.write_trace_dir(tmp_path / "w", synth.run_json(strategy="spngd", world_size=2), ev)
    run = load_runs([tmp_path / "w"])[0]
    assert run.summary.ranks.set_index("rank")["step_us"].idxmax() == 1
    assert metrics.critical_rank(run.summary) == 0
