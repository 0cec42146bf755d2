"""The simulate() API, its summaries and prediction files, and ``kfacperf simulate``."""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pandas as pd
import pytest

from helpers.sim_fakes import fake_collective_us, fake_model, table_workload
from kfacperf import vocab as S
from kfacperf.cli.commands.simulate import parse_gpus
from kfacperf.sim.engine import run_step
from kfacperf.sim.graphs.layer_costs import layer_costs
from kfacperf.sim.graphs.strategies import build_graph, make_step, parse_strategy
from kfacperf.sim.graphs.strategies.common import CommSettings, StepSpec
from kfacperf.sim.prediction import load_prediction, write_prediction
from kfacperf.sim.sweep import simulate, simulate_with_costs
from kfacperf.trace.intervals import intersection_length, merge_intervals, total_length
from kfacperf.trace.schema import EVENT_COLUMNS, check_events
from kfacperf.vocab import FACTOR_STEP, INVERSE_STEP, PLAIN_STEP

WL = table_workload("toy", [(28, 16), (145, 32), (289, 64), (65, 10)], other_params=1000)
TIMES = [{S.FORWARD: 20.0 + 10 * i, S.BACKWARD: 40.0 + 15 * i, S.FACTOR_COMPUTE: 8.0 + i,
          S.INVERSE: 30.0 * (i + 1) ** 2, S.PRECONDITION: 6.0 + 2 * i} for i in range(4)]
COMM = CommSettings(factor_bucket_mb=0.05, ddp_bucket_mb=0.05, ddp_first_bucket_mb=0.05)


def model(**whole: float):
    return fake_model(WL, TIMES, {S.UPDATE: 25.0, **whole})


def run_fake(**kw):
    args = dict(gpus_per_node=4, strategies=["sgd", "spngd", "kaisa"], gpus=[1, 2, 8, 16],
                batch_per_gpu=8, factor_interval=2, inverse_interval=6, comm=COMM)
    args.update(kw)
    return simulate_with_costs(WL, model(), **args)


def test_layer_costs_rescale_layer_shares_to_the_whole_model():
    m = model(forward=300.0, backward=0.0)  # whole forward > sum of layers (other work)
    lc = layer_costs(m, WL, batch=8)
    fwd = [t[S.FORWARD] for t in TIMES]
    assert sum(lc.fwd) == pytest.approx(300.0)
    assert lc.fwd == pytest.approx(tuple(300.0 * f / sum(fwd) for f in fwd))
    assert sum(lc.bwd) == 0.0
    assert lc.inverse == tuple(t[S.INVERSE] for t in TIMES) and lc.update == 25.0
    assert lc.other_params == 1000 and lc.dim_a == (28, 145, 289, 65)
    with pytest.raises(ValueError, match="positive integer"):
        layer_costs(m, WL, batch=0)


def test_steady_state_is_the_mean_over_every_step_of_a_cycle():
    f_int, i_int = 2, 6
    pred = run_fake(factor_interval=f_int, inverse_interval=i_int, gpus=[8])
    lc = layer_costs(model(), WL, batch=8)
    for strategy in ("spngd", "kaisa"):
        times = []
        for k in range(i_int):  # every step of a cycle, its kind from the step number
            kind = INVERSE_STEP if k % i_int == 0 else FACTOR_STEP if k % f_int == 0 else PLAIN_STEP
            spec = StepSpec(costs=lc, world_size=8, gpus_per_node=4, kind=kind, comm=COMM)
            times.append(run_step(build_graph(make_step(parse_strategy(strategy), spec),
                                              fake_collective_us)).step_us)
        row = pred.summary.set_index("strategy").loc[strategy]
        assert row.step_us == pytest.approx(sum(times) / i_int, rel=1e-12)
        assert row.inverse_step_us == pytest.approx(times[0])
        assert row.plain_step_us == pytest.approx(times[1])
        assert row.factor_step_us == pytest.approx(times[2])
    assert pred.meta["step_kinds"] == [{"kind": "inverse", "step": 0, "weight": 1},
                                       {"kind": "plain", "step": 1, "weight": 3},
                                       {"kind": "factor", "step": 2, "weight": 2}]


def test_summary_ratios_and_limits():
    pred = run_fake(gpus=[2, 8, 16])  # no 1: the scaling baseline is simulated anyway
    s = pred.summary.set_index(["strategy", "gpus"])
    one = run_fake(gpus=[1]).summary.set_index("strategy")
    for (strategy, p), row in s.iterrows():
        assert row.kfac_overhead == pytest.approx(row.step_us / s.loc[("sgd", p)].step_us)
        assert row.scaling_efficiency == pytest.approx(one.loc[strategy].step_us / row.step_us)
        assert 0 <= row.exposed_comm_us <= row.comm_us
    assert (one.comm_us == 0).all() and (one.exposed_comm_us == 0).all()
    assert one.loc["spngd"].step_us == pytest.approx(one.loc["kaisa"].step_us)  # both local
    no_sgd = run_fake(strategies=["spngd"], gpus=[2]).summary
    assert math.isnan(no_sgd.kfac_overhead.iloc[0])


def test_slower_network_never_speeds_a_step_up():
    base = simulate("resnet20", "h100", "dgx-h100-ndr", ["sgd", "spngd", "kaisa"],
                    gpus=[1, 8, 64], batch_per_gpu=32, events=False)
    slow = simulate("resnet20", "h100", "dgx-h100-ndr", ["sgd", "spngd", "kaisa"],
                    gpus=[1, 8, 64], batch_per_gpu=32, events=False, bandwidth_scale=0.25)
    b, s = (base.summary.set_index(["strategy", "gpus"]),
            slow.summary.set_index(["strategy", "gpus"]))
    assert (s.step_us >= b.step_us - 1e-9).all()
    assert (s.comm_us.loc[(slice(None), [8, 64])] > b.comm_us.loc[(slice(None), [8, 64])]).all()
    assert (s.loc[(slice(None), 1), "step_us"] == b.loc[(slice(None), 1), "step_us"]).all()
    assert slow.meta["overrides"] == {"bandwidth_scale": 0.25}


def test_a_cluster_straggler_makes_synchronised_steps_wait_not_communicate_longer():
    from dataclasses import replace

    from kfacperf.sim.models import load_cluster
    from kfacperf.sim.models.host import HostModel

    args = dict(gpus=[1, 8, 64], batch_per_gpu=32, events=False)
    cluster = load_cluster("dgx-h100-ndr")
    base = simulate("resnet20", "h100", cluster, ["sgd", "spngd"], **args)
    uneven = simulate("resnet20", "h100",
                      replace(cluster, host=HostModel(cores_per_node=0, straggler=0.05)),
                      ["sgd", "spngd"], **args)
    b, u = (base.summary.set_index(["strategy", "gpus"]),
            uneven.summary.set_index(["strategy", "gpus"]))
    many = (slice(None), [8, 64])
    assert (u.loc[many, "step_us"] > b.loc[many, "step_us"]).all()
    assert (u.loc[(slice(None), 1), "step_us"] == b.loc[(slice(None), 1), "step_us"]).all()
    assert u.comm_us.values == pytest.approx(b.comm_us.values)  # the wait is no collective's


def test_events_agree_with_the_summary_and_the_trace_schema():
    pred = run_fake(factor_interval=1, inverse_interval=1, gpus=[8])
    ev = pred.events
    check_events(ev[list(EVENT_COLUMNS)], "prediction events")
    assert set(ev["stage"].astype(str)) <= set(S.STAGE_NAMES)
    for strategy, g in ev.groupby("strategy", observed=True):
        row = pred.summary.set_index("strategy").loc[strategy]
        steps = g[g["stage"] == S.STEP]
        # the rank the step waits for: of those ending last, the one computing most
        last = steps[steps["dur_us"] >= steps["dur_us"].max() * (1 - 1e-12)]["rank"]
        busy = g[(g["lane"].astype(str) == S.COMPUTE) & g["rank"].isin(last)].groupby(
            "rank")["dur_us"].sum()
        slow = busy.idxmax()
        assert steps["dur_us"].max() == pytest.approx(row.step_us)
        mine = g[(g["rank"] == slow) & (g["stage"] != S.STEP)]
        lane = mine["lane"].astype(str)
        start = mine["start_us"].to_numpy()
        end = start + mine["dur_us"].to_numpy()
        comp = merge_intervals(start[lane == S.COMPUTE], end[lane == S.COMPUTE])
        comm = merge_intervals(start[lane == S.COMM], end[lane == S.COMM])
        # the trace summary's interval arithmetic, applied to the simulated rank
        assert total_length(comp) == pytest.approx(row.compute_us)
        assert total_length(comm) == pytest.approx(row.comm_us)
        assert total_length(comm) - intersection_length(comm, comp) == pytest.approx(
            row.exposed_comm_us)
        st = pred.stage_times[(pred.stage_times["strategy"] == strategy)]
        per_stage = mine.groupby(mine["stage"].astype(str))["dur_us"].sum()
        got = st[st["stage"] != S.STEP].groupby("stage")["time_us"].sum()
        pd.testing.assert_series_equal(got.sort_index(), per_stage[per_stage.index.isin(got.index)]
                                       .sort_index(), check_names=False)


def test_events_lay_the_kinds_of_step_end_to_end():
    pred = run_fake(strategies=["kaisa"], gpus=[2], factor_interval=2, inverse_interval=6)
    ev = pred.events
    steps = ev[ev["stage"] == S.STEP].groupby("step")["dur_us"].max()
    assert list(steps.index) == [0, 1, 2]
    first = ev.groupby("step")["start_us"].min()
    assert first.loc[1] == pytest.approx(steps.loc[0])
    assert first.loc[2] == pytest.approx(steps.loc[0] + steps.loc[1])


def test_prediction_round_trip_and_load_errors(tmp_path):
    pred = run_fake(gpus=[2, 4])
    out = write_prediction(pred, tmp_path / "p")
    back = load_prediction(out)
    pd.testing.assert_frame_equal(back.summary, pred.summary)
    pd.testing.assert_frame_equal(back.stage_times, pred.stage_times)
    assert len(back.events) == len(pred.events) and back.classes is not None
    assert back.meta["gpus"] == [2, 4] and back.meta["intervals"] == {"factor": 2, "inverse": 6}
    (out / "stage_times.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="stage_times.parquet"):
        load_prediction(out)
    pred.summary.drop(columns=["step_us"]).to_parquet(tmp_path / "s.parquet")
    with pytest.raises(ValueError, match="step_us"):
        write_prediction(type(pred)(pred.meta, pred.summary.drop(columns=["step_us"]),
                                    pred.stage_times, pred.events), tmp_path / "q")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_prediction(tmp_path / "missing")


@pytest.mark.parametrize("kwargs,message", [
    ({"gpus": [0]}, "positive integer"),
    ({"gpus": [2, -4]}, "positive integer"),
    ({"strategies": ["sgd", "adam"]}, "unknown strategy"),
    ({"strategies": ["kaisa:0.25"], "gpus": [6]}, "must be an integer dividing 6"),
    ({"strategies": ["sgd", "kaisa:1/8"], "gpus": [1, 2, 4, 8, 12, 16]},
     "kaisa:1/8 (f = 0.125) gives no whole number of gradient workers dividing the GPUs at "
     "1, 2, 4, 12 GPU(s)"),
    ({"strategies": ["kaisa:1/8"], "gpus": [1, 2, 4, 8]}, "(the first here is 8)"),
    ({"strategies": ["kaisa", "kaisa"]}, "given twice"),
    ({"strategies": ["kaisa:0.5", "kaisa:1/2"], "gpus": [2]},
     "given twice: kaisa:0.5 and kaisa:1/2"),
    ({"strategies": ["kaisa:0", "kaisa:mem-opt"]}, "given twice"),
    ({"gpus": "8"}, "must be a list of integers"),
    ({"factor_interval": 4, "inverse_interval": 6}, "multiple of factor_interval"),
    ({"factor_interval": 0}, "positive integer"),
    ({"batch_per_gpu": 0}, "positive integer"),
])
def test_impossible_inputs_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        run_fake(**kwargs)


def test_a_bucket_of_zero_bytes_is_refused_as_the_command_line_refuses_it():
    for key in ("factor_bucket_mb", "ddp_bucket_mb"):
        with pytest.raises(ValueError, match=f"{key} must be above 0"):
            CommSettings(**{key: 0})


def test_one_gpu_count_may_be_given_alone():
    pd.testing.assert_frame_equal(run_fake(gpus=8).summary, run_fake(gpus=[8]).summary)


def test_parse_gpus():
    assert parse_gpus("1-4096") == [2**i for i in range(13)]
    assert parse_gpus("1,2,4,...,64") == [1, 2, 4, 8, 16, 32, 64]
    assert parse_gpus("3,6,...,48,5") == [3, 5, 6, 12, 24, 48]
    assert parse_gpus("8") == [8]
    for bad, message in (("0", ">= 1"), ("2-1", "ends below"), ("1,...,8", "two counts"),
                         ("x", "whole number"), ("", "no GPU")):
        with pytest.raises(ValueError, match=message):
            parse_gpus(bad)


@pytest.mark.parametrize("text, message", [
    # a progression never passes its end, and its end must be one of its terms
    ("1,2,4,...,3", "must end above 4, got 3"),
    ("1,2,4,...,5", "its last term below 5 is 4 (the next is 8)"),
    ("1,2,4,...,48", "its last term below 48 is 32 (the next is 64)"),
    ("3,9,...,100", "its last term below 100 is 81"),
    # negative and zero counts say so (not "'' is not a whole number")
    ("-4", "a GPU count must be >= 1, got -4"),
    ("8,-4", "a GPU count must be >= 1, got -4"),
    ("0-8", "a GPU count must be >= 1, got 0"),
    ("4_0", "'4_0' is not a whole number"),
    # a range doubles from its start and must hit its end (3-100 silently stopped at 96)
    ("3-100", "range 3-100 doubles from 3 and never hits 100: end it at 96 or 192"),
    ("1-1000", "end it at 512 or 1024"),
])
def test_parse_gpus_refuses_an_end_off_the_progression_and_negative_counts(text, message):
    with pytest.raises(ValueError, match=re.escape(f"--gpus {text!r}: ") + ".*"
                       + re.escape(message)):
        parse_gpus(text)


def test_parse_gpus_progressions_that_reach_their_end():
    assert parse_gpus("1,2,4,...,8") == [1, 2, 4, 8]
    assert parse_gpus("3,9,...,243") == [3, 9, 27, 81, 243]
    assert parse_gpus("1-4,...,32") == [1, 2, 4, 8, 16, 32]
    assert parse_gpus("3-96") == [3, 6, 12, 24, 48, 96]
    assert parse_gpus("5-5") == [5]


@pytest.mark.parametrize("command", ["simulate", "plan"])
def test_gpus_errors_on_the_command_line(capsys, command):
    from kfacperf.cli import main

    argv = [command, "--workload", "mlp", "--device", "h100", "--cluster", "dgx-h100-ndr",
            "--gpus", "1,2,4,...,5"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"kfacperf {command}: error: --gpus '1,2,4,...,5': 5 is not a term "
                           "of the progression 2, 4, ... (times 2); its last term below 5 is 4 "
                           "(the next is 8): end it at 4 or 8")


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    from kfacperf.cli import main

    rc = main(["simulate", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_table_json_and_files(tmp_path, capsys):
    common = ["--workload", "resnet20", "--device", "h100", "--cluster", "dgx-h100-ndr",
              "--strategy", "sgd,spngd,kaisa:mem-opt", "--gpus", "1-16", "--batch-per-gpu", "16",
              "--factor-interval", "10", "--inverse-interval", "100"]
    out = tmp_path / "pred"
    rc, stdout, stderr = _cli(capsys, *common, "--out", str(out))
    assert rc == 0, stderr
    assert "kaisa:mem-opt" in stdout and "prediction written" in stdout
    pred = load_prediction(out)
    assert len(pred.summary) == 15 and pred.meta["workload"] == "resnet20"
    assert pred.meta["command"].startswith("kfacperf simulate")
    rc, stdout, stderr = _cli(capsys, *common, "--json", "--no-events", "--bandwidth-scale", "0.5")
    assert rc == 0, stderr
    rows = json.loads(stdout)
    assert [row["gpus"] for row in rows[:5]] == [1, 2, 4, 8, 16]
    assert rows[0]["kfac_overhead"] == 1.0 and rows[5]["strategy"] == "spngd"
    assert rows[-1]["grad_worker_fraction"] == pytest.approx(1 / 16)


def test_cli_fisher_blocks_and_mc(capsys):
    common = ["--workload", "resnet20", "--device", "h100", "--cluster", "dgx-h100-ndr",
              "--strategy", "sgd,spngd", "--gpus", "1", "--json", "--no-events"]
    rows = {}
    for extra in ((), ("--bn-blocks", "unit"), ("--bn-blocks", "unit", "--fisher", "mc")):
        rc, stdout, stderr = _cli(capsys, *common, *extra)
        assert rc == 0, stderr
        rows[extra] = {r["strategy"]: r["step_us"] for r in json.loads(stdout)}
    plain, unit, mc = rows.values()
    assert plain["sgd"] == unit["sgd"] == mc["sgd"]  # no Fisher blocks, no factor steps
    assert plain["spngd"] < unit["spngd"] < mc["spngd"]
    rc, _, stderr = _cli(capsys, "--workload", "mlp", "--device", "h100", "--cluster",
                         "dgx-h100-ndr", "--gpus", "1", "--bn-blocks", "full")
    assert rc == 2 and "has no batchnorm layers" in stderr and stderr.count("\n") == 1


def test_cli_never_imports_torch():
    code = ("import sys; from kfacperf.cli import main; "
            "rc = main(['simulate', '--workload', 'resnet20', '--device', 'h100', '--cluster', "
            "'dgx-h100-ndr', '--gpus', '1-4', '--json']); "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("args,message", [
    (["--gpus", "0"], "must be >= 1"),
    (["--strategy", "sgd,lamb"], "unknown strategy"),
    (["--strategy", "kaisa:0.25", "--gpus", "6"], "dividing 6"),
    (["--workload", "nope.toml"], "does not exist"),
    (["--bandwidth-scale", "0"], "must be a number from 1e-06"),
])
def test_cli_errors_are_one_line(args, message, capsys):
    base = {"--workload": "resnet20", "--device": "h100", "--cluster": "dgx-h100-ndr",
            "--gpus": "1-4"}
    flags = dict(zip(args[::2], args[1::2]))
    rc, _, stderr = _cli(capsys, *[x for k, v in {**base, **flags}.items() for x in (k, v)])
    assert rc == 2
    assert message in stderr and "Traceback" not in stderr and stderr.count("\n") == 1


@pytest.mark.parametrize("flag", ["--workload", "--device", "--cluster"])
def test_a_model_path_that_is_a_directory_says_so(tmp_path, capsys, flag):
    base = {"--workload": "resnet20", "--device": "h100", "--cluster": "dgx-h100-ndr",
            "--gpus": "1"}
    rc, _, stderr = _cli(capsys, *[x for k, v in {**base, flag: str(tmp_path)}.items()
                                   for x in (k, v)])
    assert rc == 2 and stderr.count("\n") == 1
    noun = flag[2:]
    assert (f"{noun} model file {tmp_path} is a directory, not a file; give the path of a "
            f"{noun} model .toml") \
        in stderr and "does not exist" not in stderr


def test_threads_per_rank_errors_name_the_flag(capsys):
    from kfacperf.cli import main

    with pytest.raises(SystemExit) as exc:  # argparse refuses it, before any work
        main(["simulate", "--workload", "mlp", "--device", "h100", "--cluster", "dgx-h100-ndr",
              "--gpus", "1", "--threads-per-rank", "0"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == ("kfacperf simulate: error: argument --threads-per-rank: "
                                    "must be a whole number >= 1, got 0")
    assert "ranks_per_node" not in err


def test_the_summary_describes_the_rank_the_others_wait_for():
    """SP-NGD on 2 GPUs with contiguous placement: one rank owns nearly every large inverse
    and the other waits for it in the closing collective, so both end together.  The
    summary (and stage times) must be the busy rank's: its compute plus exposed
    communication is the step, and its inverse is the larger of the two ranks'."""
    pred = simulate("resnet50", "v100", "abci-v100", ["spngd"], [2], placement="contiguous",
                    events=True)
    row = pred.summary.iloc[0]
    assert row["compute_us"] + row["exposed_comm_us"] == pytest.approx(row["step_us"], rel=0.01)
    ev = pred.events
    inverse = ev[ev["stage"] == S.INVERSE].groupby("rank")["dur_us"].sum()
    assert len(inverse) == 2 and inverse.max() > 5 * inverse.min()
    stages = pred.stage_times
    assert stages[stages["stage"] == S.INVERSE]["time_us"].sum() == pytest.approx(
        inverse.max(), rel=1e-6)
