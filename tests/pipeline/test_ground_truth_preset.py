"""kfacperf.pipeline.ground_truth.preset and finish's last step: the GPU preset with what the
ground truth measured folded in, checked term by term against the fitted model, the kernel
timings' known terms and the preset it came from."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest

from kfacperf.calibrate.kernels import fit_inverse_kernels
from kfacperf.pipeline.ground_truth.landed import Finished, TraceResult
from kfacperf.pipeline.ground_truth.preset import (
    carry_to_sibling,
    fold_into_preset,
    sibling_presets,
    with_reported_memory,
)
from kfacperf.pipeline.ground_truth.preset_landing import fold_preset
from kfacperf.sim.costs.model import CostModel
from kfacperf.sim.models import load_cluster, load_device, load_workload
from kfacperf.sim.models.device import StageEfficiency, load_device_model, save_device_model

SIZES = (64, 256, 1024, 4096)


def cholesky_timings(o: float, r: float, eff: float, peak_per_us: float) -> dict:
    """kernels.json's spd_inverse records of inverses taking o + r n + n^3 / (peak eff)."""
    return {"cholesky": [{"op": "spd_inverse", "n": n, "dtype": "fp64",
                          "timing": {"median_us": o + r * n + n ** 3 / (peak_per_us * eff)}}
                         for n in SIZES]}


def fitted_h200():
    """What calibrating on H200 traces gives: some stages fitted, the rest still assumed."""
    h200 = load_device("h200")
    fit = {"forward": StageEfficiency(efficiency=0.41, mem_efficiency=0.2, overhead_us=7.0,
                                      assumed=False),
           "backward": StageEfficiency(efficiency=0.52, mem_efficiency=0.3, overhead_us=9.0,
                                       assumed=False),
           "inverse": StageEfficiency(efficiency=0.02, mem_efficiency=0.5, overhead_us=900.0,
                                      row_us=4.0, assumed=False)}
    return replace(h200.with_stages(**fit), name="h200-bf16",
                   capture_overhead={"forward": 0.1, "backward": 0.2},
                   layer_host_us={"load_grad": 35.0, "write_grad": 20.0},
                   source="kfacperf calibrate ...")


def test_fitted_terms_replace_the_assumed_ones_and_nothing_else():
    preset, fitted = load_device("h200"), fitted_h200()
    peak = preset.peak_flops_per_us("fp32")
    fit = fit_inverse_kernels(cholesky_timings(250.0, 1.5, 0.2, peak), preset,
                              method="cholesky")
    folded = fold_into_preset(preset, fitted, fitted_from="traces/h200/bf16",
                              kernel_fits=[fit])
    assert folded.name == "h200" and folded.memory_GB == preset.memory_GB
    assert folded.peaks == preset.peaks and len(preset.peaks) == 4
    for k in ("forward", "backward", "inverse"):
        assert folded.stages[k] == fitted.stages[k] and not folded.stages[k].assumed
    for k in ("factor_compute", "precondition", "update"):
        assert folded.stages[k] == preset.stages[k] and folded.stages[k].assumed
    chol = folded.inverse_methods["cholesky"]
    assert (chol.overhead_us, chol.row_us, chol.efficiency, chol.assumed) == (
        pytest.approx(500.0, rel=1e-5), pytest.approx(1.5, rel=1e-5),
        pytest.approx(0.2, rel=1e-5), False)  # two decompositions per layer call
    assert folded.capture_overhead == fitted.capture_overhead
    assert folded.layer_host_us == fitted.layer_host_us
    assert folded.measured == ()
    assert "stages forward, backward, inverse fitted to traces/h200/bf16" in folded.source
    assert "inverse_method.cholesky fitted to kernels.json (fp64, sizes 64-4096)" in folded.source
    assert "stages factor_compute, precondition, update as before (assumed)" in folded.source
    assert folded.source.startswith("peak rates and memory bandwidth: the NVIDIA datasheet")


def test_the_folded_preset_prices_a_step_with_the_fitted_terms(tmp_path):
    preset, fitted = load_device("h200"), fitted_h200()
    path = save_device_model(fold_into_preset(preset, fitted, fitted_from="t"),
                             tmp_path / "h200.toml")
    folded = load_device_model(path)
    workload, cluster = load_workload("resnet50"), load_cluster("dgx-h100-ndr")

    def stage_us(device, stage, **options):
        model = CostModel(workload=workload, device=device, cluster=cluster, dtype="bf16",
                          **options)
        return sum(model.compute_us(stage, layer, batch=32) for layer in workload.layers)

    for stage, options in (("forward", {}), ("inverse", {"inverse_method": "eigen"})):
        assert stage_us(folded, stage, **options) == pytest.approx(
            stage_us(fitted, stage, **options), rel=1e-9)
        assert stage_us(folded, stage, **options) != pytest.approx(
            stage_us(preset, stage, **options), rel=1e-3)
    assert stage_us(folded, "update") == pytest.approx(stage_us(preset, "update"), rel=1e-9)


def test_a_model_fitted_at_other_peaks_is_refused():
    preset = load_device("h200")
    other = replace(fitted_h200(), bf16_tflops=312.0)
    with pytest.raises(ValueError, match="bf16_tflops 312 vs 989.4"):
        fold_into_preset(preset, other, fitted_from="t")


def test_finish_writes_the_preset_from_bf16_and_the_kernel_timings(tmp_path):
    into = tmp_path / "h200"
    into.mkdir()
    preset = load_device("h200")
    kernels = cholesky_timings(250.0, 1.5, 0.2, preset.peak_flops_per_us("fp32"))
    (into / "kernels.json").write_text(json.dumps(kernels))
    tf32 = replace(fitted_h200(), stages={**fitted_h200().stages, "forward": StageEfficiency(
        efficiency=0.9, mem_efficiency=0.9, overhead_us=1.0, assumed=False)})
    done = Finished(into=into, gpu=True, device_files={
        "tf32": save_device_model(tf32, into / "h200-tf32.toml"),
        "bf16": save_device_model(fitted_h200(), into / "h200-bf16.toml")})
    said: list[str] = []
    fold_preset(done, "h200", said.append)
    folded = load_device(into / "h200-preset.toml")
    assert folded.stages["forward"].efficiency == pytest.approx(0.41)  # bf16's, not tf32's
    assert folded.inverse_methods["cholesky"].row_us == pytest.approx(1.5, rel=1e-5)
    assert said == ["preset: h200-preset.toml, models/devices/h200.toml with the bf16 fit and "
                    "the cholesky kernel terms; review, then copy it over the preset",
                    "preset: h100-sxm5-preset.toml, models/devices/h100-sxm5.toml with the "
                    "terms measured on h200 carried over (the same compute peaks; still "
                    "assumed there)"]
    h100 = load_device(into / "h100-sxm5-preset.toml")
    assert h100.stages["forward"] == replace(folded.stages["forward"], assumed=True)
    assert "measured on h200 (" in h100.source and str(tmp_path) not in h100.source


def test_the_preset_takes_the_memory_the_traced_gpu_reported(tmp_path):
    into = tmp_path / "h200"
    run = into / "bf16" / "resnet50-sgd-b32"
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"device": {"memory_total_mib": 143771.0}}))
    done = Finished(into=into, gpu=True, device_files={
        "bf16": save_device_model(fitted_h200(), into / "h200-bf16.toml")})
    done.traces.append(TraceResult(name=run.name, precision="bf16", role="calibration",
                                   batch=32, path=run, checks={}, problems=[]))
    said: list[str] = []
    fold_preset(done, "h200", said.append)
    folded = load_device(into / "h200-preset.toml")
    assert folded.memory_GB == pytest.approx(143771 * 2**20 / 1e9, abs=0.05)  # 150.8
    assert "143,771 MiB in all" in folded.memory_source and "run.json" in folded.memory_source
    assert said[0] == ("preset: memory 150.8 GB, the 143,771 MiB the GPU reported (was 141 GB "
                       "from the datasheet)")
    with pytest.raises(ValueError, match="no capacity"):
        with_reported_memory(folded, 0.0, where="x")


def test_finish_says_why_no_preset_is_folded(tmp_path):
    said: list[str] = []
    fold_preset(Finished(into=tmp_path, gpu=True), "h200", said.append)
    assert said == ["preset: not folded (no precision was validated)"]
    done = Finished(into=tmp_path, gpu=True, device_files={
        "bf16": save_device_model(fitted_h200(), tmp_path / "gpu-bf16.toml")})
    fold_preset(done, "gpu", said.append)
    assert said[1].startswith("preset: not folded (unknown device preset 'gpu'")
    assert not list(tmp_path.glob("*-preset.toml"))


def folded_h200():
    preset = load_device("h200")
    fit = fit_inverse_kernels(cholesky_timings(250.0, 1.5, 0.2, preset.peak_flops_per_us("fp32")),
                              preset, method="cholesky")
    return fold_into_preset(preset, fitted_h200(), fitted_from="t", kernel_fits=[fit])


def test_what_an_h200_measured_carries_to_the_h100_as_assumptions():
    folded, h100 = folded_h200(), load_device("h100-sxm5")
    assert [s.name for s in sibling_presets(folded)] == ["h100-sxm5"]  # one GH100 die
    carried = carry_to_sibling(folded, h100, measured_on="traces/h200/bf16")
    # the H100's own identity: name, memory, bandwidth, peaks
    assert (carried.name, carried.memory_GB, carried.peaks, carried.description) == (
        "h100-sxm5", h100.memory_GB, h100.peaks, h100.description)
    for k in ("forward", "backward", "inverse"):  # the measured terms, now assumptions
        assert carried.stages[k] == replace(folded.stages[k], assumed=True)
    for k in ("factor_compute", "precondition", "update"):  # what nothing measured
        assert carried.stages[k] == h100.stages[k]
    assert carried.inverse_methods["cholesky"] == replace(
        folded.inverse_methods["cholesky"], assumed=True)
    assert (carried.capture_overhead, carried.layer_host_us) == (
        folded.capture_overhead, folded.layer_host_us)
    assert all(s.assumed for s in carried.stages.values())
    assert ("stages forward, backward, inverse, inverse_method.cholesky, capture overhead and "
            "host work per layer measured on h200 (traces/h200/bf16) and carried over, "
            "assumed: the same compute peaks, memory bandwidth 3350 GB/s here against 4800 "
            "there") in carried.source
    assert carried.source.startswith("peak rates and memory bandwidth: the NVIDIA datasheet")


def test_a_carried_preset_prices_like_the_measured_gpu_but_for_memory_bandwidth():
    folded = folded_h200()
    carried = carry_to_sibling(folded, load_device("h100-sxm5"), measured_on="t")
    workload, cluster = load_workload("resnet50"), load_cluster("dgx-h100-ndr")

    def stage_us(device, stage, **options):
        model = CostModel(workload=workload, device=device, cluster=cluster, dtype="bf16",
                          **options)
        return sum(model.compute_us(stage, layer, batch=32) for layer in workload.layers)

    same_memory = replace(carried, mem_bandwidth_GBps=folded.mem_bandwidth_GBps)
    ratio = folded.mem_bandwidth_GBps / carried.mem_bandwidth_GBps
    for stage, options in (("forward", {}), ("backward", {}),
                           ("inverse", {"inverse_method": "cholesky"})):
        there = stage_us(folded, stage, **options)
        assert stage_us(same_memory, stage, **options) == pytest.approx(there, rel=1e-12)
        # slower memory: memory-bound work takes longer, by at most the bandwidth ratio
        here = stage_us(carried, stage, **options)
        assert there <= here <= there * ratio
        # ResNet-50's forward and backward at batch 32 hold memory-bound layers; the
        # Cholesky inverse is compute-bound
        assert (here > there * 1.001) == (stage != "inverse")


def test_only_a_sibling_gets_carried_terms_and_never_over_its_own_fits():
    folded = folded_h200()
    with pytest.raises(ValueError, match="compute peaks differ .*bf16_tflops 312 vs 989.4"):
        carry_to_sibling(folded, load_device("a100-sxm4"), measured_on="t")
    with pytest.raises(ValueError, match="the same device"):
        carry_to_sibling(folded, load_device("h200"), measured_on="t")
    own = StageEfficiency(efficiency=0.33, mem_efficiency=0.4, overhead_us=3.0, assumed=False)
    h100 = load_device("h100-sxm5").with_stages(forward=own)
    carried = carry_to_sibling(folded, h100, measured_on="t")
    assert carried.stages["forward"] == own
    assert carried.stages["backward"] == replace(folded.stages["backward"], assumed=True)
    assert "stages backward, inverse," in carried.source
