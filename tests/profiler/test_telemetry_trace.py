"""NVML telemetry as a GPU run writes it: sampler -> per-rank part file -> compacted trace.

The unit tests of the sampler write into memory; a GPU run writes through the Arrow part
appender and compaction, which only a GPU run reaches.  Here the same path runs with a fake
NVML, and the loaded trace's telemetry table has the schema's columns and dtypes.
"""
from __future__ import annotations

import math
import time
from types import SimpleNamespace

from kfacperf.profiler.telemetry import TelemetrySampler
from kfacperf.runtime.config import ProfileConfig, run_record
from kfacperf.trace import parts as trace_parts
from kfacperf.trace.store import TELEMETRY_COLUMNS, TELEMETRY_DTYPES, load_trace, write_run


class Unsupported(Exception):
    pass


class H200Nvml:
    """The pynvml calls the sampler makes, answering like one H200 without temperature."""

    NVML_CLOCK_SM, NVML_CLOCK_MEM, NVML_TEMPERATURE_GPU = 1, 2, 0

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        pass

    def nvmlDeviceGetHandleByIndex(self, i):
        return "h0"

    def nvmlDeviceGetHandleByUUID(self, uuid):
        return "h0"

    def nvmlDeviceGetClockInfo(self, h, kind):
        return {1: 1980, 2: 3201}[kind]

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(total=141 * 2**30, used=20 * 2**30, free=121 * 2**30)

    def nvmlDeviceGetPowerUsage(self, h):
        return 512_000

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=99, memory=61)

    def nvmlDeviceGetTemperature(self, h, kind):
        raise Unsupported("not supported")


def test_sampled_telemetry_lands_in_the_trace_with_the_schema(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_run(run_dir, run_record(ProfileConfig(workload="mlp", out=str(run_dir)),
                                  world_size=1, batch_per_rank=8, device=None))
    events = trace_parts.event_appender(run_dir, 0)
    events.append({"rank": [0], "step": [0], "stage": ["step"], "layer": [""],
                   "lane": ["compute"], "start_us": [0.0], "dur_us": [10.0], "bytes": [0],
                   "flops": [0.0]})
    sink = trace_parts.telemetry_appender(run_dir, 0)
    origin = time.perf_counter_ns()
    sampler = TelemetrySampler(rank=0, device_index=0, sink=sink, origin_ns=origin,
                               interval_s=0.005, nvml=H200Nvml())
    assert sampler.start()
    deadline = time.monotonic() + 5
    while sampler.samples < 5 and time.monotonic() < deadline:
        time.sleep(0.005)
    sampler.stop()
    events.close()
    sink.close()
    assert sampler.error is None
    trace_parts.compact(run_dir)
    tel = load_trace(run_dir).telemetry
    assert tel is not None and len(tel) == sampler.samples >= 5
    assert list(tel.columns) == list(TELEMETRY_COLUMNS)
    assert {c: str(t) for c, t in tel.dtypes.items()} == TELEMETRY_DTYPES
    row = tel.iloc[0]
    assert (row["rank"], row["gpu"], row["sm_clock_mhz"], row["mem_clock_mhz"]) == (
        0, 0, 1980.0, 3201.0)
    assert (row["mem_used_mib"], row["power_w"]) == (20 * 1024.0, 512.0)
    assert (row["gpu_util_pct"], row["mem_util_pct"]) == (99.0, 61.0)
    assert math.isnan(row["temperature_c"])
    assert tel["t_us"].is_monotonic_increasing and tel["t_us"].iloc[0] >= 0
