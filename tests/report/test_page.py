import re

import pandas as pd
import plotly.graph_objects as go
import pytest

from kfacperf.report import page
from kfacperf.report.build import MAX_BYTES, build_report, build_sections
from kfacperf.report.inputs import load_predictions, load_runs

PLOTLY_BANNER = "plotly.js v"  # the bundle's licence header names its version once


def test_table_escapes_every_cell():
    df = pd.DataFrame({"a": ["<script>alert(1)</script>", 'x" onmouseover="y']})
    out = page.table(df, [("a", "<b>head</b>", str)])
    assert "<script>" not in out and "<b>" not in out
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in out
    assert "&quot; onmouseover=&quot;" in out
    assert "&lt;b&gt;head&lt;/b&gt;" in out


def test_layer_names_are_text_in_tables_and_figure_json(synth, hostile):
    out = build_report(hostile["traces"], hostile["predictions"],
                       hostile["tmp"] / "out" / "index.html")
    html_text = out.read_text()
    # No payload survives as markup anywhere in the page ...
    for raw in (synth.XSS, synth.XSS_WORKLOAD, "<img src=x"):
        assert raw not in html_text
    # ... the layer name is in an HTML table as escaped text ...
    assert "<td>&lt;script&gt;alert(1)&lt;/script&gt;</td>" in html_text
    # ... and inside the figures' JSON, where nothing can close the <script> element.
    scripts = re.findall(r"<script[^>]*>(.*?)</script>", html_text, flags=re.S)
    assert len(scripts) == html_text.count("</script>") == html_text.count("<script")
    assert any("alert(1)" in s for s in scripts[1:])
    assert sum("\\u003c" in s or "&lt;script&gt;" in s for s in scripts) >= 1


def test_figure_json_cannot_close_its_script_element():
    fig = go.Figure(go.Bar(x=["</script><script>alert(1)</script>"], y=[1]))  # unescaped on purpose
    out = page.figure_html(fig, "fig-01-x", include_plotlyjs=False)
    assert out.lower().count("</script") == 1 and out.lower().count("<script") == 1
    assert "\\u003c\\u002fscript\\u003e" in out
    with pytest.raises(ValueError, match="fig-x"):
        page.check_scripts("<script>var a='</script>';</script>", "fig-x")


def test_page_is_self_contained_deterministic_and_small(study):
    out1 = build_report(study["traces"], study["predictions"], study["tmp"] / "a" / "index.html")
    out2 = build_report(study["traces"], study["predictions"], study["tmp"] / "b" / "index.html")
    text = out1.read_text()
    assert text == out2.read_text()
    assert text.count(PLOTLY_BANNER) == 1
    # nothing is loaded from elsewhere (plotly.js mentions a CDN only as an unused default)
    assert not re.search(r"<(script|link|img|iframe)\b[^>]*\b(src|href)=", text)
    assert out1.stat().st_size < MAX_BYTES
    ids = re.findall(r'<div id="(fig-[^"]+)" class="plotly-graph-div"', text)
    assert len(ids) == len(set(ids)) > 0
    assert ids[0] == "fig-01-breakdown"  # numbered in page order, named after their section


def test_sections_and_figure_counts(study):
    runs = load_runs(study["traces"])
    preds = load_predictions(study["predictions"])
    secs = {s.key: s for s in build_sections(runs, preds)}
    counts = {k: len(s.figures) for k, s in secs.items()}
    assert counts == {
        "summary": 0, "validation": 0, "published": 0,
        "breakdown": 2,  # one per run
        "comparison": 2,  # both runs have a prediction at 2 GPUs
        "scaling": 4,  # the baseline's curves + one stacked-stage chart per strategy
        "timelines": 2 + 3,  # measured per run + simulated per strategy at 4096 GPUs
        "telemetry": 1,  # only spngd-2 has telemetry
        "whatif": 1,  # base and bw-half overlaid
        "plan": 0,  # no plan given: its heading and a note
    }
    assert "no validation" in secs["validation"].note.lower()
    assert "no published results" in secs["published"].note.lower()
    sim = [f for f in secs["timelines"].figures if "simulated" in f.layout.title.text]
    assert all("4096 GPUs" in f.layout.title.text for f in sim)
    at8 = {s.key: s for s in build_sections(runs, preds, timeline_gpus=8)}["timelines"]
    assert all("at 2 GPUs" in f.layout.title.text
               and "nearest to the 8 asked for" in f.layout.title.text
               for f in at8.figures if "simulated" in f.layout.title.text)
    assert not any("nearest" in f.layout.title.text for f in secs["timelines"].figures)


def test_sections_without_data_show_a_note(study):
    runs = load_runs(study["traces"])
    only_traces = {s.key: s for s in build_sections(runs, [])}
    for key in ("comparison", "scaling", "whatif"):
        assert not only_traces[key].blocks and only_traces[key].note
    preds = load_predictions(study["predictions"][:1])
    only_pred = {s.key: s for s in build_sections([], preds)}
    for key in ("breakdown", "comparison", "telemetry", "whatif"):
        assert not only_pred[key].blocks and only_pred[key].note
    text = page.render_page(title="t", subtitle="s", sections=list(only_pred.values()), footer="f")
    assert text.count('class="note"') == 7  # validation, plan and published too


def test_validation_section(study):
    val = pd.DataFrame({"run": ["a", "<i>b</i>"], "measured_step_us": [1000.0, 2000.0],
                        "predicted_step_us": [1030.0, 1800.0]})
    out = build_report(study["traces"][:1], [], study["tmp"] / "v.html", validation=val)
    text = out.read_text()
    assert "median |error| 6.5%, worst 10.0%" in text
    assert "+3.0%" in text and "-10.0%" in text and "&lt;i&gt;b&lt;/i&gt;" in text
    with pytest.raises(ValueError, match="predicted_step_us"):
        build_report(study["traces"][:1], [], study["tmp"] / "w.html",
                     validation=val.drop(columns="predicted_step_us"))


def test_validations_side_by_side(study):
    """A CPU and a GPU validation in one section: a line each, then each set's own table."""
    cpu = pd.DataFrame({"run": ["c1", "c2"], "measured_step_us": [1000.0, 2000.0],
                        "predicted_step_us": [1030.0, 1800.0]})
    gpu = pd.DataFrame({"run": ["g1"], "measured_step_us": [50.0e3],
                        "predicted_step_us": [52.0e3]})
    out = build_report(study["traces"][:1], [], study["tmp"] / "vv.html",
                       validation={"this CPU": cpu, "H200 bf16": gpu, "no-runs-set": cpu.iloc[:0]})
    text = out.read_text()
    section = text[text.index("Prediction accuracy"):]
    assert section.index("this CPU") < section.index("H200 bf16")
    assert "median |error| 6.5%, worst 10.0%" in section  # the CPU set, as alone
    assert "1 held-out runs: median |error| 4.0%, worst 4.0%" in section
    assert "H200 bf16: measured vs predicted step time" in section
    assert "no-runs-set" not in section  # a set without runs is left out


def test_nothing_to_report(tmp_path):
    with pytest.raises(ValueError, match="nothing to report"):
        build_report([], [], tmp_path / "x.html")
