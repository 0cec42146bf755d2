"""Hostile input files, given to every command that reads them: nesting deeper than a parser
can recurse, a directory, a FIFO (which blocks a reader forever), a link to /dev/zero (an
endless file), garbage.  Each ends with exit status 1 or 2 and one line naming the file,
never a traceback or a hang.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers.faults import (
    CLUSTER,
    TRACE_1P,
    TRACE_2P,
    assert_one_line_error,
    copy_trace,
    run_cli,
)

DEEP_JSON = "[" * 100_000 + "]" * 100_000
DEEP_TOML = "a = " + "[" * 100_000 + "]" * 100_000 + "\n"


def damage(path: Path, how: str) -> None:
    """Replace the file ``path`` by something hostile."""
    if path.is_dir():
        import shutil

        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    if how == "deep":
        path.write_text(DEEP_TOML if path.suffix == ".toml" else DEEP_JSON)
    elif how == "nested object":
        path.write_text('{"workload": ' + "[" * 200 + "]" * 200 + "}")
    elif how == "a directory":
        path.mkdir()
    elif how == "a fifo":
        os.mkfifo(path)
    elif how == "a link to /dev/zero":
        path.symlink_to("/dev/zero")
    elif how == "garbage":
        path.write_bytes(b"\x00\xff\xfe not a file of this kind \x1b[2J" * 50)
    elif how == "NaN":
        path.write_text('{"world_size": NaN, "workload": "mlp"}')
    else:  # pragma: no cover
        raise ValueError(how)


TRACE_READERS = {
    "report": lambda t, tmp: ["report", "--trace", t, "--out", tmp / "r.html"],
    "export": lambda t, tmp: ["export", "--chrome", t, "--out", tmp / "e.json"],
    "calibrate": lambda t, tmp: ["calibrate", t, "--out", tmp / "c.toml"],
    "validate --calibrate": lambda t, tmp: ["validate", "--calibrate", t, "--holdout", TRACE_2P,
                                            "--cluster", CLUSTER],
    "validate --holdout": lambda t, tmp: ["validate", "--calibrate", TRACE_1P, "--holdout", t,
                                          "--cluster", CLUSTER],
    "profile --baseline": lambda t, tmp: ["profile", "--workload", "mlp", "--baseline", t,
                                          "--out", tmp / "p"],
}
RUN_JSON_DAMAGE = ["deep", "nested object", "a directory", "a fifo", "a link to /dev/zero",
                   "garbage", "NaN"]
EVENTS_DAMAGE = ["a directory", "a fifo", "a link to /dev/zero", "garbage"]


@pytest.mark.parametrize("how", RUN_JSON_DAMAGE)
@pytest.mark.parametrize("reader", list(TRACE_READERS))
def test_hostile_run_json(tmp_path, capsys, no_hang, reader, how):
    trace = copy_trace(TRACE_2P if "calibrate" in reader else TRACE_1P, tmp_path / "t")
    damage(trace / "run.json", how)
    result = run_cli(capsys, TRACE_READERS[reader](trace, tmp_path))
    assert_one_line_error(result, names="run.json")


@pytest.mark.parametrize("how", EVENTS_DAMAGE)
@pytest.mark.parametrize("reader", list(TRACE_READERS))
def test_hostile_events_file(tmp_path, capsys, no_hang, reader, how):
    trace = copy_trace(TRACE_2P if "calibrate" in reader else TRACE_1P, tmp_path / "t")
    damage(trace / "events.parquet", how)
    result = run_cli(capsys, TRACE_READERS[reader](trace, tmp_path))
    assert_one_line_error(result, names="events.parquet")


def _prediction(tmp_path: Path, capsys) -> Path:
    out = tmp_path / "pred"
    assert run_cli(capsys, ["simulate", "--workload", "mlp", "--device", "h100", "--cluster",
                            "dgx-h100-ndr", "--gpus", "1,2", "--out", out]).status == 0
    return out


@pytest.mark.parametrize("how", ["deep", "a directory", "a fifo", "a link to /dev/zero",
                                 "garbage"])
@pytest.mark.parametrize("name", ["prediction.json", "summary.parquet"])
def test_hostile_prediction(tmp_path, capsys, no_hang, name, how):
    pred = _prediction(tmp_path, capsys)
    damage(pred / name, how)
    result = run_cli(capsys, ["report", "--prediction", pred, "--out", tmp_path / "r.html"])
    assert_one_line_error(result, names=name)


@pytest.mark.parametrize("how", ["deep", "a directory", "a fifo", "a link to /dev/zero",
                                 "garbage"])
@pytest.mark.parametrize("kind", ["workload", "device", "cluster"])
def test_hostile_model_file(tmp_path, capsys, no_hang, kind, how):
    model = tmp_path / f"{kind}.toml"
    model.write_text("")
    damage(model, how)
    models = {"workload": "mlp", "device": "h100", "cluster": "dgx-h100-ndr", kind: model}
    result = run_cli(capsys, ["simulate", "--workload", models["workload"], "--device",
                              models["device"], "--cluster", models["cluster"], "--gpus", "2"])
    assert_one_line_error(result, names=f"{kind}.toml")


@pytest.mark.parametrize("how", ["deep", "a directory", "a fifo", "a link to /dev/zero",
                                 "garbage", "NaN"])
def test_hostile_commbench_raw_file(tmp_path, capsys, no_hang, how):
    raw = tmp_path / "raw.json"
    raw.write_text("")
    damage(raw, how)
    result = run_cli(capsys, ["commbench", "--from-raw", raw, "--out", tmp_path / "c.toml"])
    assert_one_line_error(result, names="raw.json")


@pytest.mark.parametrize("how", ["deep", "a directory", "a fifo", "a link to /dev/zero",
                                 "garbage", "NaN"])
@pytest.mark.parametrize("flag", ["--validation", "--plan", "--published"])
def test_hostile_report_input_file(tmp_path, capsys, no_hang, flag, how):
    table = tmp_path / "input.json"
    table.write_text("")
    damage(table, how)
    result = run_cli(capsys, ["report", "--trace", TRACE_1P, flag, table,
                              "--out", tmp_path / "r.html"])
    assert_one_line_error(result, names="input.json")


def test_deeply_nested_option_value(tmp_path, capsys):
    """A KEY=VALUE option whose VALUE nests deeper than the JSON reader allows is taken as
    text, which the workload then refuses by name."""
    result = run_cli(capsys, ["calibrate", "--workload", "mlp", "--workload-option",
                              "hidden=" + DEEP_JSON, "--out", tmp_path / "w.toml"])
    assert_one_line_error(result, names="hidden")
