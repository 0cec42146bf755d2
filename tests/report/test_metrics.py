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


def test_breakdown_is_per_step_time_over_measured_steps(synth, tmp_path):
    events = synth.make_events(strategy="spngd", world_size=3, steps=4)
    # rank 2 also computes a layer's statistics inside its backward (as the K-FAC hooks do)
    bwd = events[(events["rank"] == 2) & (events["step"] == 1)
                 & (events["stage"].astype(str) == stages.BACKWARD)].iloc[0]
    nested = pd.DataFrame([{**bwd.to_dict(), "stage": stages.FACTOR_COMPUTE, "layer": "fc",
                            "start_us": bwd["start_us"] + 100.0, "dur_us": 500.0}])
    events = synth.typed_events(pd.concat(
        [events.astype({"stage": str, "layer": str, "lane": str}),
         nested.astype({"stage": str, "layer": str, "lane": str})],
        ignore_index=True))
    run = synth.run_json(strategy="spngd", world_size=3, warmup=1, steps=4)
    synth.write_trace_dir(tmp_path / "r", run, events)
    run = load_runs([tmp_path / "r"])[0]
    got = metrics.rank_stage_breakdown(run.summary)
    ev = events.astype({"stage": str})
    ev = ev[(ev["step"] >= 1) & (ev["lane"].astype(str) == stages.COMPUTE)
            & (ev["stage"] != stages.STEP)]
    # steps 1, 3 (factor) and 2 (inverse): the median of two is their mean
    want = ev.groupby(["rank", "stage"])["dur_us"].sum() / 3  # steps 1, 2, 3
    want[(2, stages.BACKWARD)] -= 500.0 / 3  # exclusive of the nested statistics
    assert list(got.index) == [0, 1, 2]
    assert stages.STEP not in got.columns
    assert list(got.columns) == metrics.ordered_stages(list(got.columns))
    for (rank, stage), value in want.items():
        assert got.loc[rank, stage] == pytest.approx(value)
    # the warm-up step is not in the events the report draws
    assert run.events["step"].min() == 1


def _stalled_events(synth, *, steps, stall, factor, world_size=2):
    """Synthetic events in which step ``stall`` runs ``factor`` times slower (every event of
    it stretched, the later steps moved back so that nothing overlaps)."""
    ev = synth.make_events(strategy="spngd", world_size=world_size, steps=steps).astype(
        {"stage": str, "layer": str, "lane": str})
    t0 = ev["step"] * 100_000.0 + 5.0 * ev["rank"]  # make_events' start of each step
    hit = ev["step"] == stall
    ev.loc[hit, "start_us"] = t0[hit] + (ev.loc[hit, "start_us"] - t0[hit]) * factor
    ev.loc[hit, "dur_us"] *= factor
    ev.loc[ev["step"] > stall, "start_us"] += 100_000.0 * factor
    return synth.typed_events(ev)


def test_breakdown_takes_the_steps_as_the_headline_does_not_their_mean(synth, tmp_path):
    """One stalled step in 20 (x100) moved the breakdown's per-rank step to ~6x the headline
    step time on the same page; both are now per kind the median, weighted by the mix."""
    events = _stalled_events(synth, steps=21, stall=7, factor=100.0)
    run = synth.run_json(strategy="spngd", world_size=2, warmup=1, steps=21)
    synth.write_trace_dir(tmp_path / "r", run, events)
    run = load_runs([tmp_path / "r"])[0]
    s = run.summary
    assert s.measured.kinds == {"inverse": 10, "factor": 10}
    assert s.step_mean_us > 5 * s.step_us  # the stall moves the mean, not the step time
    per_rank = metrics.rank_table(s)
    breakdown = metrics.rank_stage_breakdown(s)
    # the slowest rank (the last, by the skew) is the slowest in every step: the headline
    assert per_rank["step_us"].max() == pytest.approx(s.step_us)
    head = matching.headline([run], []).set_index("run")
    assert head.loc[run.name, "measured_step_us"] == pytest.approx(per_rank["step_us"].max())
    # independently: per rank, per kind the median of its step row, weighted 10/10
    ev = events[events["step"] >= 1].astype({"stage": str})
    rows = ev[ev["stage"] == stages.STEP].set_index(["rank", "step"])["dur_us"]
    for rank in (0, 1):
        r = rows.loc[rank]
        want = (np.median(r[r.index % 2 == 0]) + np.median(r[r.index % 2 == 1])) / 2
        assert per_rank.loc[rank, "step_us"] == pytest.approx(want)
        assert per_rank.loc[rank, "step_us"] < 2 * r.min()
        # every stage as well: backward runs 20 ms x (1 + 0.1 rank) in the unstalled steps
        assert breakdown.loc[rank, stages.BACKWARD] == pytest.approx(20_000 * (1 + 0.1 * rank))
        assert per_rank.loc[rank, "comm_us"] < 2 * ev[(ev["rank"] == rank) & (
            ev["lane"].astype(str) == stages.COMM) & (ev["step"] == 1)]["dur_us"].sum()
    # and the breakdown, averaged over ranks, is the stage time the comparison shows
    for stage, want in s.measured.stage_times().items():
        assert breakdown[stage].mean() == pytest.approx(want), stage


def test_stage_comparison_errors_and_total_last():
    from kfacperf.trace.compare import compare
    from kfacperf.trace.measure import KindTimes, Measured

    measured = Measured(kinds={"plain": 3, "factor": 1}, step_us={"plain": 400.0, "factor": 800.0},
                        stage_us={"plain": {stages.BACKWARD: 200.0, stages.FORWARD: 100.0},
                                  "factor": {stages.BACKWARD: 200.0, stages.FORWARD: 100.0,
                                             stages.FACTOR_COMPUTE: 400.0}},
                        mean_step_us=500.0)
    predicted = KindTimes(step_us={"plain": 380.0, "factor": 1000.0, "inverse": 9e9},
                          stage_us={"plain": {stages.FORWARD: 110.0, stages.GRAD_COMM: 50.0},
                                    "factor": {stages.FORWARD: 110.0,
                                               stages.FACTOR_COMPUTE: 300.0}})
    comp = metrics.stage_comparison(compare(measured, predicted))
    assert list(comp["stage"]) == [stages.FORWARD, stages.BACKWARD, stages.FACTOR_COMPUTE,
                                   stages.GRAD_COMM, stages.STEP]
    got = comp.set_index("stage")
    # weighted by the measured mix (3 plain, 1 factor); the inverse step is not in it
    assert got.loc[stages.STEP, "measured_us"] == pytest.approx(500.0)
    assert got.loc[stages.STEP, "predicted_us"] == pytest.approx((3 * 380.0 + 1000.0) / 4)
    assert got.loc[stages.FACTOR_COMPUTE, "measured_us"] == pytest.approx(100.0)
    assert got.loc[stages.FACTOR_COMPUTE, "error_pct"] == pytest.approx(-25.0)
    assert got.loc[stages.FORWARD, "error_pct"] == pytest.approx(10.0)
    assert got.loc[stages.BACKWARD, "error_pct"] == pytest.approx(-100.0)
    assert math.isnan(got.loc[stages.GRAD_COMM, "error_pct"])  # nothing measured: no relative error
    assert got.loc[stages.STEP, "error_pct"] == pytest.approx(((3 * 380 + 1000) / 4 - 500) / 5)


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
    summary["inverse_step_us"] = summary["step_us"] * 1.5  # the simulated step of each kind
    summary["factor_step_us"] = summary["step_us"] * 0.75
    pred_dir = synth.write_prediction_dir(tmp_path / "p", synth.prediction_meta(), summary,
                                          synth.make_stage_times(summary),
                                          synth.make_prediction_events(["spngd"], [2]))
    from kfacperf.report.inputs import load_predictions

    pred = load_predictions([pred_dir])[0]
    head = matching.headline([sgd, kfac], [pred]).set_index("run")

    def step_time(ev, inverse_interval):  # independent: per kind the median of the slowest
        rows = ev[ev["stage"].astype(str) == stages.STEP]  # rank's step row, weighted by the mix
        slowest = rows.groupby("step")["dur_us"].max()
        kinds = {}
        for step, t in slowest.items():
            kinds.setdefault(step % inverse_interval == 0, []).append(t)
        return sum(np.median(v) * len(v) for v in kinds.values()) / len(slowest), kinds

    kfac_step, kfac_kinds = step_time(kfac_ev, 2)  # steps 0, 2 invert; 1, 3 only factors
    sgd_step, _ = step_time(sgd_ev, 10**9)
    assert head.loc["kfac", "measured_step_us"] == pytest.approx(kfac_step)
    assert head.loc["kfac", "kfac_overhead_measured"] == pytest.approx(kfac_step / sgd_step)
    assert np.isnan(head.loc["sgd", "kfac_overhead_measured"])
    want = summary[(summary["strategy"] == "spngd") & (summary["gpus"] == 2)].iloc[0]
    predicted = (2 * want["inverse_step_us"] + 2 * want["factor_step_us"]) / 4
    assert sorted(len(v) for v in kfac_kinds.values()) == [2, 2]
    assert head.loc["kfac", "predicted_step_us"] == pytest.approx(predicted)
    # over the predicted SGD step, as the step beside it (the measured mix), not the row's ratio
    sgd_pred = summary[(summary["strategy"] == "sgd") & (summary["gpus"] == 2)].iloc[0]
    assert head.loc["kfac", "kfac_overhead_predicted"] == pytest.approx(
        predicted / sgd_pred["step_us"])
    assert head.loc["kfac", "error_pct"] == pytest.approx((predicted - kfac_step) / kfac_step * 100)


def test_comparison_without_predicted_events_shows_the_step_alone(synth, tmp_path):
    from kfacperf.report import sections
    from kfacperf.report.inputs import load_predictions

    run, _ = _load(synth, tmp_path, "kfac", strategy="spngd", world_size=2)
    summary = synth.make_summary()
    pred_dir = synth.write_prediction_dir(tmp_path / "p", synth.prediction_meta(), summary,
                                          synth.make_stage_times(summary),
                                          synth.make_prediction_events(["spngd"], [4096]))
    sec = sections.comparison_section([run], load_predictions([pred_dir]))
    html = "".join(b.html for b in sec.blocks)
    assert "no predicted stage times: the step alone" in html
    assert ">step<" in html and ">forward<" not in html
