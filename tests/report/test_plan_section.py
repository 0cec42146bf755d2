"""The report's plan section: its figures and table from a plan, escaping, the empty case,
``kfacperf report --plan`` and bad plan files."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from helpers.convergence import MLP_SGD, mlp_kfac
from kfacperf.cli import main
from kfacperf.plan import plan
from kfacperf.plan.result import load_plan, save_plan
from kfacperf.report.build import build_report
from kfacperf.report.plan import choices_frame, plan_section

XSS = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
def small_plan():
    sgd, kfac = MLP_SGD, mlp_kfac("t2")
    return plan("mlp", "v100", "abci-v100", gpus=[1, 4, 16], batch_per_gpu=[4, 16],
                convergence=[sgd, kfac], memory_gb=1.0)


def test_section_draws_both_figures_and_tabulates_every_choice(small_plan) -> None:
    sec = plan_section(small_plan)
    assert len(sec.figures) == 2
    time_fig, front_fig = sec.figures
    names = [t.name for t in time_fig.data]
    assert names.count("best SGD") == 2 and names.count("best K-FAC") == 2  # time, GPU-h
    sgd_time = next(t for t in time_fig.data if t.name == "best SGD")
    assert list(sgd_time.x) == [1, 4, 16]
    assert list(sgd_time.y) == pytest.approx([small_plan.best(g, "sgd").time_s / 3600
                                              for g in (1, 4, 16)])
    # extrapolated points are drawn open
    open_marks = [s == "circle-open" for s in sgd_time.marker.symbol]
    assert open_marks == [small_plan.best(g, "sgd").extrapolated for g in (1, 4, 16)]
    front = next(t for t in front_fig.data if t.name == "Pareto front")
    assert list(front.x) == [c.gpu_hours for c in small_plan.pareto()]
    frame = choices_frame(small_plan)
    assert len(frame) == len(small_plan.choices)
    assert (frame["front"] == "yes").sum() == len(small_plan.pareto())
    assert frame["steps"].str.contains("extrapolated").any()


def test_page_with_only_a_plan_escapes_its_text(tmp_path: Path, small_plan) -> None:
    bad = dataclasses.replace(small_plan, inputs={**small_plan.inputs, "workload": XSS,
                                                  "cluster": XSS})
    out = build_report([], [], tmp_path / "index.html", plan=bad)
    text = out.read_text()
    assert "Plan: time to solution" in text and "Chosen configurations" in text
    assert XSS not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text


def test_no_plan_leaves_a_note() -> None:
    sec = plan_section(None)
    assert not sec.blocks and "kfacperf plan --out" in sec.note


def test_report_command_reads_a_plan_file(tmp_path: Path, small_plan,
                                          capsys: pytest.CaptureFixture) -> None:
    path = save_plan(small_plan, tmp_path / "plan.json")
    again = load_plan(path)
    assert [c.to_dict() for c in again.choices] == [c.to_dict() for c in small_plan.choices]
    out = tmp_path / "r" / "index.html"
    assert main(["report", "--plan", str(path), "--out", str(out)]) == 0
    assert "Chosen configurations" in out.read_text()
    assert "kfacperf report: mlp" in out.read_text()  # the title names the plan's workload
    capsys.readouterr()


@pytest.mark.parametrize("content, message", [
    ("not json", "not valid JSON"),
    ('{"format": "other"}', "format 'other' is not 'kfacperf-plan-1'"),
    ('{"format": "kfacperf-plan-1"}', "missing key 'inputs'"),
    (None, "best[0]: missing key(s) gpus"),
    (None, "best[0]: unknown key(s) speed"),
])
def test_bad_plan_files_are_one_line_errors(tmp_path: Path, small_plan, content: str | None,
                                            message: str, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "plan.json"
    if content is None:
        data = small_plan.to_dict()
        if "gpus" in message:
            del data["best"][0]["gpus"]
        else:
            data["best"][0]["speed"] = 1
        content = json.dumps(data)
    path.write_text(content)
    assert main(["report", "--plan", str(path), "--out", str(tmp_path / "x.html")]) == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err and "Traceback" not in err


def _axis_labels(axis) -> list[float]:
    """The numbers an axis's tick labels state (with thousands separators removed)."""
    return [float(t.replace(",", "")) for t in axis.ticktext]


def test_log_axes_label_each_tick_with_its_whole_value(small_plan) -> None:
    """plotly alone labels a log axis's minor ticks with one digit ("5" for 0.5 and 5);
    every tick says its value instead, and the ticks cover the data."""
    time_fig, front_fig = plan_section(small_plan).figures
    hours = [small_plan.best(g, o).time_s / 3600 for g in small_plan.gpus
             for o in small_plan.convergence if small_plan.best(g, o) is not None]
    for axis in (time_fig.layout.yaxis, time_fig.layout.yaxis2, front_fig.layout.xaxis,
                 front_fig.layout.yaxis):
        assert axis.type == "log"
        assert _axis_labels(axis) == pytest.approx(list(axis.tickvals))
        assert len(set(axis.ticktext)) == len(axis.ticktext) >= 2
    ticks = list(time_fig.layout.yaxis.tickvals)
    assert min(ticks) <= min(hours) * 1.5 and max(ticks) >= max(hours) / 1.5
    assert time_fig.layout.yaxis.title.text == "hours"


def test_different_targets_are_noted_as_kfacperf_plan_notes_them(small_plan) -> None:
    from kfacperf.plan.text import format_plan

    targets = {c["target"] for c in small_plan.convergence.values()}
    page = "".join(b.html for b in plan_section(small_plan).blocks)
    noted = "reach different targets" in page
    assert noted == (len(targets) > 1) == ("different targets" in format_plan(small_plan))
    same = dataclasses.replace(small_plan, convergence={
        k: {**c, "target": "top-1 75%"} for k, c in small_plan.convergence.items()})
    assert "different targets" not in "".join(b.html for b in plan_section(same).blocks)
