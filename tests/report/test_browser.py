"""The report in a real browser: headless Chromium loads it from file:// (no network)."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from kfacperf.report.build import build_report, build_sections
from kfacperf.report.inputs import load_predictions, load_runs

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="headless Chromium is not installed: run scripts/ensure-chromium.sh "
               "(`make test` does) or `apt-get install chromium` to run the browser test",
    ),
]


def chromium_dump_dom(page: Path, profile: Path, budget_ms: int = 15000) -> tuple[str, str]:
    """Load ``page`` in headless Chromium; return (serialized DOM, browser log)."""
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--no-first-run", "--disable-quic", f"--virtual-time-budget={budget_ms}",
        "--enable-logging=stderr", "--v=0", "--dump-dom", page.resolve().as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout, proc.stderr


def test_report_renders_in_chromium_without_errors(synth, hostile):
    validation = pd.DataFrame({"run": [synth.XSS_RUN, "b"], "measured_step_us": [50_000.0, 60_000.0],
                               "predicted_step_us": [52_000.0, 57_000.0]})
    out = build_report(hostile["traces"], hostile["predictions"], hostile["tmp"] / "report" / "index.html",
                       validation=validation)
    runs, preds = load_runs(hostile["traces"]), load_predictions(hostile["predictions"])
    n_figures = sum(len(s.figures) for s in build_sections(runs, preds, validation=validation))
    # by hand for this study: breakdown 1, comparison 1, scaling 1 + 3 strategies, timelines
    # 1 measured + 1 simulated (spngd at 64 GPUs), telemetry 1, what-if 1, validation 1
    assert n_figures == 11

    dom, log = chromium_dump_dom(out, hostile["tmp"] / "chromium-profile")

    assert dom.count('class="plot-container plotly"') == n_figures
    assert dom.count('class="main-svg"') >= 2 * n_figures  # plotly draws >= 2 layers per figure
    assert "trace bars" in dom and "trace scatter" in dom
    uncaught = [line for line in log.splitlines() if "Uncaught" in line]
    assert not uncaught, uncaught
    # The payloads never ran (they would have set data-pwned on <body>) ...
    assert "data-pwned" not in dom
    # ... and show as literal text in tables and in plotly's SVG text.
    assert "<td>&lt;script&gt;alert(1)&lt;/script&gt;</td>" in dom
    escaped_workload = "&lt;script&gt;document.body.dataset.pwned=2&lt;/script&gt;&lt;b&gt;w&lt;/b&gt;"
    svg_texts = re.findall(r"<text[^>]*>(.*?)</text>", dom, flags=re.S)
    assert any(escaped_workload in re.sub(r"<[^>]+>", "", t) for t in svg_texts)
