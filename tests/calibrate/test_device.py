"""Calibration recovers the parameters that generated synthetic traces and timings."""
from __future__ import annotations

import random
from pathlib import Path

import pytest

from kfacperf.calibrate.alpha_beta import cluster_from_fits, fit_alpha_beta
from kfacperf.calibrate.device import base_device_for, fit_device_model
from kfacperf.sim.costs.collectives import algorithm_us
from kfacperf.sim.costs.model import CostModel
from kfacperf.sim.models.cluster import (
    OPS,
    ClusterModel,
    Tier,
    load_cluster_model,
    save_cluster_model,
)
from kfacperf.sim.models.device import DeviceModel, StageEfficiency
from kfacperf.sim.models.host import HostModel
from kfacperf.sim.models.workload import LayerModel, WorkloadModel
from kfacperf.trace.measure import exclusive_compute_times
from kfacperf.trace.schema import events_frame
from kfacperf.trace.store import Trace


# ------------------------------------------------------------------ alpha-beta
def synthetic_timings(op: str, algo: str, alpha: float, gbps: float, noise: float = 0.0,
                      seed: int = 0):
    rng = random.Random(seed)
    out = []
    for p in (2, 3, 4):
        for n in (1024, 16384, 262144, 4194304):
            t = algorithm_us(op, algo, p, n, alpha, 1.0 / (gbps * 1e3))
            out.append((p, n, t * (1 + noise * rng.uniform(-1, 1))))
    return out


@pytest.mark.parametrize(("op", "algo"), [("all_reduce", "ring"), ("reduce_scatter", "ring"),
                                          ("all_gather", "halving_doubling"), ("broadcast", "tree"),
                                          ("all_reduce", "tree")])
def test_alpha_beta_fit_recovers_known_values(op: str, algo: str) -> None:
    fit = fit_alpha_beta(synthetic_timings(op, algo, 37.0, 2.5), op=op, algorithm=algo)
    assert fit.alpha_us == pytest.approx(37.0, rel=1e-6)
    assert fit.bandwidth_GBps == pytest.approx(2.5, rel=1e-6)
    assert fit.max_rel_error < 1e-9 and fit.samples == 12
    noisy = fit_alpha_beta(synthetic_timings(op, algo, 37.0, 2.5, noise=0.03), op=op,
                           algorithm=algo)
    assert noisy.alpha_us == pytest.approx(37.0, rel=0.1)
    assert noisy.bandwidth_GBps == pytest.approx(2.5, rel=0.1)
    assert noisy.predict_us(4, 1e6) == pytest.approx(fit.predict_us(4, 1e6), rel=0.05)


def test_alpha_beta_fit_keeps_alpha_nonnegative_and_rejects_bad_data() -> None:
    # timings proportional to size only: beta = 1e-3 us/B = 1 GB/s, alpha 0
    pts = [(p, n, 2 * (p - 1) / p * n / 1e3) for p in (2, 4) for n in (1e3, 1e5)]
    fit = fit_alpha_beta(pts, op="all_reduce", algorithm="ring")
    assert fit.alpha_us == pytest.approx(0.0, abs=1e-9) and fit.bandwidth_GBps == pytest.approx(1.0)
    # generated with alpha = -0.5 us: the fit clamps alpha at 0 instead of going negative
    pts = [(p, n, 2 * (p - 1) / p * n / 1e3 - 0.5 * 2 * (p - 1))
           for p in (2, 4) for n in (1e4, 1e5)]
    fit = fit_alpha_beta(pts, op="all_reduce", algorithm="ring")
    assert fit.alpha_us == 0.0 and 0.9 < fit.bandwidth_GBps < 1.2
    with pytest.raises(ValueError, match="at least 2 samples"):
        fit_alpha_beta([(2, 1e3, 5.0)], op="all_reduce", algorithm="ring")
    # noise that hides the growth with size falls back to bandwidth only, with a note
    flat = fit_alpha_beta([(2, 1e3, 50.0), (2, 1e6, 50.0)], op="all_reduce", algorithm="ring")
    assert flat.alpha_us == 0.0 and flat.bandwidth_GBps > 0 and "did not grow" in flat.note
    with pytest.raises(ValueError, match="unusable sample"):
        fit_alpha_beta([(1, 1e3, 5.0), (2, 1e3, 5.0)], op="all_reduce", algorithm="ring")


def test_cluster_from_fits_round_trips(tmp_path: Path) -> None:
    fits = {op: fit_alpha_beta(synthetic_timings(op, a, 20.0 + i, 1.0 + i), op=op, algorithm=a)
            for i, (op, a) in enumerate([("all_reduce", "ring"), ("reduce_scatter", "ring"),
                                         ("all_gather", "ring"), ("broadcast", "tree")])}
    c = cluster_from_fits(fits, name="local-cpu", gpus_per_node=64,
                          host=HostModel(cores_per_node=2))
    back = load_cluster_model(save_cluster_model(c, tmp_path / "c.toml"))
    assert back == c
    assert back.intra.params("all_gather").bandwidth_GBps == pytest.approx(3.0, rel=1e-6)
    assert back.intra.params("broadcast").algorithm == "tree"


# ------------------------------------------------------------------ device
def layer(name: str, a: int, g: int, rows: int) -> LayerModel:
    return LayerModel(name=name, kind="conv2d" if rows > 1 else "linear", dim_a=a, dim_g=g,
                      params=a * g, rows_per_example=rows,
                      fwd_flops_per_example=2.0 * (a - 1) * g * rows,
                      in_elems_per_example=(a - 1) * rows, out_elems_per_example=g * rows)


W1 = WorkloadModel(name="w1", layers=(layer("c1", 28, 16, 256), layer("c2", 145, 32, 64),
                                      layer("fc", 513, 10, 1)),
                   other_params=50, other_fwd_flops_per_example=0.0, input_shape=(3, 16, 16),
                   input_dtype="float32", source="test")
W2 = WorkloadModel(name="w2", layers=(layer("a", 101, 200, 1), layer("b", 201, 300, 1)),
                   other_params=0, other_fwd_flops_per_example=0.0, input_shape=(100,),
                   input_dtype="float32", source="test")
# (efficiency, mem_efficiency, overhead_us); the update's FLOPs are proportional to its bytes,
# so only one of its efficiencies is identifiable: the true compute efficiency is the bound 1
TRUE = {"forward": (0.31, 0.5, 12.0), "backward": (0.27, 0.4, 20.0),
        "factor_compute": (0.45, 0.2, 8.0), "inverse": (0.06, 0.3, 150.0),
        "precondition": (0.52, 0.35, 9.0), "update": (1.0, 0.2, 40.0)}
GUESS = {k: (1.0, 1.0, 0.0) for k in TRUE}


def device(eff: dict, mode: str = "additive") -> DeviceModel:
    return DeviceModel(name="true", fp32_tflops=0.2, tf32_tflops=0.0, bf16_tflops=0.4,
                       mem_bandwidth_GBps=20.0, mode=mode,
                       stages={k: StageEfficiency(efficiency=e, mem_efficiency=m, overhead_us=o,
                                                  assumed=False)
                               for k, (e, m, o) in eff.items()})


def null_cluster() -> ClusterModel:
    algos = {"all_reduce": "ring", "reduce_scatter": "ring", "all_gather": "ring",
             "broadcast": "tree"}
    t = Tier(alpha_us=1.0, bandwidth_GBps=1.0, algorithms=algos)
    return ClusterModel(name="x", gpus_per_node=1, intra=t, inter=t,
                        multi_node={op: "flat" for op in OPS})


def synthetic_trace(w: WorkloadModel, batch: int, *, world_size: int = 1, steps: int = 4,
                    warmup: int = 1, noise: float = 0.0, seed: int = 0, method: str = "eigen",
                    true: DeviceModel | None = None, load_gap: float = 2.0,
                    write_gap: float = 0.0, optimizer: str | None = None,
                    fisher: str | None = None, factor_interval: int = 1,
                    capture: float = 0.0) -> Trace:
    """A K-FAC trace timed by the TRUE device: factor statistics nested in backward, as the
    optimizer records them, and a slow warm-up step that calibration must leave out.
    ``load_gap``/``write_gap``: host time in no stage after backward and before update.
    Steps ``k % factor_interval == 0`` capture statistics (and invert), their capturing
    backward ``capture`` slower; with ``fisher="mc"`` that is an extra backward row (layer
    ``mc_fisher``) before the true labels' plain one."""
    cost = CostModel(workload=w, device=true or device(TRUE), cluster=null_cluster(),
                     inverse_method=method)
    rng = random.Random(seed)
    rows: dict[str, list] = {k: [] for k in ("rank", "step", "stage", "layer", "lane", "start_us",
                                             "dur_us", "bytes", "flops")}

    def add(rank, step, stage, lname, start, dur):
        for k, v in zip(rows, (rank, step, stage, lname, "compute", start, dur, 0, 0.0)):
            rows[k].append(v)
        return start + dur

    def t(stage, l=None):
        slow = 5.0 if step < warmup else 1.0
        return cost.compute_us(stage, l, batch=batch) * slow * (1 + noise * rng.uniform(-1, 1))

    for rank in range(world_size):
        now = 0.0
        for step in range(steps):
            factor = step % factor_interval == 0
            step_start = now
            now = add(rank, step, "forward", "", now, t("forward"))
            bwd_start, inner = now, now + 1.0
            pure_bwd = t("backward")
            nested = []
            for l in reversed(w.layers if factor else ()):  # statistics in backward hooks:
                f = t("factor_compute", l)                  # 70% of the factor time
                nested.append((l, f))
                inner = add(rank, step, "factor_compute", l.name, inner, 0.7 * f) + 0.5
            capturing = pure_bwd * (1 + capture if factor else 1.0)
            mc = factor and fisher == "mc"
            add(rank, step, "backward", "mc_fisher" if mc else "", bwd_start,
                capturing + sum(0.7 * f for _, f in nested))
            now = bwd_start + capturing + sum(0.7 * f for _, f in nested)
            if mc:  # the true labels' backward
                now = add(rank, step, "backward", "", now, t("backward"))
            now += load_gap
            for l, f in reversed(nested):  # running averages in step(): the other 30%
                now = add(rank, step, "factor_compute", l.name, now, 0.3 * f)
            for stage in ("inverse", "precondition"):
                for l in w.layers:
                    if stage == "inverse" and not factor:
                        continue
                    now = add(rank, step, stage, l.name, now, t(stage, l))
            now = add(rank, step, "update", "", now + write_gap, t("update"))
            add(rank, step, "step", "", step_start, now - step_start)
    run = {"workload": w.name, "batch_per_rank": batch, "world_size": world_size, "warmup": warmup,
           "inverse_method": method, "threads_per_rank": 1, "device": {"name": "cpu"}}
    if optimizer is not None:
        run["optimizer"] = optimizer
    if fisher is not None:
        run.update(fisher=fisher, factor_interval=factor_interval,
                   inverse_interval=factor_interval)
    return Trace(path=Path(f"synthetic/{w.name}-{batch}-{world_size}"), run=run,
                 events=events_frame(rows))


WORKLOADS = {"w1": W1, "w2": W2}


def test_exclusive_times_subtract_nested_stages() -> None:
    tr = synthetic_trace(W1, 8, steps=2, warmup=0)
    ex = exclusive_compute_times(tr.events)
    true_cost = CostModel(workload=W1, device=device(TRUE), cluster=null_cluster())
    bwd = ex[(ex["stage"] == "backward") & (ex["step"] == 1)]["dur_us"].item()
    assert bwd == pytest.approx(true_cost.compute_us("backward", None, batch=8), rel=1e-9)
    fac = ex[(ex["stage"] == "factor_compute") & (ex["layer"] == "c2")
             & (ex["step"] == 0)]["dur_us"].item()
    assert fac == pytest.approx(true_cost.compute_us("factor_compute", W1.layer("c2"), batch=8),
                                rel=1e-9)
    assert "step" not in set(ex["stage"])


def test_device_calibration_recovers_the_true_model() -> None:
    traces = [synthetic_trace(W1, 8), synthetic_trace(W1, 64), synthetic_trace(W2, 32)]
    cal = fit_device_model(traces, workloads=WORKLOADS, base=device(GUESS), name="fitted")
    assert cal.device.mode == "additive"
    for kind, (eff, mem, over) in TRUE.items():
        got = cal.device.stage(kind)
        assert got.efficiency == pytest.approx(eff, rel=1e-6), kind
        assert got.mem_efficiency == pytest.approx(mem, rel=1e-6), kind
        assert got.overhead_us == pytest.approx(over, rel=1e-6, abs=1e-6), kind
        assert not got.assumed and cal.fits[kind].max_rel_error < 1e-6
    assert "compute efficiency" in cal.fits["update"].note
    # the fitted model predicts another batch size and another layer shape
    fitted = CostModel(workload=W1, device=cal.device, cluster=null_cluster(), use_measured=False)
    true_cost = CostModel(workload=W1, device=device(TRUE), cluster=null_cluster())
    new_layer = layer("new", 300, 77, 9)
    for stage, l in (("forward", None), ("backward", None), ("factor_compute", new_layer),
                     ("inverse", new_layer), ("precondition", new_layer), ("update", None)):
        assert fitted.compute_us(stage, l, batch=200) == pytest.approx(
            true_cost.compute_us(stage, l, batch=200), rel=1e-6)


@pytest.mark.parametrize("fisher", ["emp", "mc"])
def test_capture_overhead_with_either_fisher(fisher: str) -> None:
    """With the Monte-Carlo Fisher the statistics are captured in the extra backward (its own
    row) and the true labels' backward is a plain one: the fit finds the same backward
    efficiency and capture overhead as from empirical-Fisher traces."""
    traces = [synthetic_trace(w, b, steps=6, fisher=fisher, factor_interval=2, capture=0.25)
              for w, b in ((W1, 8), (W1, 64), (W2, 32))]
    cal = fit_device_model(traces, workloads=WORKLOADS, base=device(GUESS), name="fitted")
    assert cal.device.capture_overhead["backward"] == pytest.approx(0.25, rel=1e-3)
    eff, mem, over = TRUE["backward"]
    got = cal.device.stage("backward")
    assert (got.efficiency, got.mem_efficiency) == pytest.approx((eff, mem), rel=1e-3)
    assert got.overhead_us == pytest.approx(over, rel=1e-3)


def test_device_calibration_with_noise_predicts_within_a_few_percent() -> None:
    traces = ([synthetic_trace(W1, b, noise=0.04, seed=b, steps=7) for b in (8, 64)]
              + [synthetic_trace(W2, 32, noise=0.04, steps=7)])
    cal = fit_device_model(traces, workloads=WORKLOADS, base=device(GUESS), name="fitted")
    fitted = CostModel(workload=W1, device=cal.device, cluster=null_cluster(), use_measured=False)
    true_cost = CostModel(workload=W1, device=device(TRUE), cluster=null_cluster())
    for stage in ("forward", "backward", "update"):
        assert fitted.compute_us(stage, None, batch=32) == pytest.approx(
            true_cost.compute_us(stage, None, batch=32), rel=0.05)
    for stage in ("factor_compute", "inverse", "precondition"):
        for l in W1.layers:
            assert fitted.compute_us(stage, l, batch=32) == pytest.approx(
                true_cost.compute_us(stage, l, batch=32), rel=0.06)


def test_measured_times_single_process_only_and_notes() -> None:
    traces = [synthetic_trace(W1, 16), synthetic_trace(W1, 16, world_size=2)]
    cal = fit_device_model(traces, workloads=WORKLOADS, base=device(GUESS), name="fitted")
    assert len(cal.traces_used) == 1 and any("multi-process" in n for n in cal.notes)
    m = {(x.stage, x.layer): x.time_us for x in cal.device.measured}
    true_cost = CostModel(workload=W1, device=device(TRUE), cluster=null_cluster())
    assert m[("inverse", "fc")] == pytest.approx(
        true_cost.compute_us("inverse", W1.layer("fc"), batch=16))
    # one batch of a whole-model stage cannot separate overhead from efficiency: overhead 0,
    # and the fitted model still reproduces the measured time
    assert cal.device.stage("forward").overhead_us == 0.0
    assert "overhead" in cal.fits["forward"].note
    fitted = CostModel(workload=W1, device=cal.device, cluster=null_cluster(), use_measured=False)
    assert fitted.compute_us("forward", None, batch=16) == pytest.approx(
        true_cost.compute_us("forward", None, batch=16))
    with pytest.raises(ValueError, match="no workload model for 'w1'"):
        fit_device_model(traces, workloads={}, base=device(GUESS), name="x")


def test_measured_times_belong_to_their_workload_model() -> None:
    """Two user models of one FILE.py:FUNC name (other files: other fingerprints) with the
    same layer names: each model's [[measured]] times carry its fingerprint and price it
    alone (not the mean of the two), and a factor-step forward of one is never paired with a
    plain-step forward of the other for the capture overhead."""
    from dataclasses import replace

    big = replace(W2, name="model.py:build", workload="/a/model.py:build", fingerprint="a" * 64)
    small = WorkloadModel(name="model.py:build", workload="/b/model.py:build",
                          fingerprint="b" * 64,
                          layers=(layer("a", 101, 12, 1), layer("b", 13, 300, 1)),
                          other_params=0, other_fwd_flops_per_example=0.0, input_shape=(100,),
                          input_dtype="float32", source="test")
    models = {m.fingerprint: m for m in (big, small)}

    def traced(w: WorkloadModel, **kw) -> Trace:
        tr = synthetic_trace(w, 32, **kw)
        return replace(tr, run={**tr.run, "workload": w.workload,
                                "workload_fingerprint": w.fingerprint})

    traces = [traced(big, optimizer="kfac"), traced(small, optimizer="sgd")]
    cal = fit_device_model(traces, workloads=lambda run: models[run["workload_fingerprint"]],
                           base=device(GUESS), name="fitted")
    for w in (big, small):
        truth = CostModel(workload=w, device=device(TRUE), cluster=null_cluster())
        fitted = CostModel(workload=w, device=cal.device, cluster=null_cluster())
        for l in w.layers:
            assert fitted.compute_us("inverse", l, batch=32) == pytest.approx(
                truth.compute_us("inverse", l, batch=32), rel=1e-6), (w.fingerprint, l.name)
        assert fitted.compute_us("forward", None, batch=32) == pytest.approx(
            truth.compute_us("forward", None, batch=32), rel=1e-6)
    assert {m.fingerprint for m in cal.device.measured} == {"a" * 64, "b" * 64}
    assert {m.workload for m in cal.device.measured} == {"model.py:build"}
    # big's steps all capture statistics, small's (SGD) none: no pair of one model
    assert "forward" not in cal.device.capture_overhead
    assert any(n.startswith("forward: no run measured both plain and factor steps")
               for n in cal.notes)


def test_calibration_fits_the_host_work_between_stages_per_layer() -> None:
    """Single-process K-FAC traces with 20 us per layer after backward and 35 us per layer
    before the update give exactly those; SGD and multi-process traces do not count."""
    n1, n2 = len(W1.layers), len(W2.layers)
    assert n1 != n2
    kfac = [synthetic_trace(W1, 8, load_gap=20.0 * n1, write_gap=35.0 * n1, optimizer="kfac"),
            synthetic_trace(W2, 32, load_gap=20.0 * n2, write_gap=35.0 * n2, optimizer="kfac"),
            synthetic_trace(W1, 64, load_gap=20.0 * n1, write_gap=35.0 * n1, optimizer="kfac")]
    others = [synthetic_trace(W1, 16, load_gap=900.0, write_gap=900.0, optimizer="sgd"),
              synthetic_trace(W1, 16, world_size=2, load_gap=900.0, write_gap=900.0,
                              optimizer="kfac")]
    cal = fit_device_model(kfac + others, workloads=WORKLOADS, base=device(GUESS), name="f")
    assert cal.device.layer_host_us == pytest.approx({"load_grad": 20.0, "write_grad": 35.0})
    assert any("load_grad 20.0 us, write_grad 35.0 us per K-FAC layer (median of 3" in n
               for n in cal.notes)
    # the cost model gives it per layer, slowed like compute by ranks sharing cores
    from dataclasses import replace

    cluster = replace(null_cluster(), gpus_per_node=2,
                      host=HostModel(cores_per_node=2, contention=0.25))
    cost = CostModel(workload=W1, device=cal.device, cluster=cluster, ranks_per_node=2)
    assert cost.layer_host_us("write_grad") == pytest.approx(35.0 * cost.slowdown)
    assert cost.slowdown > 1.0
    # no K-FAC trace: nothing fitted, and the device model says 0
    cal = fit_device_model(others[:1], workloads=WORKLOADS, base=device(GUESS), name="g")
    assert cal.device.layer_host_us == {} and cal.device.host_us("load_grad") == 0.0


def test_step_host_gaps_of_a_hand_built_step() -> None:
    """Gaps run from backward's end to the next event (nested statistics and comm-lane
    events count), and from the last event before update to its start."""
    from kfacperf.calibrate.host_gaps import step_host_gaps

    rows = {k: [] for k in ("rank", "step", "stage", "layer", "lane", "start_us", "dur_us",
                            "bytes", "flops")}
    for stage, lane, start, dur in [("forward", "compute", 0, 50),
                                    ("backward", "compute", 50, 100),
                                    ("factor_compute", "compute", 60, 10),  # nested
                                    ("factor_comm", "comm", 163, 40),
                                    ("precondition", "compute", 171, 9),
                                    ("update", "compute", 251, 5), ("step", "compute", 0, 256)]:
        for k, v in zip(rows, (0, 3, stage, "", lane, float(start), float(dur), 0, 0.0)):
            rows[k].append(v)
    gaps = step_host_gaps(events_frame(rows))
    assert gaps.to_dict("records") == [{"rank": 0, "step": 3, "load_grad": 13.0,
                                        "write_grad": 48.0}]
    # a step without an update is left out
    keep = [i for i, st in enumerate(rows["stage"]) if st != "update"]
    assert step_host_gaps(events_frame({k: [v[i] for i in keep] for k, v in rows.items()})).empty


def test_base_device_for_cpu_and_gpu_runs() -> None:
    cpu = base_device_for({"device": {"name": "cpu"}, "threads_per_rank": 2})
    assert cpu.fp32_tflops == pytest.approx(0.4)
    assert base_device_for({"device": {"name": "NVIDIA H200"}}).name == "h200"
    assert base_device_for({"device": {"name": "Tesla V100-SXM2-16GB"}}).name == "v100-sxm2"


def test_other_parts_of_a_family_are_said_and_an_unknown_gpu_is_refused() -> None:
    from kfacperf.calibrate.device import gpu_preset_for

    assert gpu_preset_for({"device": {"name": "NVIDIA H100 80GB HBM3"}}) == ("h100-sxm5", "")
    for name, preset in (("NVIDIA H100 PCIe", "h100-sxm5"), ("NVIDIA H200 NVL", "h200"),
                         ("NVIDIA A100-PCIE-40GB", "a100-sxm4")):
        got, note = gpu_preset_for({"device": {"name": name, "kind": "gpu"}})
        assert got == preset and "another part" in note and preset in note, name
    with pytest.raises(ValueError, match=r"no device preset has the peaks of GPU 'NVIDIA L40S'"
                                         r".*--start-from"):
        base_device_for({"device": {"name": "NVIDIA L40S", "kind": "gpu"}})
    assert gpu_preset_for({"device": {"name": "cpu", "kind": "cpu"}}) == (None, "")


# ------------------------------------------------------------------ the command
def test_calibrate_command_fits_written_traces(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from kfacperf.cli import main
    from kfacperf.sim.models.device import load_device_model, save_device_model
    from kfacperf.sim.models.workload_file import save_workload_model
    from kfacperf.trace.store import write_trace

    dirs = []
    for w, b in ((W1, 8), (W1, 64), (W2, 32)):
        tr = synthetic_trace(w, b)
        dirs.append(str(write_trace(tmp_path / f"{w.name}-{b}", run=dict(tr.run, completed=True),
                                    events=tr.events)))
    models = [str(save_workload_model(w, tmp_path / f"{w.name}.toml")) for w in (W1, W2)]
    base = save_device_model(device(GUESS), tmp_path / "base.toml")
    out = tmp_path / "fitted.toml"
    args = ["calibrate", *dirs, "--base", str(base), "--out", str(out)]
    for m in models:
        args += ["--workload-model", m]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "inverse" in text and "wrote" in text
    fitted = load_device_model(out)
    assert fitted.name == "fitted"
    for kind, (_eff, mem, _over) in TRUE.items():
        assert fitted.stage(kind).mem_efficiency == pytest.approx(mem, rel=1e-6)
    assert len(fitted.measured) > 0
    # a folder of traces stands for every trace in it
    folder = tmp_path / "folder"
    folder.mkdir()
    for d in dirs:
        Path(d).rename(folder / Path(d).name)
    args[1:1 + len(dirs)] = [str(folder)]
    assert main(args) == 2  # the file written above is not replaced without --force
    assert "already exists; pass --force" in capsys.readouterr().err
    assert main([*args, "--force"]) == 0
    again = load_device_model(out)
    assert set(again.measured) == set(fitted.measured)  # the folder lists them by name
    for kind in TRUE:
        assert again.stage(kind).efficiency == pytest.approx(fitted.stage(kind).efficiency)
    assert "fitted from 3 trace(s)" in capsys.readouterr().out
    dirs = [str(folder / Path(d).name) for d in dirs]
    # a trace whose workload has no model is a clear error, not a traceback
    assert main(["calibrate", dirs[0], "--out", str(tmp_path / "x.toml")]) == 2
    assert "no workload model for 'w1'" in capsys.readouterr().err
    # a given model that matches no trace is said to be unused, the used one is not
    assert main(["calibrate", dirs[0], "--workload-model", models[0], "--workload-model",
                 models[1]]) == 0
    err = capsys.readouterr().err
    assert f"--workload-model {models[1]} matched none of the traces (their workloads: w1)" \
        in err and models[0] not in err


def test_calibrate_command_generates_workload_models(tmp_path: Path) -> None:
    from kfacperf.cli import main
    from kfacperf.sim.models.workload_file import load_workload_model

    out = tmp_path / "t.toml"
    assert main(["calibrate", "--workload", "transformer", "--workload-option", "seq_len=32",
                 "--out", str(out)]) == 0
    w = load_workload_model(out)
    assert (w.name == "transformer[seq_len=32]" and w.workload == "transformer"
            and w.options["seq_len"] == 32)
    assert w.input_dtype == "int64" and w.input_shape == (32,)
    # attention score and context products, per example: 2 layers x 2 products x 2*T*T*d
    assert w.other_fwd_flops_per_example == 2 * 2 * 2 * 32 * 32 * 128
    q = w.layer("layers.0.attn.q")
    assert (q.dim_a, q.dim_g, q.rows_per_example, q.params) == (129, 128, 32, 129 * 128)
    assert (w.matches_run("transformer", {"seq_len": 32})
            and not w.matches_run("transformer", {}))


def test_committed_workload_models_match_the_torch_workloads() -> None:
    """models/workloads/*.toml are what `kfacperf calibrate --workload NAME` generates today."""
    from kfacperf.sim.models import load_workload
    from kfacperf.workloads.workload_model import build_workload_model

    for name in ("mlp", "resnet20", "resnet32", "resnet50", "transformer", "bert-large-block"):
        committed = load_workload(name)
        fresh = build_workload_model(name, {})
        assert committed.layers == fresh.layers, name
        assert committed.batchnorm == fresh.batchnorm, name
        assert (committed.other_params, committed.options, committed.input_shape) == (
            fresh.other_params, fresh.options, fresh.input_shape), name
        assert committed.other_fwd_flops_per_example == pytest.approx(
            fresh.other_fwd_flops_per_example)


def test_roofline_mode_fit_recovers_a_shared_efficiency() -> None:
    shared = {k: (e, e, o) for k, (e, _, o) in TRUE.items()}
    shared["update"] = (0.2, 0.2, 40.0)
    true = device(shared, mode="roofline")
    traces = [synthetic_trace(W1, 8, steps=3, true=true),
              synthetic_trace(W1, 64, steps=3, true=true),
              synthetic_trace(W2, 32, steps=3, true=true)]
    cal = fit_device_model(traces, workloads=WORKLOADS, base=device(GUESS, mode="roofline"),
                           name="r")
    assert cal.device.mode == "roofline"
    for kind, (eff, _, over) in shared.items():
        st = cal.device.stage(kind)
        assert (st.efficiency == pytest.approx(eff, rel=1e-6)
                and st.mem_efficiency == st.efficiency), kind
        assert st.overhead_us == pytest.approx(over, rel=1e-6, abs=1e-6), kind


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give TRACE directories"),
        (["some/trace", "--workload", "mlp"], "not both"),
        (["/nonexistent/trace"], "does not exist"),
        (["tests"], "neither a trace directory"),
        (["--workload", "nope"], "unknown workload 'nope'"),
        (["--workload", "mlp", "--workload-option", "hidden"], "expected KEY=VALUE"),
        (["--published", "spngd-fig5", "--device", "v100-spngd", "--fit",
          "forward.efficiency,forward.efficiency"], "forward.efficiency more than once"),
        (["--published", "spngd-fig5", "--device", "v100-spngd", "--fit",
          "cluster.inter.bandwidth_GBps", "--cluster", "abci-v100"], "add --cluster-out FILE"),
    ],
)
def test_calibrate_command_bad_input(args: list[str], message: str,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    from kfacperf.cli import main

    try:
        rc = main(["calibrate", *args])
    except SystemExit as exc:  # argparse rejects a malformed option itself
        rc = exc.code
    assert rc == 2
    assert message in capsys.readouterr().err


def test_recordings_of_one_configuration_keep_one_measured_time_each_their_mean() -> None:
    """Eight recordings of a configuration wrote eight [[measured]] entries per layer and
    stage (local-cpu grew to 3,824 entries, half a MiB); the cost model takes their mean, so
    one entry holding the mean prices the same and the file stays small."""
    from collections import Counter

    runs = [synthetic_trace(W1, 16, noise=0.2, seed=s, optimizer="kfac") for s in range(4)]
    cal = fit_device_model(runs, workloads=WORKLOADS, base=device(GUESS), name="f")
    keys = Counter((m.model_key, m.stage, m.layer, m.batch, m.inverse_method)
                   for m in cal.device.measured)
    assert keys and max(keys.values()) == 1
    alone = [fit_device_model([r], workloads=WORKLOADS, base=device(GUESS), name="f")
             for r in runs]
    for m in cal.device.measured:
        each = [a.time_us for one in alone for a in one.device.measured
                if (a.stage, a.layer, a.batch) == (m.stage, m.layer, m.batch)]
        assert len(each) == len(runs)
        assert m.time_us == pytest.approx(sum(each) / len(each), rel=1e-5)
