"""Landing a ground-truth run that came back damaged: ``finish`` keeps what came back, names
what did not, exits non-zero, never raises, and never lets a bad copy replace a good trace."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd

from kfacperf.pipeline.ground_truth import archive as A
from kfacperf.pipeline.ground_truth.finish import finish
from kfacperf.pipeline.ground_truth.finish import main as finish_main

REF = Path(__file__).resolve().parents[2] / "traces" / "reference" / "p1"
TRACE = "resnet20-kaisa-b16-i1-r1"  # a real one-process K-FAC trace (12 steps, 6 warm-up)


def make_run(root: Path, *, names: tuple[str, ...] = ("a", "b", "c"),
             status: dict[str, str] | None = None) -> Path:
    """A ground-truth output folder: one profile task per name (each a copy of the reference
    trace), the timer overhead and the kernel timings (both ok)."""
    status = status or {}
    tasks = []
    for name in names:
        shutil.copytree(REF / TRACE, root / "traces" / "fp32" / name)
        tasks.append({"name": name, "kind": "profile", "status": status.get(name, "ok"),
                      "detail": "", "run": {"precision": "fp32", "role": "calibration",
                                            "batch": 16}})
    tasks += [{"name": "timer overhead", "kind": "overhead", "status": "ok"},
              {"name": "kernel timings", "kind": "kernels", "status": "ok"}]
    (root / "summary.json").write_text(json.dumps({"tasks": tasks, "finished": True}))
    (root / "env.json").write_text(json.dumps({"settings": {"device": "cpu"}}))
    (root / "timer_overhead.json").write_text(json.dumps({"target": 0.01, "results": [
        {"name": "a", "overhead_median": 0.004, "meets_target": True}]}))
    (root / "kernels.json").write_text(json.dumps({"eigh": [], "cholesky": [], "factors": [],
                                                   "gemm": [], "skipped": [
        {"measurement": "eigh", "what": "n=8192 fp64", "reason": "time budget spent"}]}))
    (root / "logs").mkdir()
    (root / "logs" / "a.log").write_text("per-stage summary\n")
    return root


def test_an_archive_cut_short_lands_every_member_before_the_cut(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    archive = A.pack(run, tmp_path / A.ARCHIVE_NAME)
    data = archive.read_bytes()
    archive.write_bytes(data[:int(0.8 * len(data))])
    code = finish_main([str(archive), "--into", str(tmp_path / "into")])
    out = capsys.readouterr().out
    assert code == 1
    assert "cut short or damaged" in out and "MISSING" in out
    # summary.json and the first trace precede the cut (members are packed in name order)
    assert (tmp_path / "into" / "summary.json").is_file()
    assert (tmp_path / "into" / "fp32" / "a" / "events.parquet").is_file()
    assert str(archive) in (tmp_path / "into" / "finish.txt").read_text()  # not a temp dir


def test_the_plain_unpack_still_refuses_a_cut_archive_before_writing(tmp_path):
    archive = A.pack(make_run(tmp_path / "run"), tmp_path / A.ARCHIVE_NAME)
    archive.write_bytes(archive.read_bytes()[:-200])
    try:
        A.unpack(archive, tmp_path / "back")
    except ValueError as exc:
        assert "cut short or damaged" in str(exc)
    else:
        raise AssertionError("a cut archive unpacked")
    assert not (tmp_path / "back").exists()


def test_a_bad_copy_never_replaces_a_landed_trace(tmp_path):
    into = tmp_path / "into"
    finish(make_run(tmp_path / "run1"), into, log=lambda line: None)
    landed = into / "fp32" / "b"
    before = {p.name: p.read_bytes() for p in landed.iterdir()}
    run2 = make_run(tmp_path / "run2")
    (run2 / "traces" / "fp32" / "b" / "events.parquet").write_bytes(b"garbage")
    done = finish(run2, into, force=True, log=lambda line: None)
    assert {p.name: p.read_bytes() for p in landed.iterdir()} == before
    assert any("fp32/b" in m for m in done.missing)
    text = (into / "finish.txt").read_text()
    assert "left from before" in text and "fp32/b/" in text


def test_a_trace_without_measured_steps_is_a_problem_and_not_validated(tmp_path):
    run = make_run(tmp_path / "run")
    events = run / "traces" / "fp32" / "a" / "events.parquet"
    ev = pd.read_parquet(events)
    ev[ev["step"] < 6].to_parquet(events)  # warm-up steps only
    done = finish(run, tmp_path / "into", log=lambda line: None)
    a = next(t for t in done.traces if t.name == "a")
    assert not a.usable and any("no measured step" in p for p in a.problems)
    assert all(t.usable for t in done.traces if t.name != "a")


def test_the_trace_of_a_failed_task_is_kept_apart_and_the_logs_land(tmp_path):
    run = make_run(tmp_path / "run", status={"c": "failed"})
    done = finish(run, tmp_path / "into", log=lambda line: None)
    assert sorted(t.name for t in done.traces) == ["a", "b"]
    assert (tmp_path / "into" / "incomplete" / "fp32" / "c" / "run.json").is_file()
    assert not (tmp_path / "into" / "fp32" / "c").exists()
    assert (tmp_path / "into" / "logs" / "a.log").is_file()
    text = (tmp_path / "into" / "finish.txt").read_text()
    assert "c: failed" in text
    assert "kernel timings: skipped eigh n=8192 fp64: time budget spent" in text
    assert "timer overhead: a: +0.40% (meets <=1%)" in text


def test_an_output_the_summary_calls_ok_but_missing_fails_the_landing(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    (run / "kernels.json").unlink()
    code = finish_main([str(run), "--into", str(tmp_path / "into")])
    out = capsys.readouterr().out
    assert code == 1 and "MISSING: kernel timings: no kernels.json though its task says ok" in out


def test_the_return_folder_is_taken_for_its_archive(tmp_path):
    A.hand_back(make_run(tmp_path / "run"), tmp_path / "returned")
    done = finish(tmp_path / "returned", tmp_path / "into", log=lambda line: None)
    assert sorted(t.name for t in done.traces) == ["a", "b", "c"] and not done.missing
