"""The trace functions called from Python with what a user has at hand: a trace directory's
path instead of a loaded trace, one value where a list is taken, a rank the trace lacks."""
from __future__ import annotations

from pathlib import Path

import pytest

from kfacperf import vocab as S
from kfacperf.trace.chrome import chrome_trace
from kfacperf.trace.measure import measure
from kfacperf.trace.store import load_trace, write_trace
from kfacperf.trace.summary import summarize


def write_run(tmp_path: Path, name: str = "t", *, optimizer: str = "kfac",
              world_size: int = 1) -> Path:
    """A small trace: 4 steps (1 warm-up) of forward, backward, update on each rank."""
    rows = []
    for rank in range(world_size):
        for k in range(4):
            t0 = 1000.0 * k
            rows += [(rank, k, S.STEP, "", t0, 100.0 + 10 * k),
                     (rank, k, S.FORWARD, "", t0, 30.0),
                     (rank, k, S.BACKWARD, "", t0 + 30, 50.0),
                     (rank, k, S.UPDATE, "", t0 + 80, 5.0)]
    cols = list(zip(*rows))
    events = {"rank": cols[0], "step": cols[1], "stage": cols[2], "layer": cols[3],
              "lane": [S.lane_of(s) for s in cols[2]], "start_us": cols[4], "dur_us": cols[5],
              "bytes": [0] * len(rows), "flops": [0.0] * len(rows)}
    run = {"workload": "mlp", "optimizer": optimizer, "strategy": "local" if optimizer != "sgd"
           else "sgd", "world_size": world_size, "batch_per_rank": 8, "warmup": 1,
           "factor_interval": 1, "inverse_interval": 1, "completed": True}
    return write_trace(tmp_path / name, run=run, events=events)


@pytest.mark.parametrize("as_", [str, Path])
def test_summarize_and_measure_take_a_trace_directory(tmp_path: Path, as_) -> None:
    path = write_run(tmp_path)
    loaded = load_trace(path)
    got = summarize(as_(path))
    assert got.step_us == summarize(loaded).step_us
    assert got.measured_steps == 3
    assert measure(as_(path)).step_us == measure(loaded).step_us
    assert measure(as_(path)).kinds == measure(loaded).kinds


def test_summarize_takes_a_baseline_directory(tmp_path: Path) -> None:
    kfac = write_run(tmp_path, "kfac")
    sgd = write_run(tmp_path, "sgd", optimizer="sgd")
    got = summarize(str(kfac), baseline=str(sgd))
    assert got.kfac_overhead == pytest.approx(1.0)
    assert got.baseline_step_us == summarize(load_trace(sgd)).step_us


def test_chrome_trace_of_a_rank_the_trace_lacks_is_an_error(tmp_path: Path) -> None:
    trace = load_trace(write_run(tmp_path, world_size=2))
    assert {e["pid"] for e in chrome_trace(trace, rank=1)["traceEvents"]} == {1}
    with pytest.raises(ValueError, match=r"rank 5: .* its ranks with events: 0, 1"):
        chrome_trace(trace, rank=5)
    with pytest.raises(ValueError, match="rank -1"):
        chrome_trace(trace, rank=-1)
    one = load_trace(write_run(tmp_path, "one"))
    with pytest.raises(ValueError, match="its ranks with events: 0$"):
        chrome_trace(one, rank=5)


def test_one_or_many() -> None:
    from kfacperf.trace.arguments import one_or_many

    assert one_or_many("abc", str, what="x") == ["abc"]
    assert one_or_many(Path("a"), (str, Path), what="x") == [Path("a")]
    assert one_or_many(64, int, what="gpus") == [64]
    assert one_or_many((1, 2), int, what="gpus") == [1, 2]
    assert one_or_many((c for c in ("a", "b")), str, what="x") == ["a", "b"]
    with pytest.raises(ValueError, match=r"gpus: expected a positive integer or a list of "
                                         r"them, got None"):
        one_or_many(None, int, what="gpus", expected="a positive integer")
    with pytest.raises(ValueError, match="names: expected one value or a list of them, got 'ab'"):
        one_or_many("ab", int, what="names")  # a str that is not taken alone: never its letters
