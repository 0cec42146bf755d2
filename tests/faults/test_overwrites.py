"""No writer replaces a trace, a preset or an existing file without --force, and what is
written is written whole (a temporary file renamed into place) or not at all.
"""
from __future__ import annotations

import shutil

import pytest

from helpers.faults import CLUSTER, TRACE_1P, TRACE_2P, assert_one_line_error, copy_trace, run_cli

SIM = ["simulate", "--workload", "mlp", "--device", "h100", "--cluster", "dgx-h100-ndr",
       "--gpus", "1,2", "--strategy", "sgd"]
RAW = CLUSTER.parent / "commbench.json"

# name -> argv writing to {out}; whether --out is a directory
WRITERS = {
    "simulate": (SIM + ["--out", "{out}"], True),
    "report": (["report", "--trace", TRACE_1P, "--out", "{out}"], False),
    "export": (["export", "--chrome", TRACE_1P, "--out", "{out}"], False),
    "export --per-rank": (["export", "--chrome", TRACE_1P, "--per-rank", "--out", "{out}"], True),
    "calibrate": (["calibrate", TRACE_1P, "--out", "{out}"], False),
    "calibrate --workload": (["calibrate", "--workload", "mlp", "--out", "{out}"], False),
    "validate": (["validate", "--calibrate", TRACE_1P, "--holdout", TRACE_2P, "--cluster",
                  CLUSTER, "--out", "{out}.json"], False),
    "commbench --out": (["commbench", "--from-raw", RAW, "--out", "{out}"], False),
    "commbench --raw": (["commbench", "--from-raw", RAW, "--raw", "{out}"], False),
    "plan": (["plan", "--workload", "resnet50", "--device", "h100", "--cluster", "dgx-h100-ndr",
              "--gpus", "8", "--convergence", "mlperf-v0.7-lars-resnet50", "spngd-resnet50",
              "--batch-per-gpu", "32", "--intervals", "10/100", "--quiet", "--out", "{out}"],
             False),
}


def argv_for(writer: str, out) -> list[str]:
    argv, _ = WRITERS[writer]
    return [str(a).replace("{out}", str(out)) for a in argv]


@pytest.mark.parametrize("writer", list(WRITERS))
def test_a_second_write_needs_force(tmp_path, capsys, writer):
    out = tmp_path / "out"
    first = run_cli(capsys, argv_for(writer, out))
    assert first.status == 0, first.err
    target = out if WRITERS[writer][1] else tmp_path / (
        "out.json" if writer == "validate" else "out")
    before = sorted(p.read_bytes() for p in ([target] if target.is_file() else
                                            target.rglob("*")) if p.is_file())
    again = run_cli(capsys, argv_for(writer, out))
    assert_one_line_error(again, names="pass --force")
    after = sorted(p.read_bytes() for p in ([target] if target.is_file() else
                                           target.rglob("*")) if p.is_file())
    assert after == before  # untouched
    forced = run_cli(capsys, [*argv_for(writer, out), "--force"])
    assert forced.status == 0, forced.err


def test_simulate_never_replaces_a_measured_trace(tmp_path, capsys):
    trace = copy_trace(TRACE_1P, tmp_path / "trace")
    events = (trace / "events.parquet").read_bytes()
    for extra in ([], ["--force"]):
        result = run_cli(capsys, [*SIM, "--out", trace, *extra])
        assert_one_line_error(result, names="holds a measured trace (run.json)")
    assert (trace / "events.parquet").read_bytes() == events


@pytest.mark.parametrize("out, per_rank, names", [
    ("run.json", False, "is the trace's own run.json"),
    ("events.parquet", False, "is the trace's own events.parquet"),
    ("hard-link", False, "is the trace's own events.parquet"),
    ("parts/x.json", False, "inside the trace's parts/ folder"),
    (".", False, "is the trace directory being exported"),
    (".", True, "is the trace directory being exported"),
    ("parts", True, "inside the trace's parts/ folder"),
])
def test_export_never_writes_onto_the_trace_it_reads(tmp_path, capsys, out, per_rank, names):
    import os

    trace = copy_trace(TRACE_1P, tmp_path / "trace")
    (trace / "parts").mkdir()
    if out == "hard-link":
        os.link(trace / "events.parquet", tmp_path / "hard-link")
        target = tmp_path / "hard-link"
    else:
        target = trace / out
    before = {p: p.read_bytes() for p in trace.rglob("*") if p.is_file()}
    argv = ["export", "--chrome", trace, "--out", target, "--force"]
    result = run_cli(capsys, argv + (["--per-rank"] if per_rank else []))
    assert_one_line_error(result, names=names)
    assert result.status == 2
    assert {p: p.read_bytes() for p in trace.rglob("*") if p.is_file()} == before
    # the default output, a new file inside the trace directory, is still written (again
    # with --force)
    for _ in range(2):
        assert run_cli(capsys, ["export", "--chrome", trace, "--force"]).status == 0
    assert (trace / "trace.json").is_file() and (trace / "run.json").read_bytes() == before[
        trace / "run.json"]


FILE_WRITERS = [w for w, (_, is_dir) in WRITERS.items() if not is_dir]


@pytest.mark.parametrize("name", ["run.json", "events.parquet", "workload.toml",
                                  "parts/events-rank0.jsonl"])
@pytest.mark.parametrize("writer", FILE_WRITERS)
def test_no_file_writer_replaces_a_measured_traces_file_even_with_force(
        tmp_path, capsys, writer, name):
    """`calibrate --out T/run.json --force` replaced a trace's run.json with a device model,
    and `validate --out T/events.parquet --force` its events: every writer of a file refuses
    a measured trace's own files and its parts/ (a trace other than the one read too), and
    leaves the trace as it was; a new name beside them is fine."""
    victim = copy_trace(TRACE_2P, tmp_path / "victim")
    (victim / "parts").mkdir(exist_ok=True)
    (victim / "parts" / "events-rank0.jsonl").write_text("")
    before = {p: p.read_bytes() for p in victim.rglob("*") if p.is_file()}
    target = victim / name
    argv = [a for a in argv_for(writer, target)]
    if writer == "validate":  # its argv adds .json to {out}
        argv = [str(target) if a == f"{target}.json" else a for a in argv]
    got = run_cli(capsys, [*argv, "--force"])
    assert_one_line_error(got, names="measured trace")
    assert str(victim) in got.err
    assert {p: p.read_bytes() for p in victim.rglob("*") if p.is_file()} == before
    beside = run_cli(capsys, [*argv_for(writer, victim / "mine"), "--force"])
    assert beside.status == 0, beside.err


def test_simulate_force_replaces_only_a_prediction(tmp_path, capsys):
    out = tmp_path / "mixed"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = run_cli(capsys, [*SIM, "--out", out, "--force"])
    assert_one_line_error(result, names="holds files this command did not write")
    assert (out / "notes.txt").read_text() == "mine"


def test_calibrate_refuses_a_committed_preset_by_name(tmp_path, capsys, monkeypatch):
    from kfacperf.sim.models.presets import models_dir

    models = tmp_path / "models"
    shutil.copytree(models_dir(), models)
    monkeypatch.setenv("KFACPERF_MODELS", str(models))
    preset = models / "devices" / "h100-sxm5.toml"
    text = preset.read_text()
    result = run_cli(capsys, ["calibrate", TRACE_1P, "--out", preset])
    assert_one_line_error(result, names="(a committed preset under")
    assert preset.read_text() == text


def test_the_demo_refuses_a_directory_of_other_files(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("keep me")
    result = run_cli(capsys, ["demo", "--quick", "--out", out])
    assert_one_line_error(result, names="already exists and is not empty; pass --force")
    assert (out / "thesis.tex").read_text() == "keep me"


def test_a_write_that_fails_leaves_the_old_file_whole(tmp_path):
    from kfacperf.safety import atomic_path, atomic_write_text

    target = atomic_write_text(tmp_path / "report.html", "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]  # no temporary left
    atomic_write_text(target, "new")
    assert target.read_text() == "new"


def test_a_directory_of_other_files_is_refused_without_suggesting_force(tmp_path, capsys):
    """simulate --out DIR holding a user's notes said 'pass --force', and --force then
    refused: the first answer already says what would work."""
    out = tmp_path / "d"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for extra in ([], ["--force"]):
        got = run_cli(capsys, [*SIM, "--out", out, *extra])
        assert_one_line_error(got, names="holds files this command did not write")
        assert "--force" not in got.err
    assert (out / "notes.txt").read_text() == "mine"
