"""Trace schema, round trip, crash-safe parts and their schema errors."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from kfacperf.trace import parts as trace_parts
from kfacperf.trace.schema import EVENT_COLUMNS, EVENT_DTYPES, TraceError, events_frame
from kfacperf.trace.store import load_trace, write_trace

RUN = {"workload": "mlp", "optimizer": "kfac", "strategy": "spngd", "world_size": 2,
       "warmup": 0, "steps": 2, "completed": True}


def sample_events() -> dict:
    return {
        "rank": [0, 0, 0, 1, 1, 0],
        "step": [0, 0, 0, 0, 0, 1],
        "stage": ["step", "forward", "factor_comm", "step", "backward", "step"],
        "layer": ["", "", "fc1", "", "", ""],
        "lane": ["compute", "compute", "comm", "compute", "compute", "compute"],
        "start_us": [0.0, 1.0, 2.5, 0.0, 3.0, 50.0],
        "dur_us": [40.0, 10.0, 5.0, 45.0, 20.0, 30.0],
        "bytes": [0, 0, 4096, 0, 0, 0],
        "flops": [0.0, 1e6, 0.0, 0.0, 2e6, 0.0],
    }


def test_round_trip_keeps_values_and_dtypes(tmp_path):
    tel = {"rank": [0, 1], "gpu": [0, 1], "t_us": [10.0, 20.0], "power_w": [300.0, 310.5]}
    write_trace(tmp_path / "t", run=RUN, events=sample_events(), telemetry=tel)
    trace = load_trace(tmp_path / "t")
    assert trace.run == RUN and trace.completed
    assert list(trace.events.columns) == list(EVENT_COLUMNS)
    for col, dtype in EVENT_DTYPES.items():
        got = trace.events[col].dtype
        assert (isinstance(got, pd.CategoricalDtype) if dtype == "category" else str(got) == dtype)
    want = pd.DataFrame(sample_events()).sort_values(["rank", "start_us"]).reset_index(drop=True)
    got = trace.events.astype({c: str for c in ("stage", "layer", "lane")})
    for col in EVENT_COLUMNS:
        assert got[col].tolist() == want[col].tolist(), col
    assert trace.telemetry["power_w"].tolist() == [300.0, 310.5]
    assert trace.telemetry["sm_clock_mhz"].isna().all()  # absent measurement -> NaN


def _write_raw(root: Path, df: pd.DataFrame, run: dict | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "run.json").write_text(json.dumps(run if run is not None else RUN))
    df.to_parquet(root / "events.parquet", index=False)
    return root


def test_missing_directory_and_file_and_run_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_trace(tmp_path / "nope")
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(TraceError, match="not a trace directory"):
        load_trace(f)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no run.json"):
        load_trace(tmp_path / "empty")
    (tmp_path / "runonly").mkdir()
    (tmp_path / "runonly" / "run.json").write_text("{}")
    with pytest.raises(TraceError, match="neither events.parquet nor a parts/"):
        load_trace(tmp_path / "runonly")
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "run.json").write_text("{oops")
    with pytest.raises(TraceError, match="run.json: not valid JSON"):
        load_trace(tmp_path / "badjson")


def test_missing_column_names_file_and_column(tmp_path):
    df = events_frame(sample_events()).drop(columns=["bytes"])
    root = _write_raw(tmp_path / "t", df)
    with pytest.raises(TraceError, match=r"events\.parquet: missing column\(s\) bytes"):
        load_trace(root)


def test_wrong_dtype_names_column(tmp_path):
    df = events_frame(sample_events())
    df["step"] = df["step"].astype("int64")
    with pytest.raises(TraceError,
                       match=r"events\.parquet: column 'step' has dtype int64, expected int32"):
        load_trace(_write_raw(tmp_path / "a", df))
    df = events_frame(sample_events())
    df["stage"] = df["stage"].astype(str)
    with pytest.raises(TraceError, match="column 'stage' has dtype .*expected category"):
        load_trace(_write_raw(tmp_path / "b", df))


def test_unknown_stage_and_wrong_lane(tmp_path):
    df = events_frame(sample_events())
    df["stage"] = df["stage"].cat.add_categories(["warp_drive"])
    df.loc[1, "stage"] = "warp_drive"
    with pytest.raises(TraceError, match="unknown stage.*'warp_drive'"):
        load_trace(_write_raw(tmp_path / "a", df))
    bad = sample_events()
    bad["lane"][2] = "compute"  # factor_comm is a comm stage
    with pytest.raises(TraceError, match="stage 'factor_comm' recorded on lane 'compute'"):
        events_frame(bad)
    bad = sample_events()
    bad["stage"][0] = "fwd"
    with pytest.raises(TraceError, match="unknown stage.*'fwd'"):
        write_trace(tmp_path / "c", run=RUN, events=bad)


def test_bad_values(tmp_path):
    bad = sample_events()
    bad["dur_us"][0] = -1.0
    with pytest.raises(TraceError, match="negative dur_us"):
        events_frame(bad)
    bad = sample_events()
    bad["start_us"][0] = float("nan")
    with pytest.raises(TraceError, match="NaN"):
        events_frame(bad)
    root = _write_raw(tmp_path / "w", events_frame(sample_events()), dict(RUN, world_size=1))
    with pytest.raises(TraceError, match="events of rank 1 in a run of world_size 1"):
        load_trace(root)
    root = _write_raw(tmp_path / "c", events_frame(sample_events()), dict(RUN, completed="yes"))
    with pytest.raises(TraceError, match="'completed' must be true or false"):
        load_trace(root)


@pytest.mark.parametrize(("key", "value", "why"), [
    ("device", "cpu", "must be an object"),  # readers took its name with .get
    ("device", [1], "must be an object"),
    ("precision_flags", [1], "must be an object"),
    ("symmetric", "no", "must be true or false"),  # "no" was read as true
    ("fused", 3, "must be true or false"),
    ("bucket_cap_mb", [1], "must be a number above 0"),
    ("bucket_cap_mb", -5, "must be a number above 0"),
    ("damping", "x", "must be a number above 0"),
    ("bn_blocks", 7, "must be a string"),
    ("fisher", [], "must be a string"),  # [] was read as the default, emp
    ("comm_dtype", 5, "must be a string"),
    ("precision", 5, "must be a string"),
    ("failure", [1], "must be a string"),
])
def test_a_wrong_typed_run_json_key_names_the_file_and_the_key(tmp_path, key, value, why):
    root = _write_raw(tmp_path / "t", events_frame(sample_events()), dict(RUN, **{key: value}))
    with pytest.raises(TraceError) as info:
        load_trace(root)
    assert str(info.value) == f"{root / 'run.json'}: key {key!r} {why}, got {value!r}"


def _step_rows(rank: int, step: int) -> dict:
    base = 100.0 * step
    return {"rank": [rank] * 2, "step": [step] * 2, "stage": ["forward", "step"],
            "layer": ["", ""], "lane": ["compute", "compute"],
            "start_us": [base + 1, base], "dur_us": [10.0, 90.0], "bytes": [0, 0],
            "flops": [0.0, 0.0]}


def test_uncompacted_run_reads_every_flushed_step_even_after_hard_exit(tmp_path):
    """A writer process killed with os._exit keeps every step it flushed; a torn tail is
    dropped; load_trace reports the run incomplete; compaction then completes it."""
    root = tmp_path / "run"
    root.mkdir()
    (root / "run.json").write_text(json.dumps(dict(RUN, completed=False)))
    code = textwrap.dedent(f"""
        import os, sys
        from kfacperf.trace.parts import event_appender
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_store import _step_rows
        app = event_appender({str(root)!r}, 1)
        for step in range(3):
            app.append(_step_rows(1, step))
        os._exit(7)  # no close(), no interpreter shutdown
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 7, proc.stderr
    app0 = trace_parts.event_appender(root, 0)
    for step in range(2):
        app0.append(_step_rows(0, step))
    app0.close()
    # a third step of rank 0 torn in the middle of its write
    part0 = trace_parts.event_part_path(root / "parts", 0)
    whole = part0.read_bytes()
    app0 = trace_parts.event_appender(root / "x", 0)  # write a longer stream elsewhere
    for step in range(3):
        app0.append(_step_rows(0, step))
    app0.close()
    longer = trace_parts.event_part_path(root / "x" / "parts", 0).read_bytes()
    part0.write_bytes(longer[: len(whole) + 40])

    trace = load_trace(root)
    assert trace.completed is False
    got = sorted(set(zip(trace.events["rank"], trace.events["step"])))
    assert got == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]
    assert len(trace.events) == 10

    trace_parts.compact(root)
    assert not (root / "parts").exists() and (root / "events.parquet").exists()
    again = load_trace(root)
    pd.testing.assert_frame_equal(again.events, trace.events)


def test_trace_modules_do_not_import_torch(tmp_path):
    write_trace(tmp_path / "t", run=RUN, events=sample_events())
    code = textwrap.dedent(f"""
        import sys
        from kfacperf.trace.store import load_trace
        from kfacperf.trace.summary import summarize
        from kfacperf.trace.chrome import chrome_trace
        t = load_trace({str(tmp_path / 't')!r})
        summarize(t).table(); chrome_trace(t)
        assert 'torch' not in sys.modules, 'torch imported'
    """)
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_run_that_recorded_no_event_loads_and_says_it_has_no_steps(tmp_path):
    """Parquet keeps no categories for an empty column; the loader must not call that a
    schema error (it used to: "column 'layer' has dtype object")."""
    from kfacperf.trace.measure import measure

    cols = ("rank", "step", "stage", "layer", "lane", "start_us", "dur_us", "bytes", "flops")
    path = write_trace(tmp_path / "t", run={"workload": "mlp", "optimizer": "sgd",
                                            "world_size": 1, "completed": False},
                       events={c: [] for c in cols})
    trace = load_trace(path)
    assert trace.events.empty and list(trace.events.columns) == list(cols)
    with pytest.raises(ValueError, match="the run recorded no step; profile it again"):
        measure(trace)
    failed = load_trace(write_trace(
        tmp_path / "f", run={"workload": "mlp", "optimizer": "sgd", "world_size": 1,
                             "completed": False, "failure": "no step was run"},
        events={c: [] for c in cols}))
    with pytest.raises(ValueError, match=r"recorded no step \(run.json: no step was run\)"):
        measure(failed)
