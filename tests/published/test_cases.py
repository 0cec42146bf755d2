"""Published cases: strict files with sources, predicted from their setups; fits refuse
held-out cases and recover known terms."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from kfacperf.calibrate.published import (
    CLUSTER_FIELDS,
    fit_device_to_published,
    parse_term,
    parse_terms,
    set_cluster_terms,
    set_terms,
)
from kfacperf.published.cases import list_cases, load_case, load_cases, published_dir
from kfacperf.published.predict import predict_series
from kfacperf.sim.models import load_cluster, load_device

CASE = """\
format = "kfacperf-published-1"
name = "tiny"
title = "a synthetic case"
citation = "made by this test"
role = "{role}"
read = "derived"
quantity = "step_s"

[setup]
workload = "resnet50"
device = "v100-sxm2"
cluster = "abci-v100"
strategy = "spngd"
batch_per_gpu = 32
inverse_method = "cholesky"

[[series]]
name = "curve"
gpus = [1, 4, 16]
values = {values}
"""


def _write(tmp_path: Path, role: str = "calibration", values: str = "[0.5, 0.3, 0.2]") -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(CASE.format(role=role, values=values))
    return path


def test_every_committed_case_loads_with_its_source() -> None:
    names = list_cases()
    assert {"spngd-fig5", "spngd-table1", "pipefisher-bert"} <= set(names)
    for name in names:
        case = load_case(name)
        assert case.citation and case.role in ("calibration", "held-out")
        for key in case.assumed:
            assert key in case.setup or any(key in s.setup for s in case.series), (name, key)


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.replace('strategy = "spngd"', 'strategy = "spngd"\nspeed = 3'), "unknown setup"),
    (lambda t: t.replace('workload = "resnet50"\n', ""), "workload"),
    (lambda t: t.replace("[0.5, 0.3, 0.2]", "[0.5, 0.3]"), "expected 3"),
    (lambda t: t.replace("[0.5, 0.3, 0.2]", "[0.5, 0.3, -1]"), "positive"),
    (lambda t: t.replace('role = "calibration"', 'role = "training"'), "role"),
])
def test_bad_cases_are_refused_naming_the_key(tmp_path, edit, message) -> None:
    path = _write(tmp_path)
    path.write_text(edit(path.read_text()))
    with pytest.raises(ValueError, match=message):
        load_case(str(path))


def test_a_fit_recovers_a_known_term_and_refuses_held_out_cases(tmp_path) -> None:
    true = set_terms(load_device("v100-sxm2"), {parse_term("backward.efficiency"): 0.3})
    case = load_case(str(_write(tmp_path)))
    measured = [row[6] for row in predict_series(case, case.series[0],
                                                  models={"v100-sxm2": true})]
    path = _write(tmp_path, values=json.dumps(measured))
    fit = fit_device_to_published([load_case(str(path))], load_device("v100-sxm2"), "v100-sxm2",
                                  [parse_term("backward.efficiency")])
    assert fit.device.stages["backward"].efficiency == pytest.approx(0.3, rel=2e-3)
    assert fit.rms_log_error_after < 1e-3 < fit.rms_log_error_before
    assert fit.device.stages["backward"].assumed is False
    held = load_case(str(_write(tmp_path, role="held-out", values=json.dumps(measured))))
    with pytest.raises(ValueError, match="held out"):
        fit_device_to_published([held], load_device("v100-sxm2"), "v100-sxm2",
                                [parse_term("backward.efficiency")])


def test_a_term_named_twice_is_refused_naming_it() -> None:
    with pytest.raises(ValueError, match="--fit names forward.efficiency more than once"):
        parse_terms("forward.efficiency,backward.efficiency, forward.efficiency")
    assert parse_terms("forward.efficiency,inverse_method.cholesky.row_us") == [
        parse_term("forward.efficiency"), parse_term("inverse_method.cholesky.row_us")]
    with pytest.raises(ValueError, match="backward.efficiency more than once"):
        fit_device_to_published([load_case("spngd-fig5")], load_device("v100-spngd"),
                                "v100-spngd", [parse_term("backward.efficiency")] * 2)


@pytest.mark.parametrize("field", CLUSTER_FIELDS)
def test_set_cluster_terms_sets_each_tier_field_and_marks_it_fitted(field) -> None:
    cluster = load_cluster("abci-v100")
    fitted = set_cluster_terms(cluster, {parse_term(f"cluster.inter.{field}"): 7.5})
    assert getattr(fitted.inter, field) == 7.5 and fitted.inter.assumed is False
    assert fitted.intra == cluster.intra


def test_images_per_second_compare_as_step_times(tmp_path) -> None:
    path = _write(tmp_path)
    text = path.read_text().replace('quantity = "step_s"', 'quantity = "images_per_s"')
    path.write_text(text.replace("[0.5, 0.3, 0.2]", "[64, 256, 2048]"))
    case = load_case(str(path))
    rows = predict_series(case, case.series[0])
    assert [r[5] for r in rows] == pytest.approx([32 * 1 / 64, 32 * 4 / 256, 32 * 16 / 2048])


def test_validate_published_command(capsys) -> None:
    from kfacperf.cli import main

    assert main(["validate", "--published", "pipefisher-bert", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["cases"][0]["role"] == "calibration"
    assert {p["stage"] for p in data["points"]} >= {"inverse", "forward"}
    assert main(["validate", "--published", "pipefisher-bert", "--calibrate", "x"]) == 2
    assert "without --calibrate" in capsys.readouterr().err


def test_a_case_path_that_is_a_directory_says_so(tmp_path, capsys) -> None:
    from kfacperf.cli import main

    assert main(["validate", "--published", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == (f"kfacperf validate: error: published case file {tmp_path} is a directory, "
                   "not a file; give "
                   "a case .toml file (e.g. published/spngd-fig5.toml) or a case name (e.g. "
                   "spngd-fig5)\n")


def test_report_draws_each_published_case(tmp_path) -> None:
    from kfacperf.report.build import build_sections
    from kfacperf.report.published_section import load_published
    from kfacperf.validation.published import validate_published

    path = tmp_path / "pub.json"
    path.write_text(json.dumps(validate_published(["pipefisher-bert", "mlperf-v06-abci"])
                               .to_dict()))
    secs = {s.key: s for s in build_sections([], [], published=load_published(path))}
    sec = secs["published"]
    assert len(sec.figures) == 2  # one per case: a stage breakdown, a curve
    curve = sec.figures[1]
    assert curve.layout.xaxis.type == "log"
    assert [t.name for t in curve.data] == ["sgd_fp16_b42 measured", "sgd_fp16_b42 predicted"]
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="validate --published"):
        load_published(bad)


def test_bert_block_factors_are_the_size_pipefisher_prints() -> None:
    """PipeFisher prints 168 MB of A and G per BERT-Large block (fp32, no bias column); the
    generated workload model, with its bias column, holds 5 (1025^2 + 1024^2) + 4097^2 +
    4096^2 values: 168.1 MiB."""
    from kfacperf.sim.models import load_workload

    w = load_workload("bert-large-block")
    kfac = [l for l in w.layers if l.kind == "linear"]
    values = sum(l.dim_a ** 2 + l.dim_g ** 2 for l in kfac)
    assert values == 5 * (1025 ** 2 + 1024 ** 2) + 4097 ** 2 + 4096 ** 2
    assert 4 * values / 2 ** 20 == pytest.approx(168.0, rel=2e-3)


def test_a_named_case_of_another_role_says_which_role_it_has() -> None:
    from kfacperf.validation.published import validate_published

    with pytest.raises(ValueError, match=r"no named published case has role held-out "
                                         r"\(spngd-fig5 is a calibration case\)"):
        validate_published(["spngd-fig5"], roles=["held-out"])


def test_a_case_given_twice_counts_once_and_two_files_of_one_case_are_refused(tmp_path) -> None:
    """Counted twice, a case would weigh double in a fit and be reported twice."""
    path = _write(tmp_path)
    assert [c.name for c in load_cases([str(path), str(path), str(tmp_path / "." / "tiny.toml")])
            ] == ["tiny"]
    assert len(load_cases(["dle-resnet50", "dle-resnet50"])) == 1
    copy = tmp_path / "copy.toml"
    copy.write_text(path.read_text())
    with pytest.raises(ValueError, match="are both case 'tiny'"):
        load_cases([str(path), str(copy)])


def test_a_fit_on_a_device_no_case_runs_on_names_the_devices(tmp_path) -> None:
    case = load_case(str(_write(tmp_path)))
    with pytest.raises(ValueError, match="they run on device v100-sxm2"):
        fit_device_to_published([case], load_device("v100-sxm2"), "v100",
                                [parse_term("backward.efficiency")])


def test_start_from_without_out_is_refused_not_a_silent_no_op(tmp_path, capsys) -> None:
    from kfacperf.cli import main

    assert main(["calibrate", "--device", "h200", "--start-from", "a100-sxm4"]) == 2
    assert "give --out FILE.toml" in capsys.readouterr().err
    out = tmp_path / "h200.toml"
    assert main(["calibrate", "--device", "h200", "--start-from", "a100-sxm4",
                 "--out", str(out)]) == 0
    assert load_device(str(out)).stages["forward"].assumed


def test_a_setup_the_simulator_refuses_names_the_case_file(tmp_path) -> None:
    from kfacperf.validation.published import validate_published

    path = _write(tmp_path)
    path.write_text(path.read_text().replace('strategy = "spngd"', 'strategy = "spgnd"'))
    with pytest.raises(ValueError, match=r"tiny.toml: series 'curve': unknown strategy 'spgnd'"):
        validate_published([str(path)])


def test_a_copy_of_a_held_out_case_that_calls_itself_calibration_is_refused(tmp_path) -> None:
    original = published_dir() / "mlperf-v06-abci.toml"
    copy = tmp_path / "mine.toml"
    copy.write_text(original.read_text().replace('role = "held-out"', 'role = "calibration"'))
    case = load_case(str(copy))
    assert case.role == "calibration" and case.name == "mlperf-v06-abci"
    with pytest.raises(ValueError, match="published/ holds out"):
        fit_device_to_published([case], load_device("v100-sxm2"), "v100-sxm2",
                                [parse_term("forward.efficiency")])
