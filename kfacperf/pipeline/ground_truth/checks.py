"""What a finished profile run's trace says: what it recorded (clock, telemetry, precision),
whether its stages add up to its steps, what a GPU trace lacks, and its step times
(:mod:`kfacperf.trace.measure`'s definition)."""
from __future__ import annotations

import math
from typing import Any

from kfacperf import vocab as S
from kfacperf.calibrate.host_gaps import step_host_gaps
from kfacperf.trace.coverage import coverage
from kfacperf.trace.measure import measure, measured_events, run_step_kind, step_times

TELEMETRY_QUANTITIES: dict[str, tuple[str, ...]] = {
    "power": ("power_w",),
    "clocks": ("sm_clock_mhz", "mem_clock_mhz"),
    "memory": ("mem_used_mib",),
    "utilisation": ("gpu_util_pct", "mem_util_pct"),
}
"""What a GPU trace's telemetry must hold, each by the columns that measure it."""


def trace_checks(trace: Any) -> dict[str, Any]:
    """What a trace says it recorded: its clock, NVTX backend, telemetry (samples, and per
    quantity the rows that measured it), precision, and how its stages cover its steps."""
    tel = trace.telemetry
    return {"timing": trace.run.get("timing"), "nvtx": trace.run.get("nvtx"),
            "precision": trace.run.get("precision"),
            "telemetry_samples": 0 if tel is None else int(len(tel)),
            "telemetry_rows": telemetry_rows(tel),
            "device_name": (trace.run.get("device") or {}).get("name"),
            "coverage": coverage_checks(trace)}


def telemetry_rows(telemetry: Any) -> dict[str, int]:
    """Per quantity of :data:`TELEMETRY_QUANTITIES`: the samples in which every column of it
    holds a number (0 without telemetry)."""
    if telemetry is None or len(telemetry) == 0:
        return dict.fromkeys(TELEMETRY_QUANTITIES, 0)
    out = {}
    for quantity, columns in TELEMETRY_QUANTITIES.items():
        present = [c for c in columns if c in telemetry.columns]
        out[quantity] = 0 if len(present) < len(columns) else int(
            telemetry[present].notna().all(axis=1).sum())
    return out


def coverage_checks(trace: Any) -> dict[str, Any]:
    """:func:`kfacperf.trace.coverage.coverage` of the trace, with, for a K-FAC run, the share
    of the step spent in the preconditioner's work between stages (forming and writing back
    the gradients: the device model's ``layer_host_us``, which the simulator adds)."""
    cov = coverage(trace)
    out = cov.to_dict()
    host = math.nan
    if trace.run.get("optimizer") != S.SGD:
        gaps = step_host_gaps(measured_events(trace))
        if len(gaps):
            steps = cov.steps.set_index(["rank", "step"])["step_us"]
            joined = gaps.set_index(["rank", "step"]).join(steps, how="inner")
            if len(joined):
                share = 100.0 * joined[["load_grad", "write_grad"]].sum(axis=1) / joined[
                    "step_us"]
                host = float(share.median())
    out["median_host_work_pct"] = host if math.isfinite(host) else None
    return out


def check_problems(checks: dict[str, Any], *, gpu: bool) -> list[str]:
    """What a GPU trace lacks: CUDA-event timing, NVML telemetry of every quantity, and
    stages that add up to the step."""
    if not gpu:
        return []
    problems = []
    if checks.get("timing") != "cuda_events":
        problems.append(f"timed by {checks.get('timing')}, not CUDA events")
    if not checks.get("telemetry_samples"):
        problems.append("no NVML telemetry")
    else:
        rows = checks.get("telemetry_rows") or {}
        missing = [q for q in TELEMETRY_QUANTITIES if not rows.get(q)]
        if missing:
            problems.append(f"telemetry without {', '.join(missing)}")
    cov = checks.get("coverage") or {}
    host = cov.get("median_host_work_pct")
    for line in cov.get("problems", []):
        problems.append(line + (f"; {host:.1f}% is the preconditioner's work between stages, "
                                "which the model adds" if host is not None and "no stage" in line
                                else ""))
    return problems


def run_step_times(trace: Any) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Per kind of step: every step's time (µs, warm-up included: what the estimates learn
    from) and the run's step time (ms, the median over the measured steps)."""
    every: dict[str, list[float]] = {}
    for step, us in step_times(trace.events).items():
        every.setdefault(run_step_kind(int(step), trace.run), []).append(float(us))
    return every, {kind: us / 1e3 for kind, us in measure(trace).step_us.items()}
