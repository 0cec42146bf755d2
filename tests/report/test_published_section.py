"""The published-measurements section: every prediction visible, text escaped once, and
|error| columns without a sign."""
from __future__ import annotations

import html

from kfacperf.report.published_section import published_section


def _data(name: str = "one & only") -> dict:
    points = [
        {"case": name, "role": "held-out", "series": "s1", "gpus": 64, "measured": 0.020,
         "predicted": 0.028, "error_pct": 40.0, "unit": "s"},
        {"case": name, "role": "held-out", "series": "s2", "gpus": 8, "measured": 0.10,
         "predicted": 0.09, "error_pct": -10.0, "unit": "s"},
        {"case": name, "role": "held-out", "series": "s2", "gpus": 16, "measured": 0.11,
         "predicted": 0.10, "error_pct": -9.0, "unit": "s"},
    ]
    series = [{"case": name, "series": "s1", "median_abs_error_pct": 40.0,
               "worst_abs_error_pct": 40.0, "measured_fastest_gpus": "",
               "predicted_fastest_gpus": ""},
              {"case": name, "series": "s2", "median_abs_error_pct": 9.5,
               "worst_abs_error_pct": 10.0, "measured_fastest_gpus": 8,
               "predicted_fastest_gpus": 8}]
    case = {"name": name, "role": "held-out", "title": "t", "citation": "c",
            "quantity": "step_s"}
    return {"cases": [case], "points": points, "series": series}


def test_a_series_of_one_gpu_count_shows_its_prediction() -> None:
    fig = published_section(_data()).figures[0]
    predicted = {t.name: t for t in fig.data if t.name.endswith("predicted")}
    assert set(predicted) == {"s1 predicted", "s2 predicted"}
    for trace in predicted.values():  # a lone point has no line: it needs a marker
        assert "markers" in trace.mode
    assert list(predicted["s1 predicted"].y) == [0.028]


def test_case_name_is_escaped_once_and_abs_errors_have_no_sign() -> None:
    sec = published_section(_data("a & <b>"))
    fig = sec.figures[0]
    assert html.unescape(fig.layout.title.text) == "a & <b>"
    page = "".join(b.html for b in sec.blocks)
    assert "40.0%" in page and "+40.0%" not in page and "+9.5%" not in page
