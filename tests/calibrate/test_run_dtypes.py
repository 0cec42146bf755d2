"""A run's precision in calibration and validation: each trace is fitted, and each run
predicted, at the peaks of its own precision.

The synthetic traces are timed by the closed form of the device model written out here
(overhead per call + FLOPs / (peak x efficiency) + bytes / (bandwidth x memory efficiency),
the work of each stage as in :mod:`kfacperf.sim.costs.stage_work`'s table), not by the
cost model under test.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from kfacperf.calibrate.device import base_device_for, fit_device_model
from kfacperf.calibrate.run_dtypes import RunDtypes, run_dtypes
from kfacperf.sim.models.cluster import OPS, ClusterModel, Tier
from kfacperf.sim.models.device import STAGE_KINDS, DeviceModel, StageEfficiency
from kfacperf.sim.models.workload import LayerModel, WorkloadModel
from kfacperf.trace.schema import events_frame
from kfacperf.trace.store import Trace
from kfacperf.validation.model import Calibration, predict

PEAK_TFLOPS = {"fp32": 10.0, "tf32": 40.0, "bf16": 80.0}
BANDWIDTH_GBPS = 500.0
BYTES = {"fp32": 4, "bf16": 2}
# (efficiency, memory efficiency, overhead per call in µs); the update's FLOPs are
# proportional to its bytes, so its compute efficiency is not identifiable: the bound 1
TRUE = {"forward": (0.4, 0.6, 7.0), "backward": (0.3, 0.5, 11.0), "update": (1.0, 0.25, 30.0)}


def _layer(name: str, a: int, g: int) -> LayerModel:
    return LayerModel(name=name, kind="linear", dim_a=a, dim_g=g, params=a * g,
                      rows_per_example=1, fwd_flops_per_example=2.0 * (a - 1) * g,
                      in_elems_per_example=a - 1, out_elems_per_example=g)


W = WorkloadModel(name="w", layers=(_layer("a", 1025, 2048), _layer("b", 2049, 512)),
                  other_params=100, other_fwd_flops_per_example=0.0, input_shape=(1024,),
                  input_dtype="float32", source="test")


def gpu(stages: dict[str, tuple[float, float, float]]) -> DeviceModel:
    """A GPU with three different peaks; the K-FAC stages (not in these traces) at 1."""
    stages = {**{k: (1.0, 1.0, 0.0) for k in STAGE_KINDS}, **stages}
    return DeviceModel(
        name="gpu", fp32_tflops=PEAK_TFLOPS["fp32"], tf32_tflops=PEAK_TFLOPS["tf32"],
        bf16_tflops=PEAK_TFLOPS["bf16"], mem_bandwidth_GBps=BANDWIDTH_GBPS, mode="additive",
        stages={k: StageEfficiency(efficiency=e, mem_efficiency=m, overhead_us=o,
                                   assumed=False) for k, (e, m, o) in stages.items()})


def closed_form_us(stage: str, batch: int, precision: str,
                   device: dict[str, tuple[float, float, float]] = TRUE) -> float:
    """One call of a whole-model stage of W in ``precision`` on the device whose
    (efficiency, memory efficiency, overhead) per stage are ``device``."""
    eff, mem, over = device[stage]
    if stage == "update":  # 4 FLOPs and 20 bytes per parameter, fp32, one fused call
        params = sum(l.params for l in W.layers) + W.other_params
        flops, nbytes, calls, peak = 4.0 * params, 20.0 * params, 1, PEAK_TFLOPS["fp32"]
    else:  # forward, backward: 1x and 2x the forward's FLOPs and traffic, a call per layer
        k = 1 if stage == "forward" else 2
        flops = k * batch * sum(l.fwd_flops_per_example for l in W.layers)
        nbytes = k * BYTES[precision] * sum(
            batch * (l.in_elems_per_example + l.out_elems_per_example) + l.params
            for l in W.layers)
        calls, peak = len(W.layers), PEAK_TFLOPS[precision]
    return over * calls + flops / (peak * 1e6 * eff) + nbytes / (BANDWIDTH_GBPS * 1e3 * mem)


def run_json(batch: int, precision: str | None) -> dict:
    run = {"workload": "w", "workload_options": {}, "optimizer": "sgd", "strategy": "sgd",
           "batch_per_rank": batch, "world_size": 1, "steps": 3, "warmup": 1,
           "threads_per_rank": 1, "device": {"kind": "gpu", "name": "test gpu"},
           "factor_interval": 1, "inverse_interval": 1, "inverse_method": "eigen",
           "comm_dtype": "fp32", "symmetric": False, "bucket_cap_mb": 25.0}
    if precision is not None:  # a trace recorded before --precision existed has none
        tf32 = precision != "fp32"
        run.update(precision=precision, precision_flags={
            "matmul_tf32": tf32, "cudnn_tf32": tf32,
            "autocast": "bfloat16" if precision == "bf16" else None})
    return run


def synthetic_trace(batch: int, precision: str | None, *, scale: float = 1.0) -> Trace:
    """An SGD trace of W, every step timed by the closed form times ``scale`` (a slow
    warm-up step first)."""
    cols = ("rank", "step", "stage", "layer", "lane", "start_us", "dur_us", "bytes", "flops")
    rows: dict[str, list] = {k: [] for k in cols}
    now = 0.0
    for step in range(4):
        start = now
        for stage in ("forward", "backward", "update"):
            dur = closed_form_us(stage, batch, precision or "fp32") * scale * (
                3.0 if step == 0 else 1.0)
            for k, v in zip(cols, (0, step, stage, "", "compute", now, dur, 0, 0.0)):
                rows[k].append(v)
            now += dur
        for k, v in zip(cols, (0, step, "step", "", "compute", start, now - start, 0, 0.0)):
            rows[k].append(v)
    return Trace(path=Path(f"synthetic/w-{precision}-b{batch}"), run=run_json(batch, precision),
                 events=events_frame(rows))


def null_cluster() -> ClusterModel:
    algos = {"all_reduce": "ring", "reduce_scatter": "ring", "all_gather": "ring",
             "broadcast": "tree"}
    tier = Tier(alpha_us=1.0, bandwidth_GBps=1.0, algorithms=algos)
    return ClusterModel(name="x", gpus_per_node=1, intra=tier, inter=tier,
                        multi_node={op: "flat" for op in OPS})


def predicted(cal, batch: int, precision: str | None) -> dict[str, float]:
    calibration = Calibration(device=cal.device, cluster=null_cluster(), fit=cal, traces=())
    got = predict(run_json(batch, precision), calibration, workloads=lambda run, label: W)
    return {"step": got.step_us["plain"], **got.stage_us["plain"]}


def test_runs_in_two_precisions_calibrate_to_one_set_of_efficiencies():
    """fp32 and bf16 traces of one workload fit the TRUE efficiencies exactly, each against
    its own peak; each precision's prediction at a new batch is the closed form at its own
    peak.  (Fitted against the fp32 peak, the bf16 traces' faster forward and backward
    would contradict the fp32 ones: no exact fit, and one prediction for both.)"""
    traces = [synthetic_trace(b, p) for b in (8, 64) for p in ("fp32", "bf16")]
    cal = fit_device_model(traces, workloads={"w": W}, base=gpu({k: (1, 1, 0) for k in TRUE}),
                           name="fitted")
    for kind in ("forward", "backward"):
        got = cal.device.stage(kind)
        assert (got.efficiency, got.mem_efficiency, got.overhead_us) == pytest.approx(
            TRUE[kind], rel=1e-5), kind
    # the update's work does not change with batch or precision: any split reproduces it
    assert all(cal.fits[kind].max_rel_error < 1e-6 for kind in TRUE)
    # measured times name no precision: with two precisions none are kept
    assert cal.device.measured == () and cal.measured_dtypes is None
    assert any("several precisions" in n for n in cal.notes)
    for precision in ("fp32", "bf16"):
        got = predicted(cal, 32, precision)
        for stage in TRUE:
            assert got[stage] == pytest.approx(closed_form_us(stage, 32, precision),
                                               rel=1e-5), (precision, stage)
        assert got["step"] == pytest.approx(sum(closed_form_us(s, 32, precision) for s in TRUE),
                                            rel=1e-5)
    fwd = {p: predicted(cal, 32, p)["forward"] for p in ("fp32", "bf16")}
    assert fwd["bf16"] < 0.7 * fwd["fp32"]  # its own, higher peak and half the bytes


def test_measured_times_apply_to_runs_of_their_precision_only():
    """Calibrated on bf16 traces alone (batch 32 measured 10% off the model's line), the
    [[measured]] times are kept and say bf16: a bf16 run at batch 32 is predicted at its
    measured time, and an old trace without ``precision`` (fp32) from the fitted
    efficiencies at the fp32 peak, not scaled to the bf16 measurement."""
    traces = [synthetic_trace(b, "bf16", scale=1.1 if b == 32 else 1.0) for b in (8, 32, 64)]
    cal = fit_device_model(traces, workloads={"w": W}, base=gpu({k: (1, 1, 0) for k in TRUE}),
                           name="bf16")
    assert cal.measured_dtypes == RunDtypes(dtype="bf16", kfac_dtype="tf32")
    assert len(cal.device.measured) == 3 * 3
    assert any("bf16 (K-FAC tf32) runs" in n for n in cal.notes)
    fitted = {k: (cal.device.stage(k).efficiency, cal.device.stage(k).mem_efficiency,
                  cal.device.stage(k).overhead_us) for k in TRUE}
    bf16 = predicted(cal, 32, "bf16")
    old = predicted(cal, 32, None)
    for stage in TRUE:
        assert bf16[stage] == pytest.approx(1.1 * closed_form_us(stage, 32, "bf16"),
                                            rel=1e-5), stage
        assert old[stage] == pytest.approx(closed_form_us(stage, 32, "fp32", fitted),
                                           rel=1e-5), stage
    # the fitted line misses batch 32 by a few percent: the measurement mattered above
    assert bf16["forward"] > 1.01 * closed_form_us("forward", 32, "bf16", fitted)


def test_run_dtypes_from_run_json():
    h200 = gpu(TRUE)
    assert run_dtypes({}, h200) == RunDtypes(dtype="fp32", kfac_dtype="fp32")  # old trace
    assert run_dtypes(run_json(8, "fp32"), h200) == RunDtypes()
    assert run_dtypes(run_json(8, "tf32"), h200) == RunDtypes(dtype="tf32", kfac_dtype="tf32")
    assert run_dtypes(run_json(8, "bf16"), h200) == RunDtypes(dtype="bf16", kfac_dtype="tf32")
    no_flags = {"precision": "bf16"}
    assert run_dtypes(no_flags, h200) == RunDtypes(dtype="bf16", kfac_dtype="tf32")
    # a CPU has no TF32: the switch changes nothing there
    cpu = base_device_for({"device": {"name": "cpu"}, "threads_per_rank": 1})
    assert run_dtypes(run_json(8, "tf32"), cpu) == RunDtypes()
    assert run_dtypes(run_json(8, "bf16"), cpu) == RunDtypes(dtype="bf16", kfac_dtype="fp32")
    with pytest.raises(ValueError, match=r"^t: run.json: unknown precision .fp16.; use one of"):
        run_dtypes({"precision": "fp16"}, h200, label="t")
    no_bf16 = DeviceModel(name="old", fp32_tflops=1.0, tf32_tflops=0.0, bf16_tflops=0.0,
                          mem_bandwidth_GBps=1.0, stages=h200.stages)
    with pytest.raises(ValueError, match="device 'old' has no bf16 rate"):
        run_dtypes({"precision": "bf16"}, no_bf16, label="t")
