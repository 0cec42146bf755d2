import json
import subprocess
import sys

import pandas as pd
import pytest

from kfacperf.cli import main


def _report(*args):
    return main(["report", *map(str, args)])


def test_report_command_writes_the_page(study, capsys):
    out = study["tmp"] / "reports" / "x" / "index.html"
    args = [a for t in study["traces"] for a in ("--trace", t)]
    args += [a for p in study["predictions"] for a in ("--prediction", p)]
    assert _report(*args, "--title", "My <study>", "--out", out) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed
    s = study["summary"]
    want = s[(s["strategy"] == "spngd") & (s["gpus"] == 2)].iloc[0]
    line = next(ln for ln in printed.splitlines() if ln.startswith("spngd-2 "))
    assert f"{want['step_us'] / 1000:.2f}" in line and f"{want['kfac_overhead']:.2f}×" in line
    text = out.read_text()
    assert "<title>My &lt;study&gt;</title>" in text


def test_validation_file_formats(study, tmp_path):
    rows = [{"run": "a", "measured_step_us": 100.0, "predicted_step_us": 104.0}]
    pd.DataFrame(rows).to_csv(tmp_path / "v.csv", index=False)
    (tmp_path / "v.json").write_text(json.dumps({"runs": rows}))
    pd.DataFrame(rows).to_parquet(tmp_path / "v.parquet")
    for name in ("v.csv", "v.json", "v.parquet"):
        out = tmp_path / f"{name}.html"
        assert _report("--trace", study["traces"][0], "--validation", tmp_path / name,
                       "--out", out) == 0
        assert "+4.0%" in out.read_text()
    # repeated: each file its own set, named by its file name
    out = tmp_path / "both.html"
    assert _report("--trace", study["traces"][0], "--validation", tmp_path / "v.csv",
                   "--validation", tmp_path / "v.json", "--out", out) == 0
    text = out.read_text()
    assert "v.csv: measured vs predicted" in text and "v.json: measured vs predicted" in text
    # validations alone make a report too
    assert _report("--validation", tmp_path / "v.csv", "--out", tmp_path / "alone.html") == 0
    assert "+4.0%" in (tmp_path / "alone.html").read_text()


@pytest.mark.parametrize("case", ["missing_trace", "trace_is_file", "no_events",
                                  "pred_missing_summary", "pred_missing_column", "bad_validation",
                                  "empty_validation", "no_inputs", "bad_step"])
def test_bad_input_is_a_clear_error(study, tmp_path, capsys, case):
    trace, pred = study["traces"][0], study["predictions"][0]
    out = tmp_path / "o.html"
    if case == "missing_trace":
        args, expect = ["--trace", tmp_path / "nope"], str(tmp_path / "nope")
    elif case == "trace_is_file":
        (tmp_path / "f").write_text("x")
        args, expect = ["--trace", tmp_path / "f"], str(tmp_path / "f")
    elif case == "no_events":
        (tmp_path / "t").mkdir()
        (tmp_path / "t" / "run.json").write_text(json.dumps({"strategy": "sgd", "world_size": 1}))
        args, expect = ["--trace", tmp_path / "t"], "events.parquet"
    elif case == "pred_missing_summary":
        (pred / "summary.parquet").unlink()
        args, expect = ["--prediction", pred], str(pred / "summary.parquet")
    elif case == "pred_missing_column":
        st = pd.read_parquet(pred / "stage_times.parquet").drop(columns="time_us")
        st.to_parquet(pred / "stage_times.parquet")
        args, expect = ["--prediction", pred], "time_us"
    elif case == "bad_validation":
        (tmp_path / "v.txt").write_text("x")
        args, expect = ["--trace", trace, "--validation", tmp_path / "v.txt"], "v.txt"
    elif case == "empty_validation":
        (tmp_path / "v.json").write_text(json.dumps({"runs": []}))
        args, expect = ["--validation", tmp_path / "v.json"], "v.json: holds no held-out runs"
    elif case == "no_inputs":
        args, expect = [], "--trace"
    else:
        args, expect = ["--trace", trace, "--timeline-step", 99], "step 99"
    assert _report(*args, "--out", out) == 2
    err = capsys.readouterr().err
    assert err.startswith("kfacperf report: error:") and expect in err
    assert "Traceback" not in err
    assert not out.exists()


def test_report_never_imports_torch(study, tmp_path):
    code = (
        "import sys; from kfacperf.cli import main; "
        f"rc = main(['report', '--trace', {str(study['traces'][1])!r}, '--prediction', "
        f"{str(study['predictions'][0])!r}, '--out', {str(tmp_path / 'r.html')!r}]); "
        "assert rc == 0, rc; "
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120)


def test_committed_gpu_validations_are_found_beside_their_traces(tmp_path):
    """What finish writes (traces/DEVICE/validation-PRECISION.json) is what the demo's report
    shows beside this machine's validation."""
    from kfacperf.report.inputs import committed_validations

    assert committed_validations(tmp_path / "none") == {}
    rows = [{"run": "resnet50-bf16-sgd-b64", "measured_step_us": 4.0e4,
             "predicted_step_us": 4.1e4}]
    (tmp_path / "h200").mkdir()
    (tmp_path / "h200" / "validation-bf16.json").write_text(json.dumps({"runs": rows}))
    (tmp_path / "h200" / "checks.json").write_text("{}")
    (tmp_path / "reference").mkdir()
    got = committed_validations(tmp_path)
    assert list(got) == ["h200 validation-bf16"]
    assert got["h200 validation-bf16"]["run"].tolist() == ["resnet50-bf16-sgd-b64"]



def test_sources_name_every_input_file_and_its_command(study, tmp_path):
    """The page says where its numbers come from: each trace with the command in its
    run.json, each prediction with its command, and the validation and plan files read."""
    from helpers.convergence import MLP_SGD
    from kfacperf.plan import plan, save_plan

    sgd = study["traces"][0]
    json_run = json.loads((sgd / "run.json").read_text())
    json_run.update(command="kfacperf profile --out <sgd> & more", completed=False,
                    failure="rank 1 was killed")
    (sgd / "run.json").write_text(json.dumps(json_run))
    rows = [{"run": "a", "measured_step_us": 100.0, "predicted_step_us": 104.0}]
    (tmp_path / "val.json").write_text(json.dumps({"runs": rows}))
    plan_file = save_plan(plan("mlp", "v100", "abci-v100", gpus=[1], strategies=["sgd"],
                               batch_per_gpu=[16], convergence=[MLP_SGD], memory_gb=1.0),
                          tmp_path / "plan.json")
    out = tmp_path / "r.html"
    assert _report("--trace", sgd, "--prediction", study["predictions"][0], "--validation",
                   tmp_path / "val.json", "--plan", plan_file, "--out", out) == 0
    text = out.read_text()
    sources = text[text.index('<section id="sources">'):]
    sources = sources[:sources.index("</section>")]
    for path in (sgd, study["predictions"][0], tmp_path / "val.json", plan_file):
        assert f"<td class=\"wrap\">{path}</td>" in sources
    assert "kfacperf profile --out &lt;sgd&gt; &amp; more (did not complete: rank 1 was killed)" \
        in sources
    assert "kfacperf validate --out" in sources and "kfacperf plan --out" in sources


def test_validation_spread_is_unsigned_and_errors_signed(tmp_path):
    rows = [{"run": "a", "measured_step_us": 100.0, "predicted_step_us": 95.0,
             "worst_stage_error_pct": -7.5, "spread_pct": 28.4}]
    (tmp_path / "v.json").write_text(json.dumps({"runs": rows}))
    out = tmp_path / "v.html"
    assert _report("--validation", tmp_path / "v.json", "--out", out) == 0
    text = out.read_text()
    assert "<td>28.4%</td>" in text and "+28.4%" not in text
    assert "<td>-7.5%</td>" in text and "-5.0%" in text
