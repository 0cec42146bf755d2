"""What a finished profile run's trace says: what it recorded (clock, telemetry, precision),
what a GPU trace lacks, and its step times (:mod:`kfacperf.trace.measure`'s definition)."""
from __future__ import annotations

from typing import Any

from kfacperf.trace.measure import measure, run_step_kind, step_times


def trace_checks(trace: Any) -> dict[str, Any]:
    """What a trace says it recorded: its clock, telemetry samples and precision."""
    tel = trace.telemetry
    return {"timing": trace.run.get("timing"), "precision": trace.run.get("precision"),
            "telemetry_samples": 0 if tel is None else int(len(tel)),
            "device_name": (trace.run.get("device") or {}).get("name")}


def check_problems(checks: dict[str, Any], *, gpu: bool) -> list[str]:
    """What a GPU trace lacks: CUDA-event timing and NVML telemetry."""
    if not gpu:
        return []
    problems = []
    if checks.get("timing") != "cuda_events":
        problems.append(f"timed by {checks.get('timing')}, not CUDA events")
    if not checks.get("telemetry_samples"):
        problems.append("no NVML telemetry")
    return problems


def run_step_times(trace: Any) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Per kind of step: every step's time (µs, warm-up included: what the estimates learn
    from) and the run's step time (ms, the median over the measured steps)."""
    every: dict[str, list[float]] = {}
    for step, us in step_times(trace.events).items():
        every.setdefault(run_step_kind(int(step), trace.run), []).append(float(us))
    return every, {kind: us / 1e3 for kind, us in measure(trace).step_us.items()}
