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
    pred = _pred("p", [_row("spngd", 1, 10.0), _row("spngd", 2, 20.0), _row("kaisa", 2, 30.0)],
                 workload="mlp")
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
    common = {"workload": "mlp", "cluster": "dgx", "strategies": [{"label": "spngd"}]}
    base = _pred("base", [], **common, overrides={}, factor_interval=1, inverse_interval=10,
                 intervals={"factor": 1, "inverse": 10}, created="t1", step_kinds=[{"step": 0}])
    half = _pred("half", [], **common, overrides={"bandwidth_scale": 0.5}, factor_interval=1,
                 inverse_interval=10, intervals={"factor": 1, "inverse": 10}, created="t2",
                 step_kinds=[{"step": 0}])
    stale = _pred("stale", [], **common, overrides={}, factor_interval=10, inverse_interval=100,
                  intervals={"factor": 10, "inverse": 100}, created="t3",
                  step_kinds=[{"step": 0}, {"step": 10}])
    resnet = _pred("r", [], workload="resnet50")
    groups = matching.group_by_workload([base, resnet, half, stale])
    assert [[p.name for p in g] for g in groups] == [["base", "half", "stale"], ["r"]]
    # intervals are stored twice (factor_interval and intervals.factor): named once; lists,
    # tables and creation times are not differences worth a label
    assert matching.variant_labels(groups[0]) == [
        "factor_interval=1, inverse_interval=10",
        "bandwidth_scale=0.5, factor_interval=1, inverse_interval=10",
        "factor_interval=10, inverse_interval=100",
    ]
    same = [_pred("a", [], workload="mlp", created="1"),
            _pred("b", [], workload="mlp", created="2")]
    assert matching.variant_labels(same) == ["a", "b"]
    clash = [_pred("a", [], workload="mlp", x={"scale": 1}, y={"scale": 2}),
             _pred("b", [], workload="mlp", x={"scale": 3}, y={"scale": 5})]
    assert matching.variant_labels(clash) == ["x.scale=1, y.scale=2", "x.scale=3, y.scale=5"]


def test_kaisa_fraction_intervals_and_what_if_preference():
    rows = [dict(_row("kaisa:0.5", 2, 50.0), grad_worker_fraction=0.5),
            dict(_row("kaisa", 2, 10.0), grad_worker_fraction=1.0)]
    pred = _pred("p", rows, workload="mlp", factor_interval=1, inverse_interval=10)
    run = _run("kaisa", 2)
    run.run.update(grad_worker_fraction=0.5, factor_interval=1, inverse_interval=10)
    assert matching.match_prediction(run, [pred]).step_us == 50.0
    run.run["grad_worker_fraction"] = 1.0
    assert matching.match_prediction(run, [pred]).step_us == 10.0
    run.run["inverse_interval"] = 100  # the prediction simulated other intervals
    assert matching.match_prediction(run, [pred]) is None
    sgd_pred = _pred("s", [_row("sgd", 2, 7.0)], workload="mlp", factor_interval=1,
                     inverse_interval=10)
    # SGD ignores intervals
    assert matching.match_prediction(_run("sgd", 2), [sgd_pred]).step_us == 7.0
    slow = _pred("slow", [_row("spngd", 2, 99.0)], workload="mlp",
                 overrides={"bandwidth_scale": 0.5})
    plain = _pred("plain", [_row("spngd", 2, 20.0)], workload="mlp",
                  overrides={"threads_per_rank": 1})
    assert matching.is_what_if(slow) and not matching.is_what_if(plain)
    assert matching.match_prediction(_run("spngd", 2), [slow, plain]).prediction.name == "plain"
    assert matching.match_prediction(_run("spngd", 2), [slow]).prediction.name == "slow"
