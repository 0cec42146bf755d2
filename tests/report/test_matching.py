from pathlib import Path

import pandas as pd

from kfacperf.report import matching
from kfacperf.report.inputs import PredictionData, RunData


def _run(strategy="spngd", world_size=2, workload="mlp", batch=32, device="cpu"):
    return RunData(name=f"{strategy}-{world_size}", path=Path("x"),
                   run={"strategy": strategy, "world_size": world_size, "workload": workload,
                        "batch_per_rank": batch, "device": {"name": device}},
                   events=pd.DataFrame(), telemetry=None, summary=None)


def _pred(name, rows, **meta):
    return PredictionData(name=name, path=Path(name), meta=meta, summary=pd.DataFrame(rows),
                          stage_times=pd.DataFrame(), events=pd.DataFrame())


def _row(strategy, gpus, step_us, batch=32):
    return {"strategy": strategy, "gpus": gpus, "step_us": step_us, "batch_per_gpu": batch,
            "kfac_overhead": 1.5}


def test_match_by_strategy_and_gpu_count():
    pred = _pred("p", [_row("spngd", 1, 10.0), _row("spngd", 2, 20.0), _row("kaisa", 2, 30.0)], workload="mlp")
    assert matching.match_prediction(_run("spngd", 2), [pred]).step_us == 20.0
    assert matching.match_prediction(_run("kaisa", 2), [pred]).step_us == 30.0
    assert matching.match_prediction(_run("kaisa", 4), [pred]) is None
    assert matching.match_prediction(_run("sgd", 2), [pred]) is None


def test_no_match_across_workloads_or_batches_and_first_given_wins():
    other = _pred("resnet", [_row("spngd", 2, 99.0)], workload="resnet50")
    big = _pred("big", [_row("spngd", 2, 77.0, batch=256)], workload="mlp")
    first = _pred("first", [_row("spngd", 2, 20.0)], workload="models/workloads/mlp.toml")
    second = _pred("second", [_row("spngd", 2, 40.0)], workload="mlp")
    run = _run("spngd", 2)
    assert matching.match_prediction(run, [other, big]) is None
    assert matching.match_prediction(run, [other, big, first, second]).prediction.name == "first"
    unknown = _pred("anon", [_row("spngd", 2, 5.0)])  # workload not stated: does not block
    assert matching.match_prediction(run, [unknown]).prediction.name == "anon"


def test_sgd_baseline_needs_same_setting():
    kfac = _run("spngd", 2)
    runs = [_run("sgd", 4), _run("sgd", 2, batch=64), _run("sgd", 2, device="h200"), kfac]
    assert matching.sgd_baseline(kfac, runs) is None
    good = _run("sgd", 2)
    assert matching.sgd_baseline(kfac, runs + [good]) is good
    assert matching.sgd_baseline(good, runs + [good]) is None


def test_groups_and_variant_labels():
    base = _pred("base", [], workload="mlp", cluster="dgx", what_if={"bandwidth_scale": 1.0},
                 intervals={"factor": 1, "inverse": 10}, created="t1")
    half = _pred("half", [], workload="mlp", cluster="dgx", what_if={"bandwidth_scale": 0.5},
                 intervals={"factor": 1, "inverse": 10}, created="t2")
    stale = _pred("stale", [], workload="mlp", cluster="dgx", what_if={"bandwidth_scale": 1.0},
                  intervals={"factor": 10, "inverse": 100}, created="t3")
    resnet = _pred("r", [], workload="resnet50")
    groups = matching.group_by_workload([base, resnet, half, stale])
    assert [[p.name for p in g] for g in groups] == [["base", "half", "stale"], ["r"]]
    labels = matching.variant_labels(groups[0])
    assert labels == [
        "intervals.factor=1, intervals.inverse=10, what_if.bandwidth_scale=1",
        "intervals.factor=1, intervals.inverse=10, what_if.bandwidth_scale=0.5",
        "intervals.factor=10, intervals.inverse=100, what_if.bandwidth_scale=1",
    ]
    same = [_pred("a", [], workload="mlp", created="1"), _pred("b", [], workload="mlp", created="2")]
    assert matching.variant_labels(same) == ["a", "b"]

