"""The report in a real browser: headless Chromium loads it from file:// (no network)."""
from __future__ import annotations

import re

import pandas as pd
import pytest

from kfacperf.report import browser
from kfacperf.report.build import build_report, build_sections
from kfacperf.report.inputs import load_predictions, load_runs

CHROMIUM = browser.find_chromium()

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="headless Chromium is not installed: run scripts/ensure-chromium.sh "
               "(`make test` does) or `apt-get install chromium` to run the browser test",
    ),
]


def test_report_renders_in_chromium_without_errors(synth, hostile):
    validation = pd.DataFrame({"run": [synth.XSS_RUN, "b"],
                               "measured_step_us": [50_000.0, 60_000.0],
                               "predicted_step_us": [52_000.0, 57_000.0]})
    out = build_report(hostile["traces"], hostile["predictions"],
                       hostile["tmp"] / "report" / "index.html", validation=validation)
    runs, preds = load_runs(hostile["traces"]), load_predictions(hostile["predictions"])
    n_figures = sum(len(s.figures) for s in build_sections(runs, preds, validation=validation))
    # by hand for this study: breakdown 1, comparison 1, scaling 1 + 3 strategies, timelines
    # 1 measured + 1 simulated (spngd at 64 GPUs), telemetry 1, what-if 1, validation 1
    assert n_figures == 11

    loaded = browser.load_page(out)
    dom = loaded.dom

    assert loaded.plot_count == dom.count('class="plot-container plotly"') == n_figures
    assert dom.count('class="main-svg"') >= 2 * n_figures  # plotly draws >= 2 layers per figure
    assert "trace bars" in dom and "trace scatter" in dom
    assert not loaded.uncaught_errors, loaded.uncaught_errors
    # The payloads never ran (they would have set data-pwned on <body>) ...
    assert "data-pwned" not in dom
    # ... and show as literal text in tables and in plotly's SVG text.
    assert "<td>&lt;script&gt;alert(1)&lt;/script&gt;</td>" in dom
    escaped_workload = ("&lt;script&gt;document.body.dataset.pwned=2&lt;/script&gt;"
                        "&lt;b&gt;w&lt;/b&gt;")
    svg_texts = re.findall(r"<text[^>]*>(.*?)</text>", dom, flags=re.S)
    assert any(escaped_workload in re.sub(r"<[^>]+>", "", t) for t in svg_texts)


def test_uncaught_errors_are_caught_and_screenshots_work(tmp_path):
    page = tmp_path / "bad.html"
    page.write_text("<html><body><p>x</p><script>notDefinedAnywhere()</script></body></html>")
    loaded = browser.load_page(page, budget_ms=1000)
    assert any("notDefinedAnywhere" in line for line in loaded.uncaught_errors)
    png = browser.screenshot(page, tmp_path / "shot.png", width=200, height=100, scale=1.0,
                             budget_ms=500)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
