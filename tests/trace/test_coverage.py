"""kfacperf.trace.coverage: do a trace's stages add up to its steps?  Checked on hand-built
steps whose gap and overlap are known in closed form, and on the committed CPU traces."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from kfacperf import vocab as S
from kfacperf.trace.coverage import (
    STAGE_OVERRUN_PCT,
    STAGE_OVERRUN_US,
    check_stage_spans,
    coverage,
    coverage_of,
)
from kfacperf.trace.schema import events_frame
from kfacperf.trace.store import load_trace

REF = Path(__file__).resolve().parents[2] / "traces" / "reference"


def frame(rows: list[tuple]) -> pd.DataFrame:
    """Rows of (rank, step, stage, layer, start_us, dur_us)."""
    cols = list(zip(*rows))
    return events_frame({"rank": cols[0], "step": cols[1], "stage": cols[2], "layer": cols[3],
                         "lane": [S.lane_of(s) for s in cols[2]], "start_us": cols[4],
                         "dur_us": cols[5], "bytes": [0] * len(rows),
                         "flops": [0.0] * len(rows)})


def step_rows(step: int, t0: float, *, idle: float = 100.0) -> list[tuple]:
    """A 1000 µs step: forward 400, backward 400 holding the statistics of layer a (100),
    then ``idle`` µs in no stage, then the update filling the rest."""
    return [(0, step, S.STEP, "", t0, 1000.0),
            (0, step, S.FORWARD, "", t0, 400.0),
            (0, step, S.BACKWARD, "", t0 + 400, 400.0),
            (0, step, S.FACTOR_COMPUTE, "a", t0 + 500, 100.0),
            (0, step, S.UPDATE, "", t0 + 800 + idle, 200.0 - idle)]


def test_a_gap_between_stages_is_the_step_less_what_they_cover():
    cov = coverage_of(frame(step_rows(0, 0.0, idle=100.0)))
    [row] = cov.steps.itertuples()
    assert row.covered_us == pytest.approx(900.0) and row.compute_us == pytest.approx(900.0)
    assert row.gap_pct == pytest.approx(10.0)
    # the nested statistics are subtracted from backward, not counted twice
    assert row.exclusive_us == pytest.approx(900.0) and row.double_pct == pytest.approx(0.0)
    assert cov.problems() == ["steps: a median 10.0% of the step in no stage (limit 5%)"]
    assert coverage_of(frame(step_rows(0, 0.0, idle=30.0))).problems() == []


def test_stages_that_overlap_without_nesting_are_double_counted():
    rows = step_rows(0, 0.0, idle=100.0)
    rows.append((0, 0, S.PRECONDITION, "a", 750.0, 100.0))  # half inside backward, half idle
    cov = coverage_of(frame(rows))
    [row] = cov.steps.itertuples()
    assert row.exclusive_us - row.compute_us == pytest.approx(50.0)
    assert row.double_pct == pytest.approx(5.0)
    assert any("counted twice" in p for p in cov.problems())


def test_a_stage_outside_its_step_is_double_counted():
    rows = step_rows(0, 0.0, idle=0.0)
    rows.append((0, 0, S.UPDATE, "", 1000.0, 30.0))  # after the step row ended
    [row] = coverage_of(frame(rows)).steps.itertuples()
    assert row.gap_pct == pytest.approx(0.0) and row.double_pct == pytest.approx(3.0)


def test_a_collective_covers_the_time_a_rank_waits_in_it():
    rows = step_rows(0, 0.0, idle=100.0)
    rows.append((0, 0, S.GRAD_COMM, "", 790.0, 120.0))
    [row] = coverage_of(frame(rows)).steps.itertuples()
    assert row.compute_us == pytest.approx(900.0)
    assert row.covered_us == pytest.approx(1000.0) and row.gap_pct == pytest.approx(0.0)
    assert row.double_pct == pytest.approx(0.0)  # only compute stages can be double counted


def test_gaps_are_judged_per_kind_of_step_by_their_median(tmp_path):
    from kfacperf.trace.store import write_trace

    rows = []
    for k in range(7):  # steps 1..6 measured; step 3 stalled (15% idle), the others 2%
        rows += step_rows(k, 2000.0 * k, idle=150.0 if k == 3 else 20.0)
    df = frame(rows)
    run = {"workload": "mlp", "optimizer": "kfac", "strategy": "local", "world_size": 1,
           "factor_interval": 1, "inverse_interval": 3, "warmup": 1, "completed": True}
    cov = coverage(load_trace(write_trace(tmp_path / "t", run=run,
                                          events={c: df[c].tolist() for c in df.columns})))
    assert sorted(cov.steps["step"]) == [1, 2, 3, 4, 5, 6]
    assert dict(zip(cov.steps["step"], cov.steps["kind"])) == {
        1: "factor", 2: "factor", 3: "inverse", 4: "factor", 5: "factor", 6: "inverse"}
    assert cov.worst_gap_pct == pytest.approx(15.0)
    assert cov.median_gap_by_kind() == {"factor": pytest.approx(2.0),
                                        "inverse": pytest.approx(8.5)}
    assert cov.problems() == ["inverse steps: a median 8.5% of the step in no stage (limit 5%)"]


@pytest.mark.skipif(not (REF / "p1").is_dir(), reason="no committed reference traces")
def test_the_committed_one_process_traces_add_up_to_their_steps():
    """What the profiler records on one process accounts for the step: within 5% (the
    preconditioner's host work between stages is most of what is left) and nothing counted
    twice."""
    for path in sorted((REF / "p1").glob("*-r1")):
        cov = coverage(load_trace(path))
        assert cov.problems() == [], path.name
        assert cov.worst_double_pct < 1e-6, path.name
        assert cov.median_gap_pct < 5.0, path.name


class _Events:
    """What check_stage_spans reads: ``run``, ``events`` and ``path``."""

    def __init__(self, rows: list[tuple], *, warmup: int = 0, path: str = "t/run-1") -> None:
        self.run = {"warmup": warmup}
        self.events = frame(rows)
        self.path = Path(path)


def test_a_compute_stage_longer_than_its_step_is_refused():
    """Forward rows multiplied by 1e6 (14,000 s forwards in 0.33 s steps, as a corrupted
    file has them) are refused with the trace, the stage, a step and the rank named."""
    rows = step_rows(0, 0.0, idle=30.0) + step_rows(1, 1000.0, idle=30.0)
    rows = [(r, k, st, lay, t, d * 1e6 if st == S.FORWARD and k == 1 else d)
            for r, k, st, lay, t, d in rows]
    with pytest.raises(ValueError) as err:
        check_stage_spans(_Events(rows))
    msg = str(err.value)
    assert msg.startswith("t/run-1: step 1 (rank 0): forward lasts 400000.0 ms, longer than "
                          "its step (1.0 ms; 1 such event(s))")
    assert "\n" not in msg and "record it again or leave it out" in msg
    # a warm-up step is not measured: not refused
    check_stage_spans(_Events(rows, warmup=2))


def test_stage_span_tolerance_and_collectives_are_left_alone():
    """A compute stage may exceed its step by the tolerance (timers, rounding) and no more; a
    collective may outlast its step (asynchronous communication ends in the next one)."""
    limit = 1000.0 * (1 + STAGE_OVERRUN_PCT / 100) + STAGE_OVERRUN_US
    ok = step_rows(0, 0.0) + [(0, 0, S.PRECONDITION, "a", 0.0, limit - 1e-3),
                              (0, 0, S.GRAD_COMM, "", 900.0, 50_000.0)]
    check_stage_spans(_Events(ok))
    bad = step_rows(0, 0.0) + [(0, 0, S.PRECONDITION, "a", 0.0, limit + 1.0)]
    with pytest.raises(ValueError, match=r"step 0 \(rank 0\): precondition of layer a lasts"):
        check_stage_spans(_Events(bad))


@pytest.mark.skipif(not (REF / "p1").is_dir(), reason="no committed reference traces")
def test_the_committed_traces_have_no_stage_longer_than_its_step():
    for path in [*sorted((REF / "p1").glob("*-r1")), *sorted((REF / "p2").iterdir())]:
        check_stage_spans(load_trace(path))
