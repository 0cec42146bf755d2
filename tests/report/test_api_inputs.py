"""build_report called from Python with what the library's own functions return: a
ValidationResult, a PublishedResult, a plan file's path, one trace directory alone; and a
TypeError saying what to pass for anything else."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from helpers.convergence import MLP_SGD
from kfacperf.plan import plan, save_plan
from kfacperf.report.build import build_report

ROOT = Path(__file__).resolve().parents[2]
REF = ROOT / "traces" / "reference"


@pytest.fixture(scope="module")
def validation():
    if not (REF / "p1").is_dir():
        pytest.skip("no committed reference traces")
    from kfacperf.validation import validate

    return validate([REF / "p1" / "resnet20-sgd-b32-r1"], [REF / "p2" / "resnet20-sgd-b32-r2"],
                    cluster=str(REF / "local-cpu.toml"))


@pytest.fixture(scope="module")
def published():
    from kfacperf.validation.published import validate_published

    return validate_published(["dlperf-resnet50"])


@pytest.fixture(scope="module")
def planned():
    sgd = MLP_SGD
    return plan("mlp", "v100", "abci-v100", gpus=[1, 4], strategies=["sgd"],
                batch_per_gpu=[16], convergence=[sgd], memory_gb=1.0)


def test_a_validation_result_is_its_runs(validation, tmp_path: Path) -> None:
    from kfacperf.report.inputs import validation_tables

    out = build_report([], [], tmp_path / "r.html", validation)
    text = out.read_text()
    assert "1 held-out runs: median |error|" in text and "resnet20-sgd-b32" in text
    tables = validation_tables({"cpu": validation, "file": _file(validation, tmp_path)})
    assert list(tables) == ["cpu", "file"]
    assert tables["cpu"] is validation.runs
    assert tables["file"]["run"].tolist() == validation.runs["run"].tolist()


def _file(validation, tmp_path: Path) -> Path:
    from kfacperf.cli.commands.validate import write_out

    path = tmp_path / "v.json"
    write_out(validation, str(path))
    return path


def test_validation_files_alone_or_listed_are_labelled_by_name(validation,
                                                              tmp_path: Path) -> None:
    from kfacperf.report.inputs import validation_tables

    path = _file(validation, tmp_path)
    assert list(validation_tables(path)) == ["v"]
    assert list(validation_tables(str(path))) == ["v"]
    other = tmp_path / "w.csv"
    validation.runs.to_csv(other, index=False)
    assert list(validation_tables([path, other])) == ["v", "w"]
    out = build_report([], [], tmp_path / "r.html", [path, other])
    assert "v: measured vs predicted" in out.read_text()
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"runs": []}))
    with pytest.raises(ValueError, match="empty.json: holds no held-out runs"):
        build_report([], [], tmp_path / "e.html", empty)


def test_a_published_result_is_its_dict(published, tmp_path: Path) -> None:
    out = build_report([], [], tmp_path / "r.html", published=published)
    text = out.read_text()
    assert "dlperf-resnet50" in text and "Published GPU measurements vs prediction" in text
    path = tmp_path / "pub.json"
    path.write_text(json.dumps(published.to_dict()))
    for given in (path, str(path), published.to_dict()):
        again = build_report([], [], tmp_path / "again.html", published=given).read_text()
        assert "dlperf-resnet50" in again


def test_a_plan_file_is_read(planned, tmp_path: Path) -> None:
    path = save_plan(planned, tmp_path / "plan.json")
    for given in (str(path), path, planned.to_dict()):
        text = build_report([], [], tmp_path / "r.html", plan=given).read_text()
        assert "Chosen configurations" in text and "kfacperf report: mlp" in text


def test_one_trace_directory_alone(study) -> None:
    trace, pred = study["traces"][0], study["predictions"][0]
    out = build_report(str(trace), pred, study["tmp"] / "one.html")
    assert "1 measured run(s), 1 prediction(s)" in out.read_text()


@pytest.mark.parametrize(("kw", "match"), [
    ({"validation": 42}, r"validation: expected a pandas DataFrame of held-out runs, the "
                         r"ValidationResult of kfacperf.validation.validate\(\), or a file "
                         r"kfacperf validate --out wrote .*got int"),
    ({"validation": {"gpu": 42}}, r"validation 'gpu': expected a pandas DataFrame"),
    ({"validation": [pd.DataFrame()]}, r"validation: expected .* got list"),
    ({"plan": 42}, r"plan: expected the PlanResult of kfacperf.plan.plan\(\), its to_dict\(\), "
                   r"or the JSON file kfacperf.plan.save_plan / kfacperf plan --out wrote; "
                   r"got int"),
    ({"published": 42}, r"published: expected the PublishedResult of kfacperf.validation."
                        r"published.validate_published\(\), its to_dict\(\), or the JSON file "
                        r"kfacperf validate --published --out wrote; got int"),
])
def test_anything_else_is_a_type_error_saying_what_to_pass(kw, match, tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=match):
        build_report([], [], tmp_path / "r.html", **kw)
    assert not (tmp_path / "r.html").exists()


def test_a_trace_directory_given_twice_counts_once() -> None:
    """As in validate and calibrate: the same directory (by any spelling) is one run, not two
    rows named ``NAME #1`` and ``NAME #2``."""
    from kfacperf.report.inputs import load_runs

    trace = REF / "p1" / "resnet20-sgd-b16-r1"
    if not trace.is_dir():
        pytest.skip("no committed reference traces")
    runs = load_runs([trace, Path(str(trace) + "/"), trace / ".." / trace.name])
    assert [r.name for r in runs] == [trace.name]
