"""Device information for ``run.json`` and a background NVML telemetry sampler.

Without an NVIDIA driver (or without a GPU) nothing here raises: :func:`device_info` says so
in its ``nvml`` field and describes the CPU instead, and :class:`TelemetrySampler` does not
start.  NVML is queried from its own thread, never from the timed code.
"""
from __future__ import annotations

import math
import os
import platform
import socket
import threading
import time
from typing import Any

from kfacperf.profiler.row_sink import RowSink
from kfacperf.trace.schema import TELEMETRY_COLUMNS

DEFAULT_INTERVAL_S = 0.1
_FLUSH_EVERY_S = 1.0


def _import_nvml() -> Any:
    import pynvml

    return pynvml


def cpu_info() -> dict[str, Any]:
    """CPU model, logical threads, host name (from /proc/cpuinfo where there is one)."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "model": model,
        "threads": os.cpu_count(),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
    }


def _decode(v: Any) -> Any:
    return v.decode() if isinstance(v, bytes) else v


def _try(fn: Any, *args: Any, default: Any = None) -> Any:
    try:
        return fn(*args)
    except Exception:  # NVMLError_NotSupported and friends: this field is unknown
        return default


def nvml_handle(nvml: Any, device_index: int) -> Any:
    """The NVML handle of CUDA device ``device_index`` as this process numbers it.

    CUDA and NVML may number GPUs differently (CUDA_VISIBLE_DEVICES, CUDA_DEVICE_ORDER), so
    the device's UUID from torch is used when torch has CUDA; else CUDA_VISIBLE_DEVICES is
    mapped by hand; else the index is taken as NVML's.
    """
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        uuid = _try(lambda: str(torch.cuda.get_device_properties(device_index).uuid))
        if uuid:
            uuid = uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
            handle = _try(nvml.nvmlDeviceGetHandleByUUID, uuid)
            if handle is not None:
                return handle
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible:
        entries = [e.strip() for e in visible.split(",") if e.strip()]
        if device_index < len(entries):
            entry = entries[device_index]
            if entry.isdigit():
                return nvml.nvmlDeviceGetHandleByIndex(int(entry))
            return nvml.nvmlDeviceGetHandleByUUID(entry)
    return nvml.nvmlDeviceGetHandleByIndex(device_index)


def device_info(*, device_index: int | None = 0, nvml: Any = None) -> dict[str, Any]:
    """What ``run.json`` records under ``device``.

    ``kind`` is ``"gpu"`` when NVML describes device ``device_index`` (name, UUID, driver,
    compute capability, memory, max clocks, power limit), else ``"cpu"`` (also when
    ``device_index`` is None: a CPU run); ``nvml`` is ``"ok"`` or the reason there is no GPU
    information (e.g. "NVML Shared Library Not Found").  ``cpu`` is always there.
    """
    info: dict[str, Any] = {"kind": "cpu", "cpu": cpu_info(), "gpu": None}
    info["name"] = info["cpu"]["model"]
    try:
        nvml = nvml if nvml is not None else _import_nvml()
        nvml.nvmlInit()
    except Exception as exc:  # ImportError, NVMLError_LibraryNotFound, DriverNotLoaded, ...
        info["nvml"] = str(exc) or type(exc).__name__
        return info
    if device_index is None:  # a CPU run: say what NVML sees, describe no GPU
        count = _try(nvml.nvmlDeviceGetCount)
        info["nvml"] = f"ok; {count} GPU(s) present, none used"
        _try(nvml.nvmlShutdown)
        return info
    try:
        h = nvml_handle(nvml, device_index)
        mem = _try(nvml.nvmlDeviceGetMemoryInfo, h)
        cc = _try(nvml.nvmlDeviceGetCudaComputeCapability, h)
        power = _try(nvml.nvmlDeviceGetEnforcedPowerLimit, h)
        gpu = {
            "index": device_index,
            "name": _decode(_try(nvml.nvmlDeviceGetName, h)),
            "uuid": _decode(_try(nvml.nvmlDeviceGetUUID, h)),
            "driver": _decode(_try(nvml.nvmlSystemGetDriverVersion)),
            "compute_capability": list(cc) if cc else None,
            "memory_total_mib": mem.total / 2**20 if mem is not None else None,
            "max_sm_clock_mhz": _try(nvml.nvmlDeviceGetMaxClockInfo, h, nvml.NVML_CLOCK_SM),
            "max_mem_clock_mhz": _try(nvml.nvmlDeviceGetMaxClockInfo, h, nvml.NVML_CLOCK_MEM),
            "power_limit_w": power / 1000 if power is not None else None,
            "count": _try(nvml.nvmlDeviceGetCount),
        }
        info.update(kind="gpu", name=gpu["name"], gpu=gpu, nvml="ok")
    except Exception as exc:  # a GPU index NVML does not have, and the like
        info["nvml"] = f"{type(exc).__name__}: {exc}"
    finally:
        _try(nvml.nvmlShutdown)
    return info


class TelemetrySampler:
    """Samples one GPU every ``interval_s`` on a daemon thread into ``sink``.

    Rows follow :data:`kfacperf.trace.store.TELEMETRY_COLUMNS`; ``t_us`` is on the same clock and
    origin as the stage timer's events.  Buffered samples are written about every second and
    at :meth:`stop`.
    """

    def __init__(
        self,
        *,
        rank: int,
        device_index: int,
        sink: RowSink,
        origin_ns: int,
        interval_s: float = DEFAULT_INTERVAL_S,
        nvml: Any = None,
    ) -> None:
        if not interval_s > 0:
            raise ValueError(f"telemetry interval must be > 0 s, got {interval_s}")
        self.rank, self.device_index, self.sink = rank, device_index, sink
        self.origin_ns, self.interval_s = origin_ns, interval_s
        self._nvml = nvml
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.samples = 0
        self.error: str | None = None

    def start(self) -> bool:
        """Start sampling; False (and ``error`` set) when there is no NVML or no such GPU."""
        try:
            nvml = self._nvml if self._nvml is not None else _import_nvml()
            nvml.nvmlInit()
        except Exception as exc:
            self.error = str(exc) or type(exc).__name__
            return False
        try:
            handle = nvml_handle(nvml, self.device_index)
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            _try(nvml.nvmlShutdown)
            return False
        self._nvml = nvml
        self._thread = threading.Thread(
            target=self._run, args=(handle,), name="kfacperf-telemetry", daemon=True
        )
        self._thread.start()
        return True

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        _try(self._nvml.nvmlShutdown)

    def sample(self, handle: Any) -> dict[str, float]:
        nvml, nan = self._nvml, math.nan
        mem = _try(nvml.nvmlDeviceGetMemoryInfo, handle)
        util = _try(nvml.nvmlDeviceGetUtilizationRates, handle)
        power = _try(nvml.nvmlDeviceGetPowerUsage, handle)
        return {
            "sm_clock_mhz": _num(_try(nvml.nvmlDeviceGetClockInfo, handle, nvml.NVML_CLOCK_SM)),
            "mem_clock_mhz": _num(_try(nvml.nvmlDeviceGetClockInfo, handle, nvml.NVML_CLOCK_MEM)),
            "mem_used_mib": mem.used / 2**20 if mem is not None else nan,
            "power_w": power / 1000 if power is not None else nan,
            "gpu_util_pct": _num(getattr(util, "gpu", None)),
            "mem_util_pct": _num(getattr(util, "memory", None)),
            "temperature_c": _num(
                _try(nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU)
            ),
        }

    def _run(self, handle: Any) -> None:
        buf: dict[str, list[float]] = {c: [] for c in TELEMETRY_COLUMNS}
        last_flush = time.monotonic()
        while True:
            t = (time.perf_counter_ns() - self.origin_ns) / 1e3
            row = self.sample(handle)
            buf["rank"].append(self.rank)
            buf["gpu"].append(self.device_index)
            buf["t_us"].append(t)
            for k, v in row.items():
                buf[k].append(v)
            self.samples += 1
            stopping = self._stop.wait(self.interval_s)
            if stopping or time.monotonic() - last_flush >= _FLUSH_EVERY_S:
                try:
                    self.sink.append(buf)
                except Exception as exc:  # never take the run down for telemetry
                    self.error = f"writing telemetry failed: {exc}"
                    return
                buf = {c: [] for c in TELEMETRY_COLUMNS}
                last_flush = time.monotonic()
            if stopping:
                return


def _num(v: Any) -> float:
    return math.nan if v is None else float(v)
