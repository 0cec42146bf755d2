"""The GPU-cluster targets: SP-NGD's published curves predicted from their setups alone.

Fig. 5 (emp, unitBN): |error| median <= 10 %, worst <= 20 %, fastest GPU count within a
factor 2 of the paper's; the three other Fig. 5 series (same device and cluster models, only
the Fisher variant and the BatchNorm blocks differ): median <= 15 %; Table 1 (stale
statistics): each point within 15 %.  A model change that drifts past them fails here.
"""
from __future__ import annotations

import pytest

from kfacperf.validation.published import validate_published


@pytest.fixture(scope="module")
def result():
    return validate_published(["spngd-fig5", "spngd-table1"])


def _series(result, name):
    return result.series[result.series["series"] == name].iloc[0]


def test_fig5_emp_unit_bn(result) -> None:
    s = _series(result, "emp_unitBN")
    assert s["points"] == 11
    assert s["median_abs_error_pct"] <= 10.0 and s["worst_abs_error_pct"] <= 20.0
    assert 64 / 2 <= int(s["predicted_fastest_gpus"]) <= 64 * 2


@pytest.mark.parametrize("name", ["emp_fullBN", "mc1_unitBN", "mc1_fullBN"])
def test_fig5_other_fisher_variants(result, name) -> None:
    assert _series(result, name)["median_abs_error_pct"] <= 15.0


def test_table1_stale_statistics(result) -> None:
    pts = result.points[result.points["case"] == "spngd-table1"]
    assert len(pts) == 4
    assert (pts["error_pct"].abs() <= 15.0).all(), pts[["series", "error_pct"]]


def test_every_case_is_predicted_and_roles_are_reported() -> None:
    everything = validate_published()
    roles = set(everything.points["role"])
    assert roles == {"calibration", "held-out"}
    assert everything.points["predicted"].gt(0).all()
    text = everything.table()
    assert "held-out:" in text and "never fitted" in text


def test_dkfac_communication_fits_one_network_speed() -> None:
    """D-KFAC's gradient and factor all-reduces share one fitted InfiniBand speed; with the
    factors sent as upper triangles, as its code does, both land within 10 % (sent whole,
    they missed by -34 % and +49 %: no one speed fits both)."""
    pts = validate_published(["dkfac-2080ti"]).points
    comm = pts[pts["series"] == "dkfac_comm"]
    assert set(comm["stage"]) == {"grad_comm", "factor_comm"}
    assert (comm["error_pct"].abs() <= 10.0).all(), comm[["stage", "error_pct"]]
