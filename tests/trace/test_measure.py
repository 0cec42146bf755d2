"""kfacperf.trace.measure: the one definition of a run's step time and stage times, and the
parts that read it (trace summary, calibration) agreeing with it."""
from __future__ import annotations

from types import SimpleNamespace

import pandas as pd
import pytest

from kfacperf import vocab as S
from kfacperf.trace.compare import compare, compare_layers
from kfacperf.trace.measure import KindTimes, measure, measure_events, rank_step_times
from kfacperf.trace.store import load_trace, write_trace
from kfacperf.trace.summary import summarize

COLS = ["rank", "step", "stage", "layer", "lane", "start_us", "dur_us", "bytes", "flops"]


def kfac_step(rank: int, step: int, t0: float, *, slow: float = 1.0) -> list[tuple]:
    """One rank's K-FAC step on one process: forward 10, backward 30 with the statistics
    of layer a (5) nested in it, inverse of a (20) on inverse steps, update 2; x ``slow``."""
    inverse = step % 4 == 0
    rows = [(rank, step, S.FORWARD, "", t0, 10 * slow),
            (rank, step, S.BACKWARD, "", t0 + 10 * slow, 30 * slow),
            (rank, step, S.FACTOR_COMPUTE, "a", t0 + 20 * slow, 5 * slow)]
    t = t0 + 40 * slow
    if inverse:
        rows.append((rank, step, S.INVERSE, "a", t, 20 * slow))
        t += 20 * slow
    rows.append((rank, step, S.UPDATE, "", t, 2 * slow))
    rows.append((rank, step, S.STEP, "", t0, t + 2 * slow - t0))
    return rows


def trace_of(tmp_path, rows, name="t", **run):
    df = pd.DataFrame([r + (S.lane_of(r[2]), 0, 0.0) for r in rows],
                      columns=["rank", "step", "stage", "layer", "start_us", "dur_us", "lane",
                               "bytes", "flops"])[COLS]
    meta = {"workload": "mlp", "optimizer": "kfac", "strategy": "local", "world_size": 1,
            "factor_interval": 1, "inverse_interval": 4, "warmup": 1, "completed": True, **run}
    return load_trace(write_trace(tmp_path / name, run=meta,
                                  events={c: df[c].tolist() for c in COLS}))


def test_step_and_stage_times_per_kind_of_step(tmp_path) -> None:
    # steps 0..8, warm-up 1; step 0 is absurd; step 6 caught a burst of load (x3)
    rows = []
    for k in range(9):
        slow = 50.0 if k == 0 else 3.0 if k == 6 else 1.0
        rows += kfac_step(0, k, 1000.0 * k, slow=slow)
    m = measure(trace_of(tmp_path, rows))
    assert m.kinds == {"inverse": 2, "factor": 6}  # steps 4, 8 invert; 1-3, 5-7 only factors
    assert m.step_us == {"inverse": 62.0, "factor": 42.0}  # the median: the burst is left out
    assert m.step_time == pytest.approx((2 * 62 + 6 * 42) / 8)
    assert m.mean_step_us == pytest.approx((2 * 62 + 5 * 42 + 126) / 8)
    # backward exclusive of the statistics nested in it
    assert m.stage_us["factor"][S.BACKWARD] == 25.0
    assert m.stage_us["factor"][S.INVERSE] == 0.0
    assert m.stage_times()[S.INVERSE] == pytest.approx(20 * 2 / 8)
    assert m.layer_times()[(S.INVERSE, "a")] == pytest.approx(20 * 2 / 8)
    assert m.layer_times()[(S.FACTOR_COMPUTE, "a")] == pytest.approx(5.0)


def test_the_summary_and_the_overhead_use_the_one_step_time(tmp_path) -> None:
    rows = [r for k in range(9) for r in kfac_step(0, k, 1000.0 * k, slow=3.0 if k == 6 else 1)]
    t = trace_of(tmp_path, rows)
    s = summarize(t)
    assert s.step_us == measure(t).step_time
    assert s.step_mean_us > s.step_us  # the burst moves the mean, not the step time
    st = s.stages[s.stages["stage"] == S.BACKWARD].iloc[0]
    assert st["median_us"] == 25.0  # per-stage statistics of the exclusive time
    sgd_rows = [(0, k, S.STEP, "", 1000.0 * k, 20.0 if k != 3 else 90.0) for k in range(9)]
    sgd = trace_of(tmp_path, sgd_rows, name="sgd", optimizer="sgd", strategy="sgd")
    s = summarize(t, baseline=sgd)
    assert s.baseline_step_us == 20.0 and s.kfac_overhead == pytest.approx(s.step_us / 20.0)


def test_the_summary_per_rank_and_per_stage_numbers_take_the_steps_as_the_step_time(
        tmp_path) -> None:
    # two ranks; step 6 caught a burst of load (x100) on both
    rows = [r for k in range(9) for rank in (0, 1)
            for r in kfac_step(rank, k, 10_000.0 * k, slow=100.0 if k == 6 else 1)]
    t = trace_of(tmp_path, rows, world_size=2)
    s, m = summarize(t), measure(t)
    ranks = s.ranks.set_index("rank")
    assert list(ranks["step_us"]) == pytest.approx([m.step_time] * 2)
    per_step = s.stages.set_index(["stage", "rank"])["per_step_us"]
    for stage, want in m.stage_times().items():
        assert per_step[(stage, 0)] == pytest.approx(want), stage
    assert per_step[(S.BACKWARD, 1)] == 25.0  # not the mean, (7 * 25 + 2500) / 8
    assert per_step[(S.INVERSE, 1)] == pytest.approx(20 * 2 / 8)
    line = next(x for x in s.table().splitlines() if x.startswith(S.BACKWARD))
    assert line.split()[1] == "0.025"  # the profile table's per-step column
    assert (ranks["comm_us"] == 0).all() and s.comm_us == 0 and ranks["overlap_pct"].isna().all()


def test_a_rank_without_step_rows_takes_the_span_of_its_rows() -> None:
    rows = kfac_step(0, 1, 0.0) + [r for r in kfac_step(1, 1, 5.0) if r[2] != S.STEP]
    ev = pd.DataFrame([r + (S.lane_of(r[2]),) for r in rows],
                      columns=["rank", "step", "stage", "layer", "start_us", "dur_us", "lane"])
    per_rank = rank_step_times(ev)
    assert per_rank[(0, 1)] == 42.0 and per_rank[(1, 1)] == 42.0  # 5 .. 47
    run = {"optimizer": "kfac", "factor_interval": 1, "inverse_interval": 4, "world_size": 2}
    m = measure_events(ev, run)
    assert m.step_us == {"factor": 42.0}
    assert m.stage_us["factor"][S.BACKWARD] == 25.0  # both ranks: (25 + 25) / 2


def test_calibration_reads_only_the_measured_steps() -> None:
    """A trace object without ``measured()`` used to be calibrated on every event, warm-up
    included; now every reader takes the steps after ``run["warmup"]``."""
    from kfacperf.calibrate.device import fit_device_model
    from kfacperf.calibrate.host_gaps import kfac_trace_gaps_input
    from kfacperf.sim.models import load_workload

    w = load_workload("mlp")
    names = [layer.name for layer in w.layers]

    def events(slow: float, steps: range) -> pd.DataFrame:
        rows = []
        for k in steps:
            t0 = 1000.0 * k
            rows.append((0, k, S.FORWARD, "", t0, 10 * slow))
            rows.append((0, k, S.BACKWARD, "", t0 + 10 * slow, 30 * slow))
            for i, name in enumerate(names):
                rows.append((0, k, S.FACTOR_COMPUTE, name, t0 + 100 + 10 * i, 3 * slow))
                rows.append((0, k, S.PRECONDITION, name, t0 + 300 + 10 * i, 2 * slow))
            rows.append((0, k, S.UPDATE, "", t0 + 500, 2 * slow))
            rows.append((0, k, S.STEP, "", t0, 510))
        return pd.DataFrame([r + (S.lane_of(r[2]),) for r in rows],
                            columns=["rank", "step", "stage", "layer", "start_us", "dur_us",
                                     "lane"])

    run = {"workload": "mlp", "optimizer": "kfac", "strategy": "local", "world_size": 1,
           "batch_per_rank": 8, "factor_interval": 1, "inverse_interval": 100, "warmup": 5,
           "device": {"kind": "cpu", "name": "test"}, "threads_per_rank": 1}
    clean = SimpleNamespace(run=dict(run, warmup=0), events=events(1.0, range(5, 8)))
    noisy = SimpleNamespace(run=run, events=pd.concat([events(40.0, range(5)), clean.events]))
    fit = {k: fit_device_model([t], workloads={"mlp": w}, name="x").device
           for k, t in (("clean", clean), ("noisy", noisy))}
    assert fit["noisy"].stages == fit["clean"].stages
    assert fit["noisy"].measured == fit["clean"].measured and fit["clean"].measured
    assert kfac_trace_gaps_input(noisy, w)[1]["step"].min() == 5


def test_compare_weights_the_prediction_by_the_measured_mix_and_pairs_layers() -> None:
    from kfacperf.trace.measure import Measured

    m = Measured(kinds={"factor": 2}, step_us={"factor": 100.0},
                 stage_us={"factor": {S.BACKWARD: 50.0, S.FACTOR_COMPUTE: 20.0}},
                 layer_us={"factor": {(S.FACTOR_COMPUTE, "a"): 20.0}}, mean_step_us=100.0)
    p = KindTimes(step_us={"inverse": 500.0, "factor": 110.0, "plain": 80.0},
                  stage_us={"factor": {S.BACKWARD: 55.0, S.FACTOR_COMPUTE: 10.0,
                                       S.GRAD_COMM: 5.0}},
                  layer_us={"factor": {(S.FACTOR_COMPUTE, "a"): 10.0, (S.INVERSE, "b"): 1.0}})
    c = compare(m, p)
    assert (c.measured_step_us, c.predicted_step_us) == (100.0, 110.0)  # no inverse step
    assert c.error_pct == pytest.approx(10.0)
    st = c.stages.set_index("stage")
    assert list(st.index) == [S.BACKWARD, S.FACTOR_COMPUTE, S.GRAD_COMM]
    assert st.loc[S.BACKWARD, "error_pct"] == pytest.approx(10.0)
    assert st.loc[S.FACTOR_COMPUTE, "share_pct"] == pytest.approx(20.0)
    layers = compare_layers(m, p).set_index(["stage", "layer"])
    assert layers.loc[(S.FACTOR_COMPUTE, "a"), "error_pct"] == pytest.approx(-50.0)
    assert layers.loc[(S.INVERSE, "b"), "measured_us"] == 0.0
    with pytest.raises(ValueError, match="measured plain steps, which the prediction has none"):
        compare(Measured(kinds={"plain": 1}, step_us={"plain": 1.0}, stage_us={"plain": {}},
                         mean_step_us=1.0), KindTimes(step_us={"inverse": 1.0}, stage_us={}))
