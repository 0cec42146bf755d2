"""Figure contents, checked on plotly's figure objects (``to_dict``), never on HTML text."""
import base64

import numpy as np
import pandas as pd
import pytest

from kfacperf import vocab as stages
from kfacperf.report import figures, metrics, timeline
from kfacperf.report.inputs import load_runs


def _traces(fig):
    return fig.to_dict()["data"]


def _by_name(fig):
    return {t["name"]: t for t in _traces(fig)}


def _arr(values):
    """Numbers of a figure-dict array (plotly >= 6 may store them as base64 "bdata")."""
    if isinstance(values, dict) and "bdata" in values:
        return np.frombuffer(base64.b64decode(values["bdata"]), dtype=values["dtype"]).astype(float)
    return np.asarray(values, dtype=float)


def test_rank_breakdown_stacks_each_stage_per_rank(synth, tmp_path):
    synth.write_trace_dir(tmp_path / "t", synth.run_json(strategy="spngd", world_size=2),
                          synth.make_events(strategy="spngd", world_size=2))
    run = load_runs([tmp_path / "t"])[0]
    breakdown = metrics.rank_stage_breakdown(run.summary)
    per_rank = metrics.rank_table(run.summary)
    fig = figures.rank_breakdown_figure(breakdown, per_rank, "t")
    d = fig.to_dict()
    assert d["layout"]["barmode"] == "stack"
    traces = _by_name(fig)
    for stage in breakdown.columns:
        t = traces[stage]
        assert list(t["x"]) == ["rank 0", "rank 1"]
        np.testing.assert_allclose(_arr(t["y"]), breakdown[stage].to_numpy() / 1000)
        hatched = t["marker"]["pattern"]["shape"] == "/"
        assert hatched == (stages.lane_of(stage) == stages.COMM)
    hidden, exposed = traces["comm hidden under compute"], traces["exposed comm"]
    np.testing.assert_allclose(_arr(hidden["y"]) + _arr(exposed["y"]),
                               per_rank["comm_us"].to_numpy() / 1000)
    np.testing.assert_allclose(_arr(exposed["y"]), per_rank["exposed_comm_us"].to_numpy() / 1000)
    assert exposed["text"][0] == f"{per_rank['overlap_pct'].iloc[0]:.0f}% hidden"


def test_scaling_figure_log_x_per_strategy(synth):
    summary = synth.make_summary()
    fig = figures.scaling_figure(summary, "s")
    d = fig.to_dict()
    for axis in ("xaxis", "xaxis2", "xaxis3"):
        assert d["layout"][axis]["type"] == "log"
    step_traces = [t for t in d["data"] if t.get("xaxis", "x") == "x"]
    assert sorted(t["name"] for t in step_traces) == sorted(synth.STRATEGIES)
    for t in step_traces:
        want = summary[summary["strategy"] == t["name"]].sort_values("gpus")
        np.testing.assert_array_equal(_arr(t["x"]), want["gpus"].to_numpy())
        np.testing.assert_allclose(_arr(t["y"]), want["step_us"].to_numpy() / 1000)
    eff = {t["name"]: t for t in d["data"] if t.get("xaxis") == "x2"}
    np.testing.assert_allclose(
        _arr(eff["kaisa"]["y"]),
        summary[summary["strategy"] == "kaisa"]["scaling_efficiency"].to_numpy())
    over = {t["name"]: t for t in d["data"] if t.get("xaxis") == "x3"}
    np.testing.assert_allclose(_arr(over["spngd"]["y"]),
                               summary[summary["strategy"] == "spngd"]["kfac_overhead"].to_numpy())


def test_scaling_figure_skips_all_nan_overhead(synth):
    summary = synth.make_summary(strategies=("spngd",))
    summary["kfac_overhead"] = np.nan  # no SGD simulated
    d = figures.scaling_figure(summary, "s").to_dict()
    assert not [t for t in d["data"] if t.get("xaxis") == "x3"]


def test_stage_scaling_bars_sum_to_stage_times(synth):
    st = synth.make_stage_times(synth.make_summary())
    fig = figures.stage_scaling_figure(st, "kaisa", "k")
    d = fig.to_dict()
    assert d["layout"]["barmode"] == "stack" and d["layout"]["xaxis"]["type"] == "category"
    totals = np.zeros(len(synth.GPUS))
    for t in d["data"]:
        assert list(t["x"]) == [str(g) for g in synth.GPUS]
        totals += _arr(t["y"])
    want = st[st["strategy"] == "kaisa"].groupby("gpus")["time_us"].sum().sort_index()
    np.testing.assert_allclose(totals, want.to_numpy() / 1000)


def test_timeline_bars_have_ms_base_and_duration(synth):
    ev = synth.make_events(strategy="spngd", world_size=2, steps=2, layers=("a", synth.XSS))
    fig = timeline.timeline_figure(ev, 1, "tl")
    d = fig.to_dict()
    assert d["layout"]["barmode"] == "overlay"
    assert d["layout"]["xaxis"].get("type") != "date"
    step = ev[(ev["step"] == 1)]
    t0 = step["start_us"].min()
    names = set()
    for t in d["data"]:
        assert t["orientation"] == "h"
        names.add(t["name"])
        rows = step[step["stage"].astype(str) == t["name"]]
        np.testing.assert_allclose(_arr(t["base"]), (rows["start_us"].to_numpy() - t0) / 1000)
        np.testing.assert_allclose(_arr(t["x"]), rows["dur_us"].to_numpy() / 1000)
        lanes = [f"rank {r} · {stages.lane_of(s)}"
                 for r, s in zip(rows["rank"], rows["stage"].astype(str))]
        assert list(t["y"]) == lanes
    assert stages.STEP not in names
    assert names == set(step["stage"].astype(str)) - {stages.STEP}
    assert d["layout"]["yaxis"]["categoryarray"] == [
        "rank 0 · compute", "rank 0 · comm", "rank 1 · compute", "rank 1 · comm"]
    # layer names are shown literally: escaped for plotly's HTML-like labels
    hover = [h for t in d["data"] for h in t["hovertext"]]
    assert any("&lt;script&gt;alert(1)&lt;/script&gt;" in h for h in hover)
    assert not any("<script>" in h for h in hover)


def test_timeline_limits_lanes(synth):
    ev = synth.make_events(strategy="sgd", world_size=timeline.MAX_RANKS + 2, steps=1)
    d = timeline.timeline_figure(ev, 0, "big").to_dict()
    assert len(d["layout"]["yaxis"]["categoryarray"]) == 2 * timeline.MAX_RANKS
    assert (f"first {timeline.MAX_RANKS} of {timeline.MAX_RANKS + 2} ranks"
            in d["layout"]["title"]["text"])


def test_whatif_overlays_variants(synth):
    a, b = synth.make_summary(), synth.make_summary(step_scale=2.0)
    fig = figures.whatif_figure([("bw=1", a), ("bw=0.5", b)], "w")
    d = fig.to_dict()
    step = [t for t in d["data"] if t.get("xaxis", "x") == "x"]
    assert len(step) == 2 * len(synth.STRATEGIES)
    by = {t["name"]: t for t in step}
    np.testing.assert_allclose(
        _arr(by["spngd · bw=0.5"]["y"]),
        b[b["strategy"] == "spngd"].sort_values("gpus")["step_us"].to_numpy() / 1000)
    assert by["spngd · bw=1"]["line"]["dash"] != by["spngd · bw=0.5"]["line"]["dash"]
    assert by["spngd · bw=1"]["line"]["color"] == by["spngd · bw=0.5"]["line"]["color"]
    assert d["layout"]["xaxis"]["type"] == "log"


def test_telemetry_one_subplot_per_sampled_metric(synth):
    from kfacperf.trace.schema import telemetry_frame

    tel = telemetry_frame(synth.make_telemetry(world_size=2, samples=4))
    fig = timeline.telemetry_figure(tel, "tel")
    d = fig.to_dict()
    titles = [a["text"] for a in d["layout"]["annotations"]]
    # unsampled metrics left out
    assert titles == ["SM clock (MHz)", "memory used (MiB)", "power (W)"]
    power = [t for t in d["data"] if t.get("yaxis") == "y3"]
    assert [t["name"] for t in power] == ["rank 0, gpu 0", "rank 1, gpu 1"]
    rank1 = tel[tel["rank"] == 1].sort_values("t_us")
    np.testing.assert_allclose(_arr(power[1]["y"]), rank1["power_w"].to_numpy())
    np.testing.assert_allclose(_arr(power[1]["x"]),
                               (rank1["t_us"].to_numpy() - tel["t_us"].min()) / 1e6)
    colors = {(t["name"], t["line"]["color"]) for t in d["data"]}
    assert len(colors) == 2  # one color per rank across all subplots
    assert timeline.telemetry_figure(tel.iloc[0:0], "x") is None


def _comparison(measured, predicted, measured_step, predicted_step):
    from kfacperf.trace.compare import compare
    from kfacperf.trace.measure import KindTimes, Measured

    m = Measured(kinds={"plain": 1}, step_us={"plain": measured_step}, stage_us={"plain": measured},
                 mean_step_us=measured_step)
    return compare(m, KindTimes(step_us={"plain": predicted_step}, stage_us={"plain": predicted}))


def test_comparison_and_validation_figures():
    comp = metrics.stage_comparison(_comparison({"forward": 1000.0}, {"forward": 1100.0},
                                                3000.0, 2700.0))
    d = figures.comparison_figure(comp, "c").to_dict()
    pred = {t["name"]: t for t in d["data"]}["predicted"]
    assert list(pred["x"]) == ["forward", "step"]
    np.testing.assert_allclose(_arr(pred["y"]), [1.1, 2.7])
    assert list(pred["text"]) == ["+10.0%", "-10.0%"]
    val = pd.DataFrame({"run": ["a", "b"], "measured_step_us": [1000.0, 2000.0],
                        "predicted_step_us": [1050.0, 1900.0], "error_pct": [5.0, -5.0]})
    v = {t["name"]: t for t in figures.validation_figure(val, "v").to_dict()["data"]}
    np.testing.assert_allclose(_arr(v["measured"]["y"]), [1.0, 2.0])
    assert list(v["predicted"]["text"]) == ["+5.0%", "-5.0%"]


@pytest.mark.parametrize("text", ["<b>x</b>", "a & b", "</script>"])
def test_plot_text_escapes(text):
    out = figures.plot_text(text)
    assert "<" not in out and ">" not in out
    import html

    assert html.unescape(out) == text


def test_log_y_only_when_values_span_a_wide_range(synth):
    summary = synth.make_summary()
    d = figures.scaling_figure(summary, "s").to_dict()
    assert d["layout"]["yaxis"].get("type") != "log"  # 31..~90 ms
    summary.loc[summary["strategy"] == "spngd", "step_us"] *= np.linspace(1, 100, len(synth.GPUS))
    d = figures.scaling_figure(summary, "s").to_dict()
    assert d["layout"]["yaxis"]["type"] == "log"
    assert d["layout"]["yaxis3"].get("type") != "log"


def test_simulated_timeline_names_representative_ranks(synth):
    ev = synth.make_events(strategy="spngd", world_size=2, steps=1)
    d = timeline.timeline_figure(ev, 0, "sim",
                                 rank_labels={0: "rank 0 (×1)", 1: "rank 1 (×63)"}).to_dict()
    assert d["layout"]["yaxis"]["categoryarray"] == [
        "rank 0 (×1) · compute", "rank 0 (×1) · comm",
        "rank 1 (×63) · compute", "rank 1 (×63) · comm"]


def test_rank_breakdown_without_communication_has_one_panel(synth, tmp_path):
    synth.write_trace_dir(tmp_path / "t", synth.run_json(strategy="spngd", world_size=1),
                          synth.make_events(strategy="spngd", world_size=1))
    run = load_runs([tmp_path / "t"])[0]
    fig = figures.rank_breakdown_figure(metrics.rank_stage_breakdown(run.summary),
                                        metrics.rank_table(run.summary), "t")
    d = fig.to_dict()
    assert "xaxis2" not in d["layout"]
    assert not {"exposed comm", "comm hidden under compute"} & {t["name"] for t in d["data"]}


def test_wide_log_step_axis_labels_ticks_in_full(synth):
    summary = synth.make_summary()
    summary.loc[summary["strategy"] == "spngd", "step_us"] *= np.linspace(1, 100, len(synth.GPUS))
    y = figures.scaling_figure(summary, "s").layout.yaxis
    ms = summary["step_us"].to_numpy(float) / 1000
    assert y.type == "log"
    stated = [float(t.replace(",", "")) for t in y.ticktext]
    assert stated == pytest.approx(list(y.tickvals))  # no one-digit minor labels
    assert len(set(y.ticktext)) == len(y.ticktext)
    inside = [t for t in y.tickvals if ms.min() <= t <= ms.max()]
    assert len(inside) >= 3
