"""kfacperf.validation: measured-window arithmetic, exact recovery of synthetic runs, no leaks."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import pandas as pd
import pytest

from kfacperf import vocab as S
from kfacperf.calibrate.device import base_device_for
from kfacperf.sim.models.cluster import OPS, ClusterModel, Tier
from kfacperf.sim.models.device import StageEfficiency
from kfacperf.sim.models.host import HostModel
from kfacperf.sim.summary import cycle
from kfacperf.sim.sweep import simulate
from kfacperf.trace.store import load_trace, write_trace
from kfacperf.validation import (
    calibrate,
    check_disjoint,
    measure,
    predict,
    run_step_kind,
    validate,
    weighted,
)

CPU = {"kind": "cpu", "name": "test cpu"}


def run_json(name: str, *, strategy: str, world: int, batch: int, fi: int = 1, ii: int = 1,
             steps: int = 6, warmup: int = 2, workload: str = "mlp", **extra) -> dict:
    run = {
        "workload": workload, "workload_options": {},
        "optimizer": "sgd" if strategy == "sgd" else "kfac", "strategy": strategy,
        "grad_worker_fraction": 1.0, "factor_interval": fi, "inverse_interval": ii,
        "damping": 1e-3, "inverse_method": "eigen", "world_size": world, "batch_per_rank": batch,
        "steps": steps, "warmup": warmup, "device": CPU, "threads_per_rank": 1,
        "comm_dtype": "fp32", "symmetric": False, "bucket_cap_mb": 25.0, "fused": False,
        "command": f"synthetic {name}", "start_time": f"2026-01-01T00:00:00 {name}",
        "completed": True,
    }
    run.update(extra)
    return run


# ------------------------------------------------------------------ synthetic "truth"
def truth_models() -> tuple:
    """A device (nominal CPU peaks, assumed efficiencies) and a 2-core node with contention."""
    base = base_device_for({"device": CPU, "threads_per_rank": 1})
    eff = {"forward": 0.3, "backward": 0.25, "factor_compute": 0.2, "inverse": 0.05,
           "precondition": 0.1, "update": 0.02}
    # forward and backward are fitted as whole passes (no per-call overhead), which splits
    # them over the layers as the truth does only if the truth has none: the split decides
    # when a layer's hook sends its factor bucket
    stages = {k: StageEfficiency(efficiency=e, mem_efficiency=1.0,
                                overhead_us=0.0 if k in ("forward", "backward") else 20.0,
                                assumed=True) for k, e in eff.items()}
    from dataclasses import replace

    # factor steps' forward/backward slower besides the statistics (the hooks' own cost)
    device = replace(base, name="truth", stages=stages,
                     capture_overhead={"forward": 0.1, "backward": 0.25})
    algos = {"all_reduce": "ring", "reduce_scatter": "ring", "all_gather": "ring",
             "broadcast": "tree"}
    tier = Tier(alpha_us=80.0, bandwidth_GBps=1.5, algorithms=algos)
    cluster = ClusterModel(name="truth-node", gpus_per_node=64, intra=tier, inter=tier,
                           multi_node={op: "flat" for op in OPS},
                           host=HostModel(cores_per_node=2, contention=0.12))
    return device, cluster


def synth_trace(root: Path, name: str, *, scale: float = 1.0, model=None, **kw) -> Path:
    """A trace whose every step is the simulator's step of that kind (on the truth models),
    every rank of a symmetry class given its representative's events; times x ``scale``.
    ``model``: a user's workload model (run.json names it, the trace carries it) instead of
    mlp; ``fisher``/``bn_blocks`` in ``kw`` are simulated and recorded."""
    device, cluster = truth_models()
    if model is not None:
        kw = {"workload": model.workload, "workload_fingerprint": model.fingerprint, **kw}
    run = run_json(f"{root.name}-{name}", **kw)
    spec = "sgd" if kw["strategy"] == "sgd" else kw["strategy"]
    fisher = {k: kw[k] for k in ("fisher", "bn_blocks") if k in kw}
    pred = simulate(model if model is not None else "mlp", device, cluster, [spec],
                    gpus=[run["world_size"]], batch_per_gpu=run["batch_per_rank"],
                    factor_interval=run["factor_interval"],
                    inverse_interval=run["inverse_interval"], **fisher)
    ev = pred.events.drop(columns=["strategy", "gpus"]).copy()
    for col in ("stage", "layer", "lane"):
        ev[col] = ev[col].astype(str)
    # classes -> ranks: a class of n ranks stands for n ranks with identical events
    blocks: dict[int, pd.DataFrame] = {}
    for cs in cycle(run["factor_interval"], run["inverse_interval"], kfac=spec != "sgd"):
        part = ev[ev["step"] == cs.step]
        cls = pred.classes[pred.classes["step"] == cs.step]
        reps = sorted(zip(cls["rank"], cls["ranks"]))
        free = iter(r for r in range(run["world_size"]) if r not in {r for r, _ in reps})
        frames = []
        for rep, n in reps:
            mine = part[part["rank"] == rep]
            frames.append(mine)
            for _ in range(n - 1):
                frames.append(mine.assign(rank=next(free)))
        blk = pd.concat(frames)
        blk = blk.assign(
            start_us=blk["start_us"] - blk.loc[blk["stage"] == S.STEP, "start_us"].min())
        blocks[cs.kind.name] = blk
    rows, t = [], 0.0
    for k in range(run["warmup"] + run["steps"]):
        blk = blocks[run_step_kind(k, run)]
        rows.append(blk.assign(step=k, start_us=(blk["start_us"] + t) * scale,
                               dur_us=blk["dur_us"] * scale))
        t += float(blk.loc[blk["stage"] == S.STEP, "dur_us"].max())
    events = pd.concat(rows, ignore_index=True)
    out = write_trace(root / name, run=run, events={c: events[c].tolist() for c in events})
    if model is not None:
        from kfacperf.sim.models import save_workload_model
        from kfacperf.trace.schema import WORKLOAD_FILE

        save_workload_model(model, out / WORKLOAD_FILE)
    return out


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("synth")
    out = {}
    for p in (1, 2):
        for b in (16, 64):
            out[f"sgd-p{p}-b{b}"] = synth_trace(root / f"p{p}", f"sgd-b{b}", strategy="sgd",
                                                world=p, batch=b)
            for s in ("spngd", "kaisa"):
                out[f"{s}-p{p}-b{b}-i1"] = synth_trace(root / f"p{p}", f"{s}-b{b}-i1", strategy=s,
                                                       world=p, batch=b)
                out[f"{s}-p{p}-b{b}-i10"] = synth_trace(root / f"p{p}", f"{s}-b{b}-i10",
                                                        strategy=s, world=p, batch=b, fi=10,
                                                        ii=100, steps=22, warmup=3)
    out["p1"], out["p2"] = root / "p1", root / "p2"
    out["root"] = root
    return out


def test_synthetic_runs_are_predicted_exactly(synth) -> None:
    """Calibrated on the 1-process runs and told the truth's cluster, the prediction of every
    2-process run (whose steps are the truth model's) is exact, per run and per stage."""
    _, cluster = truth_models()
    res = validate([synth["p1"]], [synth["p2"]], cluster=cluster)
    assert len(res.runs) == 10 and set(res.runs["world_size"]) == {2}
    # percent (calibration keeps 6 significant digits)
    assert res.runs["error_pct"].abs().max() < 1e-3
    assert res.median_abs_error_pct < 1e-3 and res.worst_abs_error_pct < 1e-3
    st = res.stages
    assert {S.FORWARD, S.BACKWARD, S.FACTOR_COMPUTE, S.INVERSE, S.GRAD_COMM, S.FACTOR_COMM,
            S.PRECOND_COMM} <= set(st["stage"])
    nonzero = st[st["measured_us"] > 0]
    assert (nonzero["error_pct"].abs() < 1e-3).all(), nonzero
    # 10/100 runs: 22 measured steps from step 3: steps 10, 20 are factor steps, no inverse
    row = res.runs.set_index("run").loc["spngd-b16-i10"]
    assert row["steps"] == 22 and row["intervals"] == "10/100"
    inv = st[(st["run"] == "spngd-b16-i10") & (st["stage"] == S.INVERSE)]
    assert inv.empty or float(inv["measured_us"].iloc[0]) == 0.0


def test_calibration_recovers_the_capture_overhead(synth) -> None:
    """Forward/backward of factor steps are 1.1x/1.25x the plain ones in the synthetic runs:
    the 1-process runs with both kinds of step give exactly that back."""
    cal = calibrate([synth["p1"]], cluster=truth_models()[1])
    assert cal.device.capture_overhead == pytest.approx({"forward": 0.1, "backward": 0.25},
                                                        rel=1e-3)
    assert any("25.0% slower on factor steps" in n for n in cal.fit.notes)
    sgd_only = calibrate([synth["p1"] / "sgd-b16", synth["p1"] / "sgd-b64"],
                         cluster=truth_models()[1])
    assert sgd_only.device.capture_overhead == {}


def test_prediction_takes_fisher_blocks_and_fisher_from_run_json(synth) -> None:
    """A run recorded with bn_blocks/fisher is simulated with them; one recorded before they
    existed (no keys) as with the defaults."""
    _, cluster = truth_models()
    cal = calibrate([synth["p1"]], cluster=cluster)
    base = run_json("r", strategy="spngd", world=2, batch=16, workload="resnet20")
    old = {k: v for k, v in base.items() if k not in ("bn_blocks", "fisher")}
    for options in ({}, {"bn_blocks": "unit"}, {"bn_blocks": "full", "fisher": "mc"}):
        got = predict(base | options, cal)
        want = simulate("resnet20", cal.device, cluster, ["spngd"], gpus=[2], batch_per_gpu=16,
                        threads_per_rank=1, **options).summary.iloc[0]
        assert got.step_us["inverse"] == pytest.approx(float(want["inverse_step_us"]),
                                                       rel=1e-12), options
    assert predict(old, cal).step_us == predict(base | {"bn_blocks": "none"}, cal).step_us
    # mc: the capturing backward (1.25x, the truth's capture overhead) and a plain one
    mc = predict(base | {"fisher": "mc"}, cal).stage_us["inverse"][S.BACKWARD]
    assert mc / predict(base, cal).stage_us["inverse"][S.BACKWARD] == pytest.approx(
        2.25 / 1.25, rel=1e-3)


def test_measured_times_scaled_give_the_closed_form_error(synth, tmp_path) -> None:
    _, cluster = truth_models()
    slow = synth_trace(tmp_path, "slow", scale=1.25, strategy="spngd", world=2, batch=16)
    res = validate([synth["p1"]], [slow], cluster=cluster)
    assert res.runs["error_pct"].iloc[0] == pytest.approx((1 / 1.25 - 1) * 100, rel=1e-5)
    fwd = res.stages[res.stages["stage"] == S.FORWARD].iloc[0]
    assert fwd["error_pct"] == pytest.approx(-20.0, rel=1e-5)


def test_wrong_contention_shows_in_compute_stages_not_comm(synth) -> None:
    """Predicting with a cluster that says ranks do not slow each other down underestimates
    2-process compute by exactly the truth's slowdown (1 + 0.12) and leaves comm alone."""
    from dataclasses import replace

    _, cluster = truth_models()
    res = validate([synth["p1"]], [synth["p2"] / "sgd-b64"],
                   cluster=replace(cluster, host=replace(cluster.host, contention=0.0)))
    st = res.stages.set_index("stage")
    assert st.loc[S.FORWARD, "error_pct"] == pytest.approx((1 / 1.12 - 1) * 100, rel=1e-5)
    assert st.loc[S.GRAD_COMM, "error_pct"] == pytest.approx(0.0, abs=1e-9)
    assert res.runs["error_pct"].iloc[0] < -5


def test_recordings_of_one_configuration_are_pooled(synth, tmp_path) -> None:
    """Two recordings of one configuration (1.2x and 1.0x the truth, different lengths) are one
    held-out run measured at their mean, 1.1x: the error and spread follow in closed form; a
    different configuration named alike is not pooled with them."""
    _, cluster = truth_models()
    rec = tmp_path / "rec"
    synth_trace(rec, "spngd-b16-r1", scale=1.2, strategy="spngd", world=2, batch=16)
    synth_trace(rec, "spngd-b16-r2", scale=1.0, strategy="spngd", world=2, batch=16, steps=9)
    synth_trace(rec, "spngd-b64-r1", scale=1.0, strategy="spngd", world=2, batch=64)
    res = validate([synth["p1"]], [rec], cluster=cluster)
    runs = res.runs.set_index("run")
    assert list(runs.index) == ["spngd-b16", "spngd-b64"]
    pooled = runs.loc["spngd-b16"]
    assert pooled["recordings"] == 2 and pooled["steps"] == 6 + 9
    assert pooled["error_pct"] == pytest.approx((1 / 1.1 - 1) * 100, rel=1e-5)
    assert pooled["spread_pct"] == pytest.approx(0.2 / 1.1 * 100, rel=1e-6)
    assert pooled["trace"].count("spngd-b16-r") == 2
    fwd = res.stages[(res.stages["run"] == "spngd-b16") & (res.stages["stage"] == S.FORWARD)]
    assert float(fwd["error_pct"].iloc[0]) == pytest.approx((1 / 1.1 - 1) * 100, rel=1e-5)
    single = runs.loc["spngd-b64"]
    assert single["recordings"] == 1 and single["spread_pct"] == 0.0
    assert abs(single["error_pct"]) < 1e-3


def _user_models() -> tuple:
    """Two user models of one name (``model.py:build`` in two folders, other files): the mlp,
    and a narrow network whose layers have the mlp's names."""
    from dataclasses import replace

    from kfacperf.sim.models import load_workload
    from kfacperf.sim.models.workload import LayerModel

    mlp = load_workload("mlp")
    wide = replace(mlp, name="model.py:build", workload="/projA/model.py:build",
                   fingerprint="a" * 64)

    def lin(name: str, n_in: int, n_out: int) -> LayerModel:
        return LayerModel(name=name, kind="linear", dim_a=n_in + 1, dim_g=n_out,
                          params=(n_in + 1) * n_out, rows_per_example=1,
                          fwd_flops_per_example=2.0 * n_in * n_out, in_elems_per_example=n_in,
                          out_elems_per_example=n_out)

    narrow = replace(wide, workload="/projB/model.py:build", fingerprint="b" * 64,
                     layers=(lin("net.0", 784, 24), lin("net.2", 24, 16), lin("net.4", 16, 10)))
    return wide, narrow


@pytest.fixture(scope="module")
def user_runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("user")
    wide, narrow = _user_models()
    return {
        "A-p1": synth_trace(root, "A-p1", model=wide, strategy="spngd", world=1, batch=16),
        "B-p1": synth_trace(root, "B-p1", model=narrow, strategy="spngd", world=1, batch=16),
        "B-p2": synth_trace(root, "B-p2", model=narrow, strategy="spngd", world=2, batch=16),
    }


def test_another_user_model_of_the_same_name_is_not_priced_with_its_times(user_runs) -> None:
    """Calibrated on model A, a held-out run of model B (same FILE.py:FUNC name, another
    file) is predicted from the fitted efficiencies alone, as the note says: exactly what the
    calibration predicts without any [[measured]] time.  Calibrated on A and B, B's measured
    times price B alone: the compute stages are those of a calibration on B only."""
    from dataclasses import replace

    _, cluster = truth_models()
    res = validate([user_runs["A-p1"]], [user_runs["B-p2"]], cluster=cluster)
    cal = res.calibration
    assert cal.device.measured
    bare = replace(cal, device=replace(cal.device, measured=()),
                   workload_search=(str(user_runs["B-p2"] / "workload.toml"),))
    run = load_trace(user_runs["B-p2"]).run
    want = weighted(predict(run, bare).step_us, {"inverse": 1})
    assert res.runs["predicted_step_us"].iloc[0] == pytest.approx(want, rel=1e-12)
    assert {m.fingerprint for m in cal.device.measured} == {"a" * 64}
    [note] = [n for n in res.notes if "not in the calibration runs" in n]
    assert "is another model" in note and "bbbbbbbbbbbb" in note
    assert "from the fitted efficiencies alone" in note
    # calibrated on both: B's compute stages are B's measurements, not the mean with A's
    both = validate([user_runs["A-p1"], user_runs["B-p1"]], [user_runs["B-p2"]], cluster=cluster)
    alone = validate([user_runs["B-p1"]], [user_runs["B-p2"]], cluster=cluster)
    assert not [n for n in both.notes if "not in the calibration runs" in n]
    for stage in (S.FORWARD, S.FACTOR_COMPUTE, S.INVERSE, S.PRECONDITION):
        got = both.stages.set_index("stage").loc[stage, "predicted_us"]
        ref = alone.stages.set_index("stage").loc[stage, "predicted_us"]
        assert got == pytest.approx(ref, rel=1e-9), stage
    assert abs(alone.runs["error_pct"].iloc[0]) < 0.05  # B's own times: near the truth


def test_only_identical_configurations_are_pooled_whatever_the_order(synth, tmp_path) -> None:
    """A plain and a Monte-Carlo-Fisher run of one shape are two held-out runs, each
    predicted exactly as alone, in either order; so are two user models of one name."""
    _, cluster = truth_models()
    plain = synth["p2"] / "spngd-b16-i1"
    mc = synth_trace(tmp_path, "spngd-b16-i1-mc", strategy="spngd", world=2, batch=16,
                     fisher="mc")
    runs = []
    for order in ([plain, mc], [mc, plain]):
        res = validate([synth["p1"]], order, cluster=cluster)
        assert len(res.runs) == 2 and set(res.runs["recordings"]) == {1}
        assert res.runs["error_pct"].abs().max() < 1e-3
        runs.append(res.runs.set_index("run").sort_index()[
            ["predicted_step_us", "measured_step_us"]])
    pd.testing.assert_frame_equal(runs[0], runs[1])
    wide, narrow = _user_models()
    a = synth_trace(tmp_path / "u", "mine-r1", model=wide, strategy="spngd", world=2, batch=16)
    b = synth_trace(tmp_path / "u", "mine-r2", model=narrow, strategy="spngd", world=2, batch=16)
    res = validate([synth["p1"]], [a, b], cluster=cluster)
    assert sorted(res.runs["run"]) == ["mine-r1", "mine-r2"]


def test_configuration_key_takes_fisher_options_and_the_workload_identity(synth) -> None:
    """Old traces (no bn_blocks/fisher) are the defaults' configuration; other blocks, another
    estimator or another fingerprint are another configuration."""
    from dataclasses import replace

    from kfacperf.validation.pooling import configuration_key

    t = load_trace(synth["p2"] / "spngd-b16-i1")
    old = replace(t, run={k: v for k, v in t.run.items() if k not in ("bn_blocks", "fisher")})
    explicit = replace(t, run=t.run | {"bn_blocks": "none", "fisher": "emp"})
    assert configuration_key(old) == configuration_key(explicit)
    for change in ({"bn_blocks": "unit"}, {"fisher": "mc"}, {"workload_fingerprint": "f" * 64},
                   {"workload_options": {"hidden": [64]}}):
        assert configuration_key(replace(t, run=t.run | change)) != configuration_key(t), change


def test_a_trace_given_twice_counts_once(synth, tmp_path) -> None:
    """The same directory twice (or itself and its folder) is one trace, for calibration and
    held out; two copies of one recorded run are an error naming both."""
    _, cluster = truth_models()
    one = synth["p2"] / "sgd-b16"
    res = validate([synth["p1"], synth["p1"] / "sgd-b16"],
                   [one, one, synth["p2"] / "." / "sgd-b16"], cluster=cluster)
    assert len(res.calibration.traces) == 10
    [row] = res.runs.itertuples()
    assert row.recordings == 1 and row.trace == str(one)
    assert calibrate([synth["p1"], synth["p1"]], cluster=cluster).traces == calibrate(
        [synth["p1"]], cluster=cluster).traces
    copy = tmp_path / "copy-of-sgd-b16"
    shutil.copytree(one, copy)
    with pytest.raises(ValueError, match=r"held-out traces .*sgd-b16 and .*copy-of-sgd-b16 are "
                                         r"the same recorded run"):
        validate([synth["p1"]], [one, copy], cluster=cluster)


def test_a_stage_longer_than_its_step_is_refused(synth, tmp_path) -> None:
    """Forward rows x 1e6 (far longer than their steps) in a held-out or a calibration trace:
    an error naming the trace, the stage and a step, not a 3,000,000% error."""
    _, cluster = truth_models()
    bad = tmp_path / "bad"
    shutil.copytree(synth["p2"] / "sgd-b16", bad)
    t = load_trace(bad)
    ev = t.events.copy()
    fwd = ev["stage"].astype(str) == S.FORWARD
    ev.loc[fwd, "dur_us"] = ev.loc[fwd, "dur_us"] * 1e6
    write_trace(bad, run=dict(t.run, start_time="bad"), events=ev)
    pattern = rf"{bad}: step \d+ \(rank \d\): forward lasts [\d.]+ ms, longer than its step"
    with pytest.raises(ValueError, match=pattern):
        validate([synth["p1"]], [bad], cluster=cluster)
    with pytest.raises(ValueError, match=pattern):
        validate([synth["p1"], bad], [synth["p2"] / "sgd-b64"], cluster=cluster)


# ------------------------------------------------------------------ measure() by hand
def hand_trace(tmp_path: Path) -> Path:
    """Two ranks, two steps (fi=1, ii=2: step 0 inverse, step 1 factor), then a plain step
    impossible under those intervals is absent; every number below is checked by hand."""
    rows = []

    def add(rank, step, stage, start, end, layer="", lane="compute", nbytes=0):
        rows.append((rank, step, stage, layer, lane, float(start), float(end - start), nbytes, 0.0))

    # step 0 (inverse)
    add(0, 0, "step", 0, 100); add(0, 0, "forward", 0, 10); add(0, 0, "backward", 10, 60)
    add(0, 0, "factor_compute", 20, 30, "fc"); add(0, 0, "inverse", 60, 80, "fc")
    add(0, 0, "grad_comm", 50, 90, lane="comm", nbytes=8); add(0, 0, "update", 90, 100)
    add(1, 0, "step", 0, 110); add(1, 0, "forward", 0, 12); add(1, 0, "backward", 12, 70)
    add(1, 0, "factor_compute", 30, 45, "fc")
    add(1, 0, "grad_comm", 75, 95, lane="comm", nbytes=8); add(1, 0, "update", 95, 110)
    # step 1 (factor): two grad_comm collectives of the same label on each rank
    add(0, 1, "step", 110, 180); add(0, 1, "forward", 110, 120); add(0, 1, "backward", 120, 150)
    add(0, 1, "factor_compute", 125, 131, "fc")
    add(0, 1, "grad_comm", 150, 160, lane="comm"); add(0, 1, "grad_comm", 160, 175, lane="comm")
    add(1, 1, "step", 110, 170); add(1, 1, "forward", 110, 118); add(1, 1, "backward", 118, 150)
    add(1, 1, "factor_compute", 120, 124, "fc")
    add(1, 1, "grad_comm", 155, 163, lane="comm"); add(1, 1, "grad_comm", 163, 180, lane="comm")
    cols = ["rank", "step", "stage", "layer", "lane", "start_us", "dur_us", "bytes", "flops"]
    df = pd.DataFrame(rows, columns=cols)
    run = run_json("hand", strategy="spngd", world=2, batch=8, fi=1, ii=2, steps=2, warmup=0)
    return write_trace(tmp_path / "hand", run=run, events={c: df[c].tolist() for c in cols})


def test_measure_by_hand(tmp_path) -> None:
    m = measure(load_trace(hand_trace(tmp_path)))
    assert m.kinds == {"inverse": 1, "factor": 1}
    assert m.step_us == {"inverse": 110.0, "factor": 70.0}
    inv, fac = m.stage_us["inverse"], m.stage_us["factor"]
    # backward is exclusive of the nested factor statistics, averaged over the two ranks
    assert inv[S.BACKWARD] == pytest.approx(((50 - 10) + (58 - 15)) / 2)
    assert fac[S.BACKWARD] == pytest.approx(((30 - 6) + (32 - 4)) / 2)
    assert inv[S.FACTOR_COMPUTE] == pytest.approx((10 + 15) / 2)
    assert inv[S.INVERSE] == pytest.approx(20 / 2)  # only rank 0 inverts
    # a collective costs its last member's start to its last member's completion (what
    # commbench times); occurrences paired in order
    assert inv[S.GRAD_COMM] == pytest.approx(95 - 75)
    # step 1: 155 -> 163, then 163 -> 180: rank 0 completed the second at 175, but rank 1
    # holds it until 180 (the old shortest-run rule said 15)
    assert fac[S.GRAD_COMM] == pytest.approx((163 - 155) + (180 - 163))
    assert m.mean_step_us == pytest.approx(90.0)
    assert weighted(m.step_us, m.kinds) == pytest.approx(90.0)
    assert weighted({"inverse": 1.0, "factor": 4.0}, {"inverse": 1, "factor": 3}) == 3.25


def test_wait_for_a_late_peer_inside_backward_is_not_backward(tmp_path) -> None:
    """DDP blocks at the end of backward until its all-reduce completes: the early rank's
    wait for the late one is charged to no stage; a collective that completes while a stage
    goes on computing (ends long after) is not a wait inside it; collectives queue."""
    cols = ["rank", "step", "stage", "layer", "lane", "start_us", "dur_us", "bytes", "flops"]
    rows = [
        (0, 0, "step", "", "compute", 0, 100), (0, 0, "forward", "", "compute", 0, 10),
        (0, 0, "backward", "", "compute", 10, 71), (0, 0, "grad_comm", "", "comm", 50, 30),
        (0, 0, "update", "", "compute", 81, 9),
        (0, 0, "factor_comm", "f", "comm", 55, 35),  # queued behind grad_comm until 80
        (1, 0, "step", "", "compute", 0, 100), (1, 0, "forward", "", "compute", 0, 12),
        (1, 0, "backward", "", "compute", 12, 69), (1, 0, "grad_comm", "", "comm", 75, 5),
        (1, 0, "update", "", "compute", 81, 14),
        (1, 0, "factor_comm", "f", "comm", 80, 8),
        # step 1: rank 0's collective completes 5 ms before its backward ends: not blocked
        (0, 1, "step", "", "compute", 100, 9000), (0, 1, "backward", "", "compute", 100, 8000),
        (0, 1, "grad_comm", "", "comm", 200, 2800),
        (1, 1, "step", "", "compute", 100, 9000), (1, 1, "backward", "", "compute", 100, 8000),
        (1, 1, "grad_comm", "", "comm", 2900, 100),
    ]
    df = pd.DataFrame([r + (0, 0.0) for r in rows], columns=cols)
    run = run_json("ddp", strategy="sgd", world=2, batch=8, steps=2, warmup=0)
    m = measure(load_trace(write_trace(tmp_path / "ddp", run=run,
                                       events={c: df[c].tolist() for c in cols})))
    assert m.kinds == {"plain": 2}
    # medians over the two steps of: step 0 -> (71 - 25 + 69) / 2, step 1 -> 8000
    assert m.stage_us["plain"][S.BACKWARD] == pytest.approx(((71 - 25 + 69) / 2 + 8000) / 2)
    assert m.stage_us["plain"][S.GRAD_COMM] == pytest.approx((5 + 100) / 2)
    # a collective issued while another is in flight starts when that one completes: rank 0
    # runs its factor_comm 80 -> 90, rank 1 80 -> 88; from the last start to the last
    # completion it costs 10 in step 0, none in step 1
    assert m.stage_us["plain"][S.FACTOR_COMM] == pytest.approx((10 + 0) / 2)


def test_step_kind_follows_the_optimizer_rule() -> None:
    run = {"optimizer": "kfac", "factor_interval": 10, "inverse_interval": 100}
    assert [run_step_kind(k, run) for k in (0, 5, 10, 20, 100, 101)] == [
        "inverse", "plain", "factor", "factor", "inverse", "plain"]
    assert run_step_kind(0, {"optimizer": "sgd"}) == "plain"


def test_inverse_on_a_step_the_intervals_forbid_is_an_error(tmp_path) -> None:
    path = hand_trace(tmp_path)
    trace = load_trace(path)
    trace.run["inverse_interval"] = 4
    trace.run["factor_interval"] = 1
    trace.events.loc[(trace.events["step"] == 1) & (trace.events["stage"] == "factor_compute"),
                     "stage"] = "inverse"
    with pytest.raises(ValueError, match="step 1 inverts factors"):
        measure(trace)


# ------------------------------------------------------------------ leaks
def test_holdout_given_for_calibration_is_an_error(synth, tmp_path) -> None:
    one = synth["p2"] / "sgd-b16"
    with pytest.raises(ValueError, match="both for calibration and as a held-out run"):
        validate([synth["p1"], one], [one], cluster=truth_models()[1])
    copy = tmp_path / "copy"
    shutil.copytree(one, copy)
    with pytest.raises(ValueError, match="same recorded run"):
        validate([synth["p1"], copy], [one], cluster=truth_models()[1])
    t = load_trace(one)
    with pytest.raises(ValueError, match="both for calibration"):
        check_disjoint([t], [t])


def test_calibration_does_not_depend_on_the_holdouts(synth, tmp_path) -> None:
    """The device fitted with hold-outs (even absurd ones) equals the one fitted without, and
    a run's prediction does not change with the other hold-outs."""
    _, cluster = truth_models()
    alone = calibrate([synth["p1"]], cluster=cluster)
    absurd = synth_trace(tmp_path, "absurd", scale=7.0, strategy="kaisa", world=2, batch=64)
    a = validate([synth["p1"]], [synth["p2"] / "kaisa-b16-i1"], cluster=cluster)
    b = validate([synth["p1"]], [absurd, synth["p2"] / "kaisa-b16-i1", synth["p2"]],
                 cluster=cluster)
    assert a.calibration.device == alone.device == b.calibration.device
    assert a.calibration.traces == b.calibration.traces
    pa = a.runs.set_index("run").loc["kaisa-b16-i1", "predicted_step_us"]
    pb = b.runs[b.runs["run"] == "kaisa-b16-i1"]["predicted_step_us"]
    assert (pb == pa).all()
    direct = predict(load_trace(synth["p2"] / "kaisa-b16-i1").run, alone)
    assert weighted(direct.step_us, {"inverse": 1}) == pytest.approx(pa, rel=1e-12)


# ------------------------------------------------------------------ errors
def test_holdout_errors_name_the_problem(synth, tmp_path) -> None:
    _, cluster = truth_models()
    bad = tmp_path / "bad"
    shutil.copytree(synth["p2"] / "sgd-b16", bad)
    t = load_trace(bad)
    write_trace(bad, run=dict(t.run, workload="nosuchnet", start_time="other"), events=t.events)
    with pytest.raises(ValueError, match=r"bad: no workload model for 'nosuchnet'"):
        validate([synth["p1"]], [bad], cluster=cluster)
    write_trace(bad, run=dict(t.run, fused=True, optimizer="kfac", strategy="spngd",
                              start_time="other"), events=t.events)
    with pytest.raises(ValueError, match="fused SP-NGD"):
        validate([synth["p1"]], [bad], cluster=cluster)
    write_trace(bad, run=dict(t.run, device={"kind": "cuda", "name": "H200"}, start_time="x"),
                events=t.events)
    with pytest.raises(ValueError, match="ran on H200"):
        validate([synth["p1"]], [bad], cluster=cluster)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        validate([synth["p1"]], [tmp_path / "missing"], cluster=cluster)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="nor a folder of trace directories"):
        validate([empty], [synth["p2"]], cluster=cluster)
    with pytest.raises(ValueError, match="no held-out traces"):
        validate([synth["p1"]], [], cluster=cluster)
    with pytest.raises(FileNotFoundError):
        validate([synth["p1"]], [synth["p2"]], cluster=tmp_path / "nocluster.toml")



def test_calibration_traces_of_two_devices_are_refused(synth, tmp_path) -> None:
    """One device model has one set of efficiencies: fitted to a CPU and a GPU together, it
    would be neither's."""
    _, cluster = truth_models()
    other = tmp_path / "other"
    shutil.copytree(synth["p1"] / "sgd-b64", other)
    t = load_trace(other)
    write_trace(other, run=dict(t.run, device={"kind": "cuda", "name": "H200"}, start_time="x"),
                events=t.events)
    with pytest.raises(ValueError, match=r"ran on 2 different devices .*H200"):
        validate([synth["p1"] / "sgd-b16", other], [synth["p2"] / "sgd-b16"], cluster=cluster)
    write_trace(other, run=dict(t.run, threads_per_rank=2, start_time="x"), events=t.events)
    with pytest.raises(ValueError, match="2 thread"):
        calibrate([synth["p1"] / "sgd-b16", other], cluster=cluster)


def test_a_broken_trace_in_a_folder_is_not_skipped(synth, tmp_path) -> None:
    """A trace directory without its run.json in a folder of traces is an error: skipped, it
    would silently be left out of the fit."""
    _, cluster = truth_models()
    folder = tmp_path / "p1"
    shutil.copytree(synth["p1"], folder)
    (folder / "sgd-b16" / "run.json").unlink()
    with pytest.raises(ValueError, match=r"sgd-b16: a trace without its run.json"):
        validate([folder], [synth["p2"] / "sgd-b16"], cluster=cluster)


def test_an_incomplete_calibration_trace_is_noted(synth, tmp_path) -> None:
    _, cluster = truth_models()
    part = tmp_path / "part"
    shutil.copytree(synth["p1"] / "sgd-b64", part)
    t = load_trace(part)
    write_trace(part, run=dict(t.run, completed=False, failure="killed", start_time="y"),
                events=t.events)
    res = validate([synth["p1"] / "sgd-b16", part], [synth["p2"] / "sgd-b16"], cluster=cluster)
    assert any("calibration trace part: the run did not complete" in n for n in res.notes)
    alone = validate([synth["p2"] / "sgd-b64"], [synth["p2"] / "sgd-b16"], cluster=cluster)
    assert any(n.startswith("only multi-process traces") for n in alone.notes)

def test_error_pct_nan_free_json(synth) -> None:
    _, cluster = truth_models()
    d = validate([synth["p1"]], [synth["p2"] / "sgd-b16"], cluster=cluster).to_dict()
    assert list(d)[-2:] == ["median_abs_error_pct", "worst_abs_error_pct"]
    for row in d["stages"]:
        for v in row.values():
            assert not (isinstance(v, float) and math.isnan(v))


# ------------------------------------------------------------------ command line
def _cli(capsys, *args: str) -> tuple[int, str, str]:
    from kfacperf.cli import main

    rc = main(["validate", *map(str, args)])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def truth_cluster_toml(tmp_path_factory) -> Path:
    from kfacperf.sim.models.cluster import save_cluster_model

    return save_cluster_model(truth_models()[1], tmp_path_factory.mktemp("c") / "truth.toml")


def test_cli_table_json_and_report_files(synth, truth_cluster_toml, tmp_path, capsys) -> None:
    import json

    from kfacperf.report.inputs import load_validation
    from kfacperf.report.sections import normalize_validation

    common = ["--calibrate", synth["p1"], "--holdout", synth["p2"] / "sgd-b16",
              synth["p2"] / "spngd-b64-i10", "--cluster", truth_cluster_toml]
    rc, out, err = _cli(capsys, *common, "--out", tmp_path / "v.parquet")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["run", "strategy", "ranks"]
    assert lines[1].split()[:5] == ["sgd-b16", "sgd", "2", "16", "-"]
    assert lines[2].split()[:5] == ["spngd-b64-i10", "spngd", "2", "64", "10/100"]
    assert "2 held-out run(s): step time |error| median 0.0%" in out
    table = normalize_validation(load_validation(tmp_path / "v.parquet"))
    assert list(table["run"]) == ["sgd-b16", "spngd-b64-i10"]
    assert table["error_pct"].abs().max() < 1e-3

    rc, out, err = _cli(capsys, *common, "--json", "--out", tmp_path / "v.json")
    assert rc == 0, err
    doc = json.loads(out)
    assert list(doc)[-2:] == ["median_abs_error_pct", "worst_abs_error_pct"]
    assert [r["run"] for r in doc["runs"]] == ["sgd-b16", "spngd-b64-i10"]
    assert {"measured_step_us", "predicted_step_us", "error_pct", "world_size", "intervals",
            "batch_per_rank", "strategy"} <= set(doc["runs"][0])
    assert {(s["run"], s["stage"]) for s in doc["stages"]} >= {
        ("sgd-b16", "grad_comm"), ("spngd-b64-i10", "factor_comm"), ("spngd-b64-i10", "backward")}
    assert len(doc["calibration"]["traces"]) == 10 and doc["calibration"]["cluster"] == "truth-node"
    assert json.loads((tmp_path / "v.json").read_text()) == doc
    assert list(load_validation(tmp_path / "v.json")["run"]) == ["sgd-b16", "spngd-b64-i10"]


@pytest.mark.parametrize("change,message", [
    ({"--holdout": "MISSING"}, "trace directory MISSING does not exist"),
    ({"--cluster": "no-such-cluster"}, "no-such-cluster"),
    ({"--out": "v.txt"}, "--out v.txt: use a .parquet, .csv or .json"),
])
def test_cli_errors_exit_2_with_the_cause(synth, truth_cluster_toml, capsys, change,
                                          message) -> None:
    args = {"--calibrate": synth["p1"], "--holdout": synth["p2"] / "sgd-b16",
            "--cluster": truth_cluster_toml, **change}
    rc, _, err = _cli(capsys, *[x for kv in args.items() for x in kv])
    assert rc == 2 and message in err and "Traceback" not in err


def test_cli_never_imports_torch(synth, truth_cluster_toml) -> None:
    import subprocess
    import sys

    code = ("import sys; from kfacperf.cli import main; "
            f"rc = main(['validate', '--calibrate', {str(synth['p1'])!r}, '--holdout', "
            f"{str(synth['p2'] / 'kaisa-b16-i1')!r}, '--cluster', {str(truth_cluster_toml)!r}, "
            "'--json']); assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
