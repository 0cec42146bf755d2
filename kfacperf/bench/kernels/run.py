"""Every kernel timing of a plan in one call (:func:`run_all`, which writes
``kernels.json``), the device it ran on, and a few lines summarising the report."""
from __future__ import annotations

import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from kfacperf.bench.kernels.factors import network_layer_shapes, time_factors
from kfacperf.bench.kernels.gemm import time_gemm
from kfacperf.bench.kernels.inverses import time_cholesky, time_eigh
from kfacperf.bench.kernels.plan import DRY_PLAN, FULL_PLAN, Budget, KernelPlan
from kfacperf.bench.kernels.records import OUTPUT_FILE, Report, Skipped, write_json
from kfacperf.bench.kernels.timing import call_timer

_T = TypeVar("_T")


def describe_device(device: Any) -> dict[str, Any]:
    """torch, CUDA and cuDNN versions and the device's name, capability and memory."""
    import platform

    import torch

    info: dict[str, Any] = {
        "type": getattr(device, "type", str(device)),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "cudnn_version": (torch.backends.cudnn.version()
                          if torch.backends.cudnn.is_available() else None),
        "python_version": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
    }
    if info["type"] == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            name=props.name, capability=list(torch.cuda.get_device_capability(device)),
            memory_total_mib=props.total_memory / 2**20,
            multiprocessors=props.multi_processor_count,
            preferred_linalg_library=str(torch.backends.cuda.preferred_linalg_library()),
        )
    else:
        info["name"] = platform.processor() or platform.machine()
    return info


def default_device() -> Any:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def run_all(out_dir: str | Path, *, dry_run: bool = False, budget_s: float | None = None,
            device: Any = None, plan: KernelPlan | None = None,
            log: Callable[[str], None] = print) -> Report:
    """Every measurement of ``plan`` (default: :data:`DRY_PLAN` or :data:`FULL_PLAN`) on
    ``device``; writes ``out_dir/kernels.json`` and returns the report.

    The file is rewritten after every group of measurements (eigh, Cholesky, factors, GEMM
    per dtype), so what was timed survives a budget cut, a stopped process or a later
    group's failure; a group that raises is recorded in ``skipped`` with its error, and
    the groups after it still run.  The groups run in order of worth under a budget cut:
    the inverses per dtype (``plan.inverse_dtypes`` in order, float64 first), then the
    factors, then the GEMMs."""
    t0 = time.monotonic()
    device = default_device() if device is None else device
    plan = plan or (DRY_PLAN if dry_run else FULL_PLAN)
    budget = Budget(budget_s)
    timer, clock = call_timer(device)
    report = Report(device=describe_device(device), clock=clock, dry_run=dry_run, plan=plan)
    path = Path(out_dir) / OUTPUT_FILE

    def step(label: str, into: list[_T], fn: Callable[[], list[_T]]) -> None:
        s0 = time.monotonic()
        try:
            got = fn()
        except Exception as exc:  # one group failing never costs the others
            reason = f"failed: {type(exc).__name__}: {exc}".splitlines()[0]
            report.skipped.append(Skipped(measurement=label, what="every size",
                                          reason=reason))
            log(f"  kernels: {label}: {reason}")
        else:
            into.extend(got)
            log(f"  kernels: {label}: {len(got)} record(s) in {time.monotonic() - s0:.1f} s")
        report.elapsed_s = time.monotonic() - t0
        write_json(path, report.to_json())

    for dtype in plan.inverse_dtypes:  # a dtype's inverses whole before the next dtype's
        step(f"eigh {dtype}", report.eigh, functools.partial(
            time_eigh, plan.inverse_sizes, dtype=dtype, device=device, timer=timer, plan=plan,
            budget=budget, skipped=report.skipped))
        step(f"cholesky {dtype}", report.cholesky, functools.partial(
            time_cholesky, plan.inverse_sizes, dtype=dtype, device=device, timer=timer,
            plan=plan, budget=budget, skipped=report.skipped))
    step("factors", report.factors, lambda: time_factors(
        network_layer_shapes(plan.factor_layers, image_size=plan.image_size),
        batches=plan.factor_batches, precisions=plan.factor_precisions, device=device,
        timer=timer, plan=plan, budget=budget, skipped=report.skipped))
    step("gemm", report.gemm, lambda: time_gemm(
        plan.gemm_sizes, precisions=plan.gemm_precisions, device=device, timer=timer,
        plan=plan, budget=budget, skipped=report.skipped))
    for s in report.skipped:
        log(f"  kernels: skipped {s.measurement} {s.what}: {s.reason}")
    return report


def summary_lines(report: Report) -> list[str]:
    """A few lines for a terminal: eigh and spd_inverse per size, GEMM rates."""
    lines = []
    for name, rows in (("eigh", report.eigh),
                       ("cholesky (spd_inverse)", [r for r in report.cholesky
                                                   if r.op == "spd_inverse"])):
        for dtype in sorted({r.dtype for r in rows}):
            cells = ", ".join(f"{r.n}: {r.timing.median_us / 1e3:.3g} ms" for r in rows
                              if r.dtype == dtype)
            lines.append(f"{name} {dtype}: {cells}")
    for prec in sorted({g.precision for g in report.gemm}):
        cells = ", ".join(f"{g.n}: {g.tflops:.1f}" for g in report.gemm if g.precision == prec)
        lines.append(f"gemm {prec} TFLOP/s: {cells}")
    if report.factors:
        slowest = max(report.factors, key=lambda f: f.timing.median_us)
        lines.append(f"factors: {len(report.factors)} records; slowest {slowest.layer} "
                     f"batch {slowest.batch} {slowest.precision}: "
                     f"{slowest.timing.median_us / 1e3:.3g} ms")
    return lines
