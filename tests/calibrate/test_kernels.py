"""kfacperf.calibrate.kernels: the inverse stage's terms from isolated kernel timings, checked
against timings made from known terms and against the closed-form price of ResNet-50's
inverse step."""
from __future__ import annotations

import pytest

from kfacperf.calibrate.kernels import fit_inverse_kernels, kernel_inverse_us, kernel_samples
from kfacperf.sim.models import load_device, load_workload

SIZES = (64, 128, 256, 512, 1024, 2048, 4096, 8192)


def timings(o: float, r: float, eff: float, *, c: float = 9.0, peak_per_us: float,
            dtype: str = "fp64", key: str = "eigh", op: str = "eigh") -> dict:
    """kernels.json records of decompositions that take o + r n + c n^3 / (peak eff)."""
    return {key: [{"op": op, "n": n, "dtype": dtype,
                   "timing": {"median_us": o + r * n + c * n ** 3 / (peak_per_us * eff)}}
                  for n in SIZES]}


def test_the_terms_behind_the_timings_come_back():
    h200 = load_device("h200")
    peak = h200.peak_flops_per_us("fp32")
    report = timings(40.0, 2.5, 0.15, peak_per_us=peak)
    report["eigh"] += [{"op": "eigh", "n": 77, "dtype": "fp32",  # another dtype: left out
                        "timing": {"median_us": 1e9}}]
    fit = fit_inverse_kernels(report, h200)
    assert fit.decomposition_overhead_us == pytest.approx(40.0, rel=1e-5)
    assert fit.row_us == pytest.approx(2.5, rel=1e-5)
    assert fit.efficiency == pytest.approx(0.15, rel=1e-5)
    assert fit.sizes == SIZES and fit.max_rel_error < 1e-6
    terms = fit.stage_efficiency()
    assert (terms.overhead_us, terms.assumed) == (pytest.approx(80.0), False)  # 2 per layer
    assert fit.predict_us(3000, h200) == pytest.approx(
        40.0 + 2.5 * 3000 + 9 * 3000 ** 3 / (peak * 0.15), rel=1e-5)


def test_cholesky_reads_its_own_op_and_flop_count():
    h200 = load_device("h200")
    report = timings(300.0, 1.0, 0.3, c=1.0, peak_per_us=h200.peak_flops_per_us("fp32"),
                     key="cholesky", op="spd_inverse")
    report["cholesky"] += [{"op": "cholesky_ex", "n": 64, "dtype": "fp64",
                            "timing": {"median_us": 1.0}}]  # a part, not the whole inverse
    assert len(kernel_samples(report, "cholesky", "fp64")) == len(SIZES)
    fit = fit_inverse_kernels(report, h200, method="cholesky")
    assert (fit.decomposition_overhead_us, fit.row_us, fit.efficiency) == (
        pytest.approx(300.0, rel=1e-5), pytest.approx(1.0, rel=1e-5),
        pytest.approx(0.3, rel=1e-5))


def test_resnet50s_inverse_step_priced_with_the_kernel_terms_is_the_closed_form():
    h200 = load_device("h200")
    peak = h200.peak_flops_per_us("fp32")
    fit = fit_inverse_kernels(timings(40.0, 2.5, 0.15, peak_per_us=peak), h200)
    w = load_workload("resnet50")
    expected = sum(80.0 + 2.5 * (l.dim_a + l.dim_g)
                   + sum(9 * d ** 3 / (peak * 0.15) for d in (l.dim_a, l.dim_g))
                   for l in w.layers)
    assert kernel_inverse_us(fit, h200, w) == pytest.approx(expected, rel=1e-4)
    one = w.layers[0]
    assert kernel_inverse_us(fit, h200, w, layers=[one.name]) == pytest.approx(
        80.0 + 2.5 * (one.dim_a + one.dim_g)
        + sum(9 * d ** 3 / (peak * 0.15) for d in (one.dim_a, one.dim_g)), rel=1e-4)


def test_too_few_sizes_or_an_unknown_method_is_a_clear_error():
    h200 = load_device("h200")
    with pytest.raises(ValueError, match="needs 3 sizes"):
        fit_inverse_kernels({"eigh": []}, h200)
    with pytest.raises(ValueError, match="no kernel timing for inverse method"):
        fit_inverse_kernels({}, h200, method="svd")
