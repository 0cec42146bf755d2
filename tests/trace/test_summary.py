"""summarize() and the Chrome export against hand-computed values on a synthetic trace."""
from __future__ import annotations

import json

import pytest

from kfacperf.trace.chrome import COMM_TID, COMPUTE_TID, chrome_trace, export_chrome
from kfacperf.trace.intervals import intersection_length, merge_intervals
from kfacperf.trace.schema import TraceError
from kfacperf.trace.store import load_trace, write_trace
from kfacperf.trace.summary import summarize

# (rank, step, stage, layer, start, dur, bytes)
ROWS = [
    # step 0 is warm-up: absurd numbers that must not show up anywhere
    (0, 0, "step", "", 0, 5000, 0), (0, 0, "forward", "", 0, 4000, 0),
    (1, 0, "step", "", 0, 6000, 0), (1, 0, "grad_comm", "", 0, 6000, 8),
    # step 1, rank 0: compute [1000,1070) U [1090,1100); comm [1050,1080) U [1060,1090)
    (0, 1, "step", "", 1000, 100, 0),
    (0, 1, "forward", "", 1000, 30, 0),
    (0, 1, "backward", "", 1030, 40, 0),
    (0, 1, "factor_compute", "fc1", 1040, 10, 0),  # nested inside backward
    (0, 1, "factor_comm", "fc1", 1050, 30, 100),
    (0, 1, "grad_comm", "", 1060, 30, 200),
    (0, 1, "update", "", 1090, 10, 0),
    # step 1, rank 1: compute [1000,1100) U [1110,1120); comm [1100,1110)
    (1, 1, "step", "", 1000, 120, 0),
    (1, 1, "forward", "", 1000, 40, 0),
    (1, 1, "backward", "", 1040, 60, 0),
    (1, 1, "grad_comm", "", 1100, 10, 200),
    (1, 1, "update", "", 1110, 10, 0),
    # step 2, rank 0: comm entirely inside compute; two factor_comm layers
    (0, 2, "step", "", 2000, 80, 0),
    (0, 2, "backward", "", 2000, 60, 0),
    (0, 2, "factor_comm", "fc1", 2010, 20, 100),
    (0, 2, "factor_comm", "fc2", 2020, 20, 50),
    (0, 2, "update", "", 2060, 20, 0),
    # step 2, rank 1: nothing but comm and an idle gap
    (1, 2, "step", "", 2000, 90, 0),
    (1, 2, "forward", "", 2000, 30, 0),
    (1, 2, "grad_comm", "", 2040, 40, 200),
]


def make_trace(tmp_path, rows=ROWS, name="t", **run):
    from kfacperf.vocab import lane_of

    cols = list(zip(*rows))
    events = {
        "rank": cols[0], "step": cols[1], "stage": cols[2], "layer": cols[3],
        "lane": [lane_of(s) for s in cols[2]], "start_us": [float(x) for x in cols[4]],
        "dur_us": [float(x) for x in cols[5]], "bytes": cols[6], "flops": [0.0] * len(rows),
    }
    meta = {"workload": "mlp", "optimizer": "kfac", "world_size": 2, "batch_per_rank": 8,
            "warmup": 1, "completed": True, **run}
    return load_trace(write_trace(tmp_path / name, run=meta, events=events))


def test_interval_arithmetic():
    u = merge_intervals([5, 0, 2, 10], [6, 3, 4, 12])
    assert u.tolist() == [[0, 4], [5, 6], [10, 12]]
    v = merge_intervals([3, 11], [5.5, 20])
    assert intersection_length(u, v) == pytest.approx(1 + 0.5 + 1)
    assert intersection_length(u, merge_intervals([], [])) == 0


def test_summary_against_hand_computed_values(tmp_path):
    s = summarize(make_trace(tmp_path))
    assert s.measured_steps == 2
    ps = s.per_step.set_index(["rank", "step"])
    # rank 0 step 1: comm union [1050,1090)=40, covered by compute [1050,1070)=20
    assert ps.loc[(0, 1), "comm_us"] == 40
    assert ps.loc[(0, 1), "compute_us"] == 80
    assert ps.loc[(0, 1), "exposed_comm_us"] == 20
    assert ps.loc[(0, 1), "overlap_pct"] == 50
    assert ps.loc[(0, 1), "idle_us"] == 0
    # rank 1 step 1: all 10 us of comm exposed
    assert (ps.loc[(1, 1), "comm_us"], ps.loc[(1, 1), "exposed_comm_us"]) == (10, 10)
    assert ps.loc[(1, 1), "overlap_pct"] == 0
    # rank 0 step 2: comm [2010,2040) inside backward [2000,2060)
    assert (ps.loc[(0, 2), "comm_us"], ps.loc[(0, 2), "exposed_comm_us"]) == (30, 0)
    # rank 1 step 2: forward 30, comm 40 exposed, idle = 90 - 70
    assert ps.loc[(1, 2), "exposed_comm_us"] == 40 and ps.loc[(1, 2), "idle_us"] == 20
    # step time = slowest rank per step: step 1 max(100,120), step 2 max(80,90)
    assert s.step_median_us == pytest.approx(105)
    assert s.step_p95_us == pytest.approx(90 + 0.95 * 30)
    assert s.comm_us == pytest.approx((40 + 10 + 30 + 40) / 4)
    assert s.exposed_comm_us == pytest.approx((20 + 10 + 0 + 40) / 4)
    assert s.overlap_pct == pytest.approx(100 * (20 + 0 + 30 + 0) / (40 + 10 + 30 + 40))
    # the text says which definition its comm line uses: waits count there, not in the rows
    assert (f"time in collectives per rank (waits for peers included, unlike the stage rows): "
            f"{s.comm_us / 1e3:.3f} ms/step") in s.table()
    # the step time is kfacperf.trace.measure's: both measured steps are of one kind (the
    # intervals are 1/1), so the median of 120 and 90
    assert s.step_us == s.measured.step_time == pytest.approx(105)
    assert s.step_mean_us == pytest.approx(105)
    st = s.stages.set_index(["stage", "rank"])
    # stage times as kfacperf.trace.measure defines them.  factor_comm on rank 0: 30 in step 1;
    # in step 2 fc1 [2010,2030), then fc2, issued at 2020 while fc1 is in flight, runs
    # [2030,2040): 20 + 10 (a rank runs its collectives one after another)
    fc = st.loc[("factor_comm", 0)]
    assert (fc["count"], fc["mean_us"], fc["median_us"], fc["p95_us"]) == (2, 30, 30, 30)
    assert fc["per_step_us"] == 30
    # factor_compute ran in one of two measured steps: per_step spreads it
    fcomp = st.loc[("factor_compute", 0)]
    assert (fcomp["count"], fcomp["mean_us"], fcomp["per_step_us"]) == (1, 10, 5)
    # backward exclusive of the factor statistics nested in it: rank 0 (40 - 10) and 60
    assert st.loc[("backward", 0), "per_step_us"] == (30 + 60) / 2
    # grad_comm in step 1: rank 0 issues it at 1060 behind factor_comm (runs from 1080), rank 1
    # at 1100; from the last start to the last completion (1110) it costs 10 to both.
    # In step 2 only rank 1 has one: 40.  Per step: rank 0 10 / 2, rank 1 (10 + 40) / 2
    assert st.loc[("grad_comm", 0), "per_step_us"] == 5
    assert st.loc[("grad_comm", 1), "per_step_us"] == 25
    slow = s.slowest.set_index("stage")
    assert slow.loc["grad_comm", "slowest_rank"] == 1
    assert slow.loc["grad_comm", "imbalance"] == pytest.approx(25 / 15)
    assert slow.loc["backward", "slowest_rank"] == 0  # (30+60)/2=45 vs 60/2=30
    assert "step" not in set(s.stages["stage"])
    text = s.table()
    assert "grad_comm" in text and "overlap 41.7%" in text
    assert "step time: 0.105 ms (the median of each kind of step, weighted by the mix: " \
        "2 inverse)" in text
    assert "all 2 measured steps: mean 0.105 ms, median 0.105 ms, p95 0.118 ms" in text
    assert s.kfac_overhead is None


def test_overhead_over_sgd_baseline(tmp_path):
    kfac = make_trace(tmp_path)
    base_rows = [(r, st, "step", "", 1000 * st, 70 if st == 1 else 50, 0)
                 for r in (0, 1) for st in (0, 1, 2)]
    sgd = make_trace(tmp_path, base_rows, name="sgd", optimizer="sgd")
    s = summarize(kfac, baseline=sgd)
    assert s.baseline_step_us == pytest.approx(60)
    assert s.kfac_overhead == pytest.approx(105 / 60)
    assert "overhead over SGD: 1.750x" in s.table()
    rows4 = [(r, st, "step", "", 1000 * st, 50, 0) for r in range(4) for st in (0, 1, 2)]
    other = make_trace(tmp_path, rows4, name="sgd4", optimizer="sgd", world_size=4)
    with pytest.raises(TraceError, match="world_size=4"):
        summarize(kfac, baseline=other)
    with pytest.raises(TraceError, match="optimizer 'kfac', expected 'sgd'"):
        summarize(kfac, baseline=kfac)


def test_summary_of_warmup_only_trace_is_an_error(tmp_path):
    t = make_trace(tmp_path, ROWS[:4], warmup=1)
    with pytest.raises(TraceError, match=r"no measured step: all 1 recorded step\(s\) are "
                                         r"warm-up \(warmup = 1\)"):
        summarize(t)


def test_chrome_export(tmp_path):
    rows = ROWS + [(0, 2, "precond_comm", "fc1", 2030, 40, 10)]  # partly overlaps factor_comm
    trace = make_trace(tmp_path, rows)
    doc = chrome_trace(trace)
    x = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    assert len(x) == len(rows)
    assert doc["distributedInfo"] == {"world_size": 2}
    assert {e["pid"] for e in x} == {0, 1}
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in doc["traceEvents"]
             if e["ph"] == "M" and e["name"] == "thread_name"}
    assert names[(0, COMPUTE_TID)] == "compute" and names[(0, COMM_TID)] == "comm"
    fc1 = next(e for e in x if e["name"] == "factor_comm fc1" and e["args"]["step"] == 1)
    assert (fc1["ts"], fc1["dur"], fc1["tid"], fc1["cat"]) == (1050, 30, COMM_TID, "comm")
    assert fc1["args"] == {"step": 1, "stage": "factor_comm", "layer": "fc1", "bytes": 100,
                           "flops": 0.0}
    # step 2 rank 0: factor_comm fc1 [2010,2030), fc2 [2020,2040), precond [2030,2070):
    # fc2 partly overlaps fc1 -> second track; precond fits on the first once fc1 ended
    tid = {e["name"]: e["tid"] for e in x if e["pid"] == 0 and e["args"]["step"] == 2}
    assert tid["factor_comm fc1"] == COMM_TID and tid["factor_comm fc2"] == COMM_TID + 1
    assert tid["precond_comm fc1"] == COMM_TID
    assert names[(0, COMM_TID + 1)] == "comm 2"
    for pid in (0, 1):  # every track has no partial overlaps
        for t in {e["tid"] for e in x if e["pid"] == pid}:
            ev = [(e["ts"], e["ts"] + e["dur"]) for e in x if (e["pid"], e["tid"]) == (pid, t)]
            for i, (a0, a1) in enumerate(ev):
                for b0, b1 in ev[i + 1:]:
                    disjoint = b0 >= a1 or a0 >= b1
                    nested = (a0 <= b0 and b1 <= a1) or (b0 <= a0 and a1 <= b1)
                    assert disjoint or nested
    files = export_chrome(trace, tmp_path / "per", per_rank=True)
    assert [f.name for f in files] == ["rank0.json", "rank1.json"]
    one = json.loads(files[1].read_text())
    assert one["distributedInfo"] == {"world_size": 2, "rank": 1}
    assert {e["pid"] for e in one["traceEvents"]} == {1}
