"""A trace that lacks part of its run is refused by every reader, instead of being taken
for a smaller run (a 2-rank run missing rank 1 is not a 1-rank run; world_size 1,000,000
with the events of 2 ranks is not a million-rank run).
"""
from __future__ import annotations

import json

import pandas as pd
import pytest

from helpers.faults import CLUSTER, TRACE_1P, TRACE_2P, assert_one_line_error, copy_trace, run_cli

READERS = {
    "report": lambda t, tmp: ["report", "--trace", t, "--out", tmp / "r.html"],
    "export": lambda t, tmp: ["export", "--chrome", t, "--out", tmp / "e.json"],
    "calibrate": lambda t, tmp: ["calibrate", t, "--out", tmp / "c.toml"],
    "validate": lambda t, tmp: ["validate", "--calibrate", TRACE_1P, "--holdout", t,
                                "--cluster", CLUSTER],
}


def drop_rank_rows(trace):
    ev = pd.read_parquet(trace / "events.parquet")
    ev[ev["rank"] == 0].to_parquet(trace / "events.parquet", index=False)


def set_world(trace, world):
    run = json.loads((trace / "run.json").read_text())
    if world is None:
        del run["world_size"]
    else:
        run["world_size"] = world
    (trace / "run.json").write_text(json.dumps(run))


DAMAGE = {
    "rank 1's rows missing": (drop_rank_rows, "rank(s) 1 (1 of 2) have no events"),
    "world_size 1000000": (lambda t: set_world(t, 1_000_000),
                           "rank(s) 2, 3, 4, 5, 6, ... (999,998 of 1,000,000) have no events"),
    "no world_size": (lambda t: set_world(t, None), "no 'world_size'"),
    "a rank beyond world_size": (lambda t: set_world(t, 1), "events of rank 1 in a run of "
                                                            "world_size 1"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
@pytest.mark.parametrize("reader", list(READERS))
def test_a_trace_missing_ranks_is_refused(tmp_path, capsys, reader, case):
    trace = copy_trace(TRACE_2P, tmp_path / "t")
    damage, names = DAMAGE[case]
    damage(trace)
    assert_one_line_error(run_cli(capsys, READERS[reader](trace, tmp_path)), names=names)


def test_an_unfinished_run_missing_a_part_file_is_refused(tmp_path, capsys):
    """A crashed 2-rank run whose rank 1 part file is gone: its rank 0 rows alone are not
    the run."""
    from kfacperf.trace import parts
    from kfacperf.trace.store import load_trace

    trace = copy_trace(TRACE_2P, tmp_path / "t")
    ev = pd.read_parquet(trace / "events.parquet")
    (trace / "events.parquet").unlink()
    run = json.loads((trace / "run.json").read_text())
    run["completed"] = False
    (trace / "run.json").write_text(json.dumps(run))
    sink = parts.event_appender(trace, 0)
    rows = ev[ev["rank"] == 0]
    sink.append({c: [str(v) if c in ("stage", "layer", "lane") else v for v in rows[c]]
                 for c in ev.columns})
    sink.close()
    assert_one_line_error(run_cli(capsys, READERS["report"](trace, tmp_path)),
                          names="rank(s) 1 (1 of 2) have no events")
    # what a failed run's own report reads: the partial trace, rank by rank
    assert set(load_trace(trace, partial=True).events["rank"]) == {0}
