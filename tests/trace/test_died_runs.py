"""A run that died: its steps that only some ranks finished are no measurement of the run.

When a rank is killed, a peer may still finish the step it was in (its last collective done,
the local update left).  That step has one rank's rows: averaged over the run's ranks it
would count the missing rank's stages as 0.  Every reader of a trace takes the steps that
every rank finished, and the commands say what is missing."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from kfacperf import vocab as S
from kfacperf.trace.measure import measure, unfinished_steps
from kfacperf.trace.missing import incomplete_note
from kfacperf.trace.store import load_trace, write_trace
from kfacperf.trace.summary import summarize

ROOT = Path(__file__).resolve().parents[2]
REF = ROOT / "traces" / "reference" / "p2" / "resnet20-spngd-b16-i1-r1"
CAL = ROOT / "traces" / "reference" / "p1" / "resnet20-spngd-b16-i1-r1"
needs_reference = pytest.mark.skipif(not REF.is_dir() or not CAL.is_dir(),
                                     reason="no committed reference traces")


def _died(tmp_path: Path, *, last: int, drop_rank: int | None) -> Path:
    """The reference 2-rank run cut after step ``last`` as a killed run leaves it: marked
    incomplete, and ``drop_rank`` (if any) without its rows of step ``last``."""
    t = load_trace(REF)
    ev = t.events[t.events["step"] <= last]
    if drop_rank is not None:
        ev = ev[~((ev["rank"] == drop_rank) & (ev["step"] == last))]
    run = dict(t.run, completed=False, failure="rank 0 was killed by SIGKILL")
    name = f"died-{last}-{drop_rank}"
    return write_trace(tmp_path / name, run=run, events=ev)


def _by_hand(path: Path, stage: str) -> tuple[float, float]:
    """Step time and ``stage``'s time from the rows, as the README defines them: per step the
    slowest rank's ``step`` row, per step the stage's summed rows over the world size, each
    the median over the measured steps (one kind of step here: intervals 1/1), taking only the
    steps every rank recorded."""
    run = json.loads((path / "run.json").read_text())
    ev = pd.read_parquet(path / "events.parquet")
    ev = ev[ev["step"] >= run["warmup"]]
    ranks = ev.groupby("step")["rank"].nunique()
    ev = ev[ev["step"].isin(ranks.index[ranks == run["world_size"]])]
    step = ev[ev["stage"] == S.STEP].groupby("step")["dur_us"].max().median()
    per = ev[ev["stage"] == stage].groupby("step")["dur_us"].sum() / run["world_size"]
    return float(step), float(per.median())


@needs_reference
def test_a_step_only_some_ranks_finished_is_left_out(tmp_path) -> None:
    uneven = _died(tmp_path, last=13, drop_rank=0)  # warm-up 6: steps 6..12 measured
    whole = _died(tmp_path, last=12, drop_rank=None)  # the same run, one step earlier
    assert unfinished_steps(load_trace(uneven).events) == [13]
    m, ref = measure(uneven), measure(whole)
    assert m.kinds == ref.kinds == {"inverse": 7}
    assert m.step_time == ref.step_time
    assert m.stage_times() == ref.stage_times()
    step_us, update_us = _by_hand(uneven, S.UPDATE)
    assert m.step_time == pytest.approx(step_us)
    assert m.stage_times()[S.UPDATE] == pytest.approx(update_us)
    # the summary (profile, report) takes the same steps and says what is missing
    s = summarize(uneven)
    assert s.measured_steps == 7 and s.step_us == m.step_time
    assert "step(s) 13 finished by only some ranks, left out" in s.table()


@needs_reference
def test_the_note_says_what_the_run_kept_and_what_is_missing(tmp_path) -> None:
    note = incomplete_note(load_trace(_died(tmp_path, last=13, drop_rank=0)), "d")
    assert note.startswith("d: the run did not complete (rank 0 was killed by SIGKILL)")
    assert "7 measured step(s) finished by every rank of 12 planned" in note
    assert "step(s) 13 finished by only some ranks" in note
    assert incomplete_note(load_trace(REF), "r") == ""


@needs_reference
def test_no_step_every_rank_finished_is_named(tmp_path) -> None:
    only = _died(tmp_path, last=6, drop_rank=1)  # the first measured step, rank 0's alone
    with pytest.raises(ValueError, match="no measured step that every rank finished"):
        measure(only)


@needs_reference
def test_validate_and_report_say_what_is_missing(tmp_path, capsys) -> None:
    from kfacperf.cli.app import main
    from kfacperf.validation import validate

    uneven = _died(tmp_path, last=13, drop_rank=0)
    cluster = ROOT / "traces" / "reference" / "local-cpu.toml"
    res = validate([CAL], [uneven], cluster=cluster)
    assert any("step(s) 13 finished by only some ranks, left out" in n for n in res.notes)
    assert res.runs.loc[0, "measured_step_us"] == pytest.approx(_by_hand(uneven, S.UPDATE)[0])
    out = tmp_path / "r.html"
    assert main(["report", "--trace", str(uneven), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "note: " in printed and "step(s) 13 finished by only some ranks" in printed
    assert "step(s) 13 finished by only some ranks" in out.read_text()


@needs_reference
def test_calibrate_json_stays_json_with_an_incomplete_trace(tmp_path, capsys) -> None:
    from kfacperf.cli.app import main

    died = tmp_path / "died-p1"
    t = load_trace(CAL)
    write_trace(died, run=dict(t.run, completed=False), events=t.events)
    assert main(["calibrate", str(died), "--json"]) == 0
    captured = capsys.readouterr()
    doc = json.loads(captured.out)  # the warning went to stderr
    assert any("did not complete" in n for n in doc["notes"])
    assert "calibrate: warning:" in captured.err and "did not complete" in captured.err
