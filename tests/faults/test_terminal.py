"""Names and fields from traces, run.json and models reach the terminal as visible text:
escape sequences (colour, title, clear screen), bells and text-reordering marks are
printed escaped by every command, in results and in error lines alike.
"""
from __future__ import annotations

import json

import pytest

from helpers.faults import CLUSTER, TRACE_1P, copy_trace, run_cli

HOSTILE = "\x1b]0;owned\x07\x1b[2J\x1b[31mred\u202egnp.exe\r"


def assert_escaped(text: str) -> None:
    for raw in ("\x1b", "\x07", "\u202e", "\r"):
        assert raw not in text, repr(text)


@pytest.fixture
def hostile_trace(tmp_path):
    trace = copy_trace(TRACE_1P, tmp_path / f"run{HOSTILE}")
    run = json.loads((trace / "run.json").read_text())
    run["command"] = f"kfacperf profile {HOSTILE}"
    run["device"] = {**(run.get("device") or {}), "name": f"cpu{HOSTILE}"}
    run["completed"] = False  # so calibrate warns, naming the trace
    (trace / "run.json").write_text(json.dumps(run))
    return trace


@pytest.mark.parametrize("argv", [
    lambda t, tmp: ["export", "--chrome", t, "--out", tmp / "e.json"],
    lambda t, tmp: ["calibrate", t, "--out", tmp / "c.toml"],
    lambda t, tmp: ["report", "--trace", t, "--out", tmp / "r.html"],
    lambda t, tmp: ["validate", "--calibrate", TRACE_1P, "--holdout", t, "--cluster", CLUSTER],
    lambda t, tmp: ["simulate", "--workload", f"mlp{HOSTILE}", "--device", "h100",
                    "--cluster", "dgx-h100-ndr"],
    lambda t, tmp: ["report", "--trace", tmp / f"missing{HOSTILE}"],
])
def test_hostile_text_is_printed_escaped(tmp_path, capsys, hostile_trace, argv):
    result = run_cli(capsys, argv(hostile_trace, tmp_path))
    assert_escaped(result.text)
    assert "\\x1b" in result.text or "\\u202e" in result.text  # shown, not dropped


def test_terminal_safe_keeps_plain_text():
    from kfacperf.safety import terminal_safe

    plain = "rank 0: 12/30 steps\tµs ✓ — ok\n"
    assert terminal_safe(plain) == plain
    assert terminal_safe("a\x1b[31mb\x9bc\u2066d") == "a\\x1b[31mb\\x9bc\\u2066d"
    assert terminal_safe("one\ntwo", multiline=False) == "one\\x0atwo"
