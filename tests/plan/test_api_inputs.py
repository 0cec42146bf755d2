"""plan() and PlanResult called from Python: one value where a list is taken, "F/I" interval
strings, malformed axes named, best() refusing what is no optimizer or GPU count of the plan,
save_plan refusing to overwrite."""
from __future__ import annotations

from pathlib import Path

import pytest

from helpers.convergence import MLP_SGD, mlp_kfac
from kfacperf.plan import PlanSpace, plan, save_plan
from kfacperf.plan.result import load_plan

SGD = MLP_SGD
KFAC = mlp_kfac()


@pytest.fixture(scope="module")
def small():
    return plan("mlp", "v100", "abci-v100", gpus=[1, 4], batch_per_gpu=[4, 16],
                convergence=[SGD, KFAC], memory_gb=1.0, intervals=[(1, 1), (5, 5)])


def test_lone_values_are_lists_of_one() -> None:
    """Each axis given alone plans what the list of it plans (never its characters)."""
    alone = plan("resnet50", "v100", "abci-v100", gpus=64, strategies="kaisa",
                 convergence="spngd-resnet50", batch_per_gpu=32, intervals="10/100",
                 comm_dtypes="fp16", symmetric=False, bucket_mb=25)
    listed = plan("resnet50", "v100", "abci-v100", gpus=[64], strategies=["kaisa"],
                  convergence=["spngd-resnet50"], batch_per_gpu=[32], intervals=[(10, 100)],
                  comm_dtypes=["fp16"], symmetric=[False], bucket_mb=[25.0])
    assert alone.space == listed.space
    assert alone.space["strategies"] == ["kaisa"] and alone.space["gpus"] == [64]
    assert alone.space["comm_dtypes"] == ["fp16"] and alone.space["intervals"] == ["10/100"]
    assert [c.to_dict() for c in alone.choices] == [c.to_dict() for c in listed.choices]
    assert alone.best(64, "kfac") is not None


def test_plan_space_of_normalises_every_axis() -> None:
    from kfacperf.plan.space import parse_intervals

    space = PlanSpace.of(gpus=(8, 2, 8), strategies="sgd", batch_per_gpu=16,
                         intervals=["1/1, 10/100", (5, 50)], comm_dtypes="bf16",
                         symmetric=True, bucket_mb=10)
    assert space.gpus == (2, 8) and space.strategies == ("sgd",)
    assert space.batch_per_gpu == (16,) and space.intervals == ((1, 1), (10, 100), (5, 50))
    assert space.comm_dtypes == ("bf16",) and space.symmetric == (True,)
    assert space.bucket_mb == (10.0,)
    assert parse_intervals("1/1,10/100") == [(1, 1), (10, 100)]


@pytest.mark.parametrize(("kw", "match"), [
    ({"strategies": "kaisa:0.5"}, r"unknown strategy 'kaisa:0.5'"),
    ({"symmetric": "yes"}, r"symmetric: expected True or False or a list of them, got 'yes'"),
    ({"symmetric": ["yes"]}, r"symmetric must be True or False, got 'yes'"),
    ({"symmetric": [1, 0]}, r"symmetric must be True or False, got 1"),
    ({"intervals": [10, 100]}, r"intervals: 10 is neither .*one pair alone is "
                               r"intervals=\[\(10, 100\)\] or '10/100'"),
    ({"intervals": (10, 100)}, r"intervals: 10 is neither"),
    ({"intervals": ["10/x"]}, r"intervals '10/x': 10/x: 'x' is not a whole number"),
    ({"intervals": ["10"]}, r"intervals '10': '10' is not FACTOR/INVERSE"),
    ({"intervals": [(1.5, 3)]}, r"intervals: \(1.5, 3\) is neither"),
    ({"intervals": "3/10"}, r"inverse interval a multiple of the factor interval"),
    ({"gpus": None}, r"gpus: expected a positive integer or a list of them, got None"),
    ({"gpus": "64"}, r"gpus: expected a positive integer or a list of them, got '64'"),
    ({"batch_per_gpu": [32, "64"]}, r"batch_per_gpu must be positive integers, got '64'"),
    ({"comm_dtypes": "fp8"}, r"factor communication precision 'fp8' unknown"),
    ({"bucket_mb": "25"}, r"bucket_mb: expected a size in MB or a list of them, got '25'"),
    ({"bucket_mb": [25, "50"]}, r"bucket sizes must be > 0 MB, got '50'"),
    ({"convergence": 3}, r"convergence: expected a convergence model, preset name or TOML "
                         r"path or a list of them, got 3"),
    ({"convergence": [3]}, r"convergence: expected a convergence model, preset name or TOML "
                           r"path, got 3"),
])
def test_malformed_axes_are_value_errors_naming_the_argument(kw, match) -> None:
    args = {"gpus": [4], "convergence": [SGD, KFAC], **kw}
    with pytest.raises(ValueError, match=match):
        plan("mlp", "v100", "abci-v100", **args)


def test_best_refuses_what_is_no_optimizer_or_planned_gpu_count(small) -> None:
    assert small.best(4, "kfac") is not None and small.best(4, "sgd") is not None
    with pytest.raises(ValueError, match=r"not the strategy 'kaisa': strategies spngd, kaisa "
                                         r"map to kfac, so best\(4, 'kfac'\)"):
        small.best(4, "kaisa")
    with pytest.raises(ValueError, match="unknown optimizer 'adam': use sgd or kfac"):
        small.best(4, "adam")
    with pytest.raises(ValueError, match="7 GPUs were not planned; planned GPU counts: 1, 4"):
        small.best(7, "kfac")


def test_best_is_none_where_nothing_fit() -> None:
    nothing = plan("mlp", "v100", "abci-v100", gpus=[4], batch_per_gpu=[16],
                   convergence=[SGD, KFAC], memory_gb=1e-4)
    assert nothing.choices == () and nothing.best(4, "kfac") is None


def test_save_plan_refuses_an_existing_file_without_force(small, tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    path.write_text("mine\n")
    with pytest.raises(ValueError, match="already exists"):
        save_plan(small, path)
    assert path.read_text() == "mine\n"
    assert save_plan(small, path, force=True) == path
    assert load_plan(path).space == small.space
