"""Convergence models: the presets hold their sources' numbers, interpolation is a power law
in log-batch, extrapolation is flagged, and bad files are one-line errors naming the key."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from kfacperf.plan.convergence import (
    ConvergenceModel,
    ConvergencePoint,
    convergence_for,
    load_convergence,
    load_convergence_model,
)

IMAGENET = 1_281_167


def test_presets_hold_the_published_numbers() -> None:
    spngd = load_convergence("spngd-resnet50")
    assert (spngd.workload, spngd.optimizer) == ("resnet50", "kfac")
    # SP-NGD Table 1: 1,760 steps at 32,768 (the 5.5-minute run), 10,948 at 4,096
    assert spngd.at(32768).steps == 1760 and not spngd.at(32768).extrapolated
    assert spngd.at(4096).steps == 10948
    # stale statistics: 7.8% of the statistics traffic left at 32K -> 12.8, down to 12
    assert spngd.at(32768).max_factor_interval == 12
    lars = load_convergence("mlperf-v0.7-lars-resnet50")
    assert lars.optimizer == "sgd"
    # 56 epochs at 33,280 (NVIDIA DGX-2H x32), given as epochs
    assert lars.at(33280).steps == pytest.approx(56 * IMAGENET / 33280)
    assert lars.epochs(33280, lars.at(33280).steps) == pytest.approx(56)
    ck = load_convergence("chainerkfac-resnet50")
    assert [p.global_batch for p in ck.points] == [4096, 8192, 16384, 32768, 65536, 131072]
    assert all(p.factor_interval == 1 and p.inverse_interval == 1 for p in ck.points)
    for model in (spngd, lars, ck):
        assert all(p.source for p in model.points)


def two_points(steps_lo: float, steps_hi: float, **kw: object) -> ConvergenceModel:
    return ConvergenceModel(name="t", workload="w", optimizer="sgd", target="x", points=(
        ConvergencePoint(global_batch=1000, steps=steps_lo, source="a", **kw),
        ConvergencePoint(global_batch=4000, steps=steps_hi, source="b", **kw)))


def test_interpolation_is_a_power_law_in_log_batch() -> None:
    perfect = two_points(100.0, 25.0)  # steps x batch constant
    assert perfect.at(2000).steps == pytest.approx(50.0)
    assert perfect.at(3000).steps == pytest.approx(100 * 1000 / 3000)
    half = two_points(100.0, 50.0)  # 2000 is the log-midpoint: the geometric mean
    assert half.at(2000).steps == pytest.approx(math.sqrt(100.0 * 50.0))
    assert not half.at(2000).extrapolated and half.at(2000).basis == (1000, 4000)


def test_outside_the_data_is_extrapolated_and_says_so() -> None:
    m = two_points(100.0, 50.0)
    below, above = m.at(500), m.at(16000)
    assert below.extrapolated and above.extrapolated
    slope = math.log(0.5) / math.log(4.0)
    assert below.steps == pytest.approx(100.0 * (0.5 ** slope))
    assert above.steps == pytest.approx(50.0 * (4.0 ** slope))
    assert not m.at(1000).extrapolated and not m.at(4000).extrapolated


def test_statistics_intervals_are_the_fresher_neighbour() -> None:
    m = ConvergenceModel(name="k", workload="w", optimizer="kfac", target="x", points=(
        ConvergencePoint(global_batch=1000, steps=100, source="a", factor_interval=10,
                         inverse_interval=100),
        ConvergencePoint(global_batch=4000, steps=50, source="b", factor_interval=1,
                         inverse_interval=1)))
    assert (m.at(1000).max_factor_interval, m.at(1000).max_inverse_interval) == (10, 100)
    assert m.at(2000).max_factor_interval == 1  # between them: the fresher
    assert m.at(500).max_inverse_interval == 100  # below: the nearest point's
    assert m.at(8000).max_inverse_interval == 1
    assert m.at(1000).allows(10, 100) and not m.at(1000).allows(20, 200)
    assert not m.at(2000).allows(2, 2)


HEAD = '''format = "kfacperf-convergence-1"
name = "mine"
workload = "resnet50"
optimizer = "kfac"
target = "75%"
examples_per_epoch = 1281167
'''
POINT = '''
[[points]]
global_batch = {b}
steps = 1000
factor_interval = 1
inverse_interval = 1
source = "written by the user"
'''


@pytest.mark.parametrize("text, pattern", [
    (HEAD + POINT.format(b=1024), r"needs two points or more"),
    (HEAD + POINT.format(b=1024) * 2, r"two points at the same global batch"),
    (HEAD + POINT.format(b=1) + POINT.format(b=2).replace("steps = 1000", "epochs = 3\nsteps = 3"),
     r"key 'points\[1\]\.steps': give exactly one of 'steps' and 'epochs'"),
    (HEAD + POINT.format(b=1) + POINT.format(b=2).replace('source = "written by the user"', ""),
     r"missing key 'points\[1\]\.source'"),
    (HEAD + POINT.format(b=1) + POINT.format(b=2).replace("steps = 1000", "stepz = 1000"),
     r"key 'points\[1\]\.steps': give exactly one"),
    (HEAD + POINT.format(b=1) + POINT.format(b=2) + "\nspeed = 3\n", r"key 'points\[1\]\.speed'"),
    (HEAD + POINT.format(b=1)
     + POINT.format(b=2).replace("factor_interval = 1\ninverse_interval = 1\n", ""),
     r"lacks the statistics intervals"),
    (HEAD.replace('"kfac"', '"sgd"') + POINT.format(b=1) + POINT.format(b=2),
     r"statistics intervals belong to K-FAC models only"),
    (HEAD.replace('"kfac"', '"adam"') + POINT.format(b=1) + POINT.format(b=2),
     r"key 'optimizer': 'adam' is not one of 'sgd', 'kfac'"),
    (HEAD.replace("examples_per_epoch = 1281167\n", "") + POINT.format(b=1)
     + POINT.format(b=2).replace("steps = 1000", "epochs = 3"),
     r"key 'points\[1\]\.epochs': epochs need 'examples_per_epoch'"),
    (HEAD + POINT.format(b=1)
     + POINT.format(b=2).replace("inverse_interval = 1", "inverse_interval = 3")
     .replace("factor_interval = 1", "factor_interval = 2"),
     r"must be a multiple of factor_interval"),
    (HEAD.replace("kfacperf-convergence-1", "kfacperf-device-1") + POINT.format(b=1),
     r"key 'format': expected 'kfacperf-convergence-1'"),
])
def test_bad_files_name_the_file_and_key(tmp_path: Path, text: str, pattern: str) -> None:
    path = tmp_path / "mine.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=pattern) as info:
        load_convergence_model(path)
    assert str(path) in str(info.value)


def test_a_user_file_loads_by_path(tmp_path: Path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text(HEAD + POINT.format(b=4096) + POINT.format(b=1024).replace(
        "steps = 1000", "epochs = 40"))
    m = load_convergence(str(path))
    assert [p.global_batch for p in m.points] == [1024, 4096]  # sorted
    assert m.at(1024).steps == pytest.approx(40 * IMAGENET / 1024)


def test_unknown_or_ambiguous_convergence_data_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"no convergence data for sgd on 'resnet20'"):
        convergence_for("resnet20", "sgd", [])
    with pytest.raises(ValueError, match=r"several convergence presets for kfac on 'resnet50': "
                                         r"chainerkfac-resnet50, spngd-resnet50"):
        convergence_for("resnet50", "kfac", [])
    assert convergence_for("resnet50", "sgd", []).name == "mlperf-v0.7-lars-resnet50"
    spngd = load_convergence("spngd-resnet50")
    assert convergence_for("resnet50", "kfac", [spngd]) is spngd
    with pytest.raises(ValueError, match="is for workload 'resnet50', not 'resnet20'"):
        convergence_for("resnet20", "kfac", [spngd])
    with pytest.raises(ValueError, match="unknown convergence preset 'nope'"):
        load_convergence("nope")


def test_a_power_law_extended_to_no_usable_count_is_an_error_not_a_plan() -> None:
    from kfacperf.plan import plan

    # steps fall 10^12-fold per doubling: at 8 x 32 = 256, 1e12 * 2^(-8 * 12 log2 10) < 1 step
    steep = ConvergenceModel(name="steep", workload="resnet50", optimizer="sgd", target="x",
                             points=(ConvergencePoint(global_batch=1, steps=1e12, source="a"),
                                     ConvergencePoint(global_batch=2, steps=1.0, source="b")))
    assert steep.at(256).steps < 1 and not steep.at(256).usable
    # and the other way: 1e300 steps at 512 extended to 2,048 overflows a float
    huge = ConvergenceModel(name="huge", workload="resnet50", optimizer="sgd", target="x",
                            points=(ConvergencePoint(global_batch=256, steps=1e3, source="a"),
                                    ConvergencePoint(global_batch=512, steps=1e300, source="b")))
    assert huge.at(2048).steps == math.inf and not huge.at(2048).usable
    assert huge.at(256).usable and huge.at(384).usable
    for model in (steep, huge):
        with pytest.raises(ValueError, match=r"not a usable number of steps.*--no-extrapolate"):
            plan("resnet50", "v100", "abci-v100", gpus=[8, 64], strategies=["sgd"],
                 convergence=[model])
        # keeping to the data drops those batches instead
        result = plan("resnet50", "v100", "abci-v100", gpus=[8, 64], strategies=["sgd"],
                      convergence=[model], extrapolate=False)
        assert all(c.steps >= 1 for c in result.choices)
