"""Device info and the NVML sampler, with the real (driverless) NVML and a fake one."""
from __future__ import annotations

import math
import time
from types import SimpleNamespace

import pytest

from kfacperf.profiler.stage_timer import MemorySink
from kfacperf.profiler.telemetry import TelemetrySampler, _import_nvml, device_info
from kfacperf.trace.schema import TELEMETRY_COLUMNS, telemetry_frame


class NotSupported(Exception):
    pass


class FakeNvml:
    """The handful of pynvml calls we use, for one GPU whose power rises 1 W per sample."""

    NVML_CLOCK_SM, NVML_CLOCK_MEM, NVML_TEMPERATURE_GPU = 1, 2, 0

    def __init__(self) -> None:
        self.inits = self.shutdowns = 0
        self.power_mw = 100_000

    def nvmlInit(self):
        self.inits += 1

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetHandleByIndex(self, i):
        if i != 0:
            raise NotSupported(f"no GPU {i}")
        return "h0"

    def nvmlDeviceGetHandleByUUID(self, uuid):
        return "h0"

    def nvmlDeviceGetCount(self):
        return 1

    def nvmlDeviceGetName(self, h):
        return b"NVIDIA H200"

    def nvmlDeviceGetUUID(self, h):
        return "GPU-1234"

    def nvmlSystemGetDriverVersion(self):
        return "570.1"

    def nvmlDeviceGetCudaComputeCapability(self, h):
        return (9, 0)

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(total=141 * 2**30, used=2**30)

    def nvmlDeviceGetMaxClockInfo(self, h, kind):
        return {1: 1980, 2: 3201}[kind]

    def nvmlDeviceGetEnforcedPowerLimit(self, h):
        return 700_000

    def nvmlDeviceGetClockInfo(self, h, kind):
        return {1: 1755, 2: 3201}[kind]

    def nvmlDeviceGetPowerUsage(self, h):
        self.power_mw += 1000
        return self.power_mw

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=97, memory=40)

    def nvmlDeviceGetTemperature(self, h, kind):
        raise NotSupported("temperature")


def _nvml_available() -> bool:
    try:
        nvml = _import_nvml()
        nvml.nvmlInit()
        nvml.nvmlShutdown()
    except Exception:
        return False
    return True


@pytest.mark.skipif(_nvml_available(), reason="this machine has a working NVML driver")
def test_no_driver_is_recorded_not_raised():
    info = device_info()  # a machine without a driver: pynvml installed, no NVML library
    assert info["kind"] == "cpu" and info["gpu"] is None
    assert info["nvml"] != "ok" and info["nvml"]
    assert info["cpu"]["threads"] >= 1 and info["name"] == info["cpu"]["model"]
    sampler = TelemetrySampler(rank=0, device_index=0, sink=MemorySink(), origin_ns=0)
    assert sampler.start() is False and sampler.error
    sampler.stop()  # harmless


def test_device_info_from_nvml():
    nvml = FakeNvml()
    info = device_info(device_index=0, nvml=nvml)
    assert info["kind"] == "gpu" and info["nvml"] == "ok" and info["name"] == "NVIDIA H200"
    g = info["gpu"]
    assert (g["driver"], g["compute_capability"], g["memory_total_mib"]) == (
        "570.1", [9, 0], 141 * 1024)
    assert (g["max_sm_clock_mhz"], g["power_limit_w"]) == (1980, 700)
    assert nvml.inits == nvml.shutdowns == 1
    bad = device_info(device_index=3, nvml=FakeNvml())
    assert bad["kind"] == "cpu" and "no GPU 3" in bad["nvml"]


def test_sampler_writes_rows_on_the_timer_clock():
    nvml, sink = FakeNvml(), MemorySink()
    origin = time.perf_counter_ns()
    s = TelemetrySampler(rank=1, device_index=0, sink=sink, origin_ns=origin,
                         interval_s=0.01, nvml=nvml)
    assert s.start()
    deadline = time.monotonic() + 60  # however loaded the machine: wait for three samples
    while s.samples < 3 and time.monotonic() < deadline:
        time.sleep(0.005)
    s.stop()
    elapsed_us = (time.perf_counter_ns() - origin) / 1e3
    df = telemetry_frame(sink.columns())
    assert list(df.columns) == list(TELEMETRY_COLUMNS)
    assert len(df) == s.samples >= 3
    assert (df["rank"] == 1).all() and (df["gpu"] == 0).all()
    assert (df["t_us"].is_monotonic_increasing
            and 0 <= df["t_us"].iloc[0] <= df["t_us"].iloc[-1] <= elapsed_us)
    assert df["power_w"].tolist() == [101.0 + i for i in range(len(df))]
    assert (df["sm_clock_mhz"] == 1755).all() and (df["mem_used_mib"] == 1024).all()
    assert (df["gpu_util_pct"] == 97).all()
    assert df["temperature_c"].map(math.isnan).all()  # unsupported field -> NaN, no error
    assert nvml.shutdowns == 1


def test_cpu_run_on_a_gpu_host_describes_no_gpu():
    nvml = FakeNvml()
    info = device_info(device_index=None, nvml=nvml)
    assert info["kind"] == "cpu" and info["gpu"] is None
    assert info["nvml"] == "ok; 1 GPU(s) present, none used"
    assert nvml.inits == nvml.shutdowns == 1


def test_a_cuda_run_that_nvml_cannot_describe_is_still_a_gpu_run(monkeypatch):
    """NVML failing on a CUDA machine left run.json saying "cpu", and calibration then
    fitted the GPU's times against CPU peaks: the recorder describes the GPU through torch,
    keeps NVML's reason, and the calibration finds the GPU's preset by that name."""
    import torch

    from kfacperf.calibrate.device import base_device_for
    from kfacperf.runtime.recording import gpu_info_from_torch

    props = type("Props", (), {"name": "NVIDIA H200", "major": 9, "minor": 0,
                               "total_memory": 141 * 2**30})()
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    info = device_info(device_index=0, nvml=type("Down", (), {"nvmlInit": staticmethod(_raise)})())
    assert info["kind"] == "cpu"  # what NVML alone could say
    got = gpu_info_from_torch(info, 0)
    assert (got["kind"], got["name"], got["nvml"]) == ("gpu", "NVIDIA H200", "NVML down")
    assert got["gpu"]["compute_capability"] == [9, 0]
    assert got["gpu"]["memory_total_mib"] == 141 * 1024 and got["gpu"]["described_by"] == "torch"
    assert base_device_for({"device": got}).name == "h200"
    assert base_device_for({"device": info}).name == "cpu-nominal"


def _raise() -> None:
    raise RuntimeError("NVML down")
