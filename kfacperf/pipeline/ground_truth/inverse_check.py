"""The ground-truth run's two measurements of the inverse stage, side by side.

The kernel timings (``kernels.json``) time one decomposition at a time, alone on the device;
the K-FAC 1/1 traces time the optimizer's inverse stage inside training.  The decomposition
terms fitted to the first (:func:`kfacperf.calibrate.kernels.fit_inverse_kernels`) price the
workload's inverse step (:func:`~kfacperf.calibrate.kernels.kernel_inverse_us`); the traces
measured it.  The two agreeing says the device model's inverse terms can come from kernel
timings alone, on a GPU nobody has traced.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kfacperf import vocab as S


def kernel_inverse_check(kernels_path: Path, trace_paths: Sequence[Path],
                         say: Callable[[str], None]) -> dict[str, Any] | None:
    """Fit the eigendecomposition terms to ``kernels_path`` and compare the inverse step they
    price with the measured one of each trace whose measured steps invert; what was found,
    JSON-ready, or None without kernel timings or traces."""
    from kfacperf.calibrate.device import base_device_for
    from kfacperf.calibrate.kernels import fit_inverse_kernels, kernel_inverse_us
    from kfacperf.safety import load_json_file
    from kfacperf.sim.models import load_workload
    from kfacperf.trace.measure import measure
    from kfacperf.trace.store import load_trace

    if not kernels_path.is_file() or not trace_paths:
        return None
    traces = [load_trace(p) for p in trace_paths]
    device = base_device_for(traces[0].run)
    try:
        fit = fit_inverse_kernels(load_json_file(kernels_path, what="kernel timings"), device,
                                  method=S.EIGEN, dtype=S.FP64)
    except ValueError as exc:
        say(f"inverse from kernel timings: not fitted ({exc})")
        return None
    say(f"inverse from kernel timings on {device.name}'s peaks: {fit.text()}")
    rows = []
    for trace in traces:
        measured = measure(trace).stage_times().get(S.INVERSE, 0.0)
        if measured <= 0:
            continue
        priced = kernel_inverse_us(fit, device, load_workload(str(trace.run["workload"])))
        error = 100.0 * (priced - measured) / measured
        rows.append({"trace": Path(trace.path).name, "measured_ms": measured / 1e3,
                     "from_kernels_ms": priced / 1e3, "error_pct": error})
        say(f"  {Path(trace.path).name}: inverse step measured {measured / 1e3:.1f} ms, from "
            f"the kernel terms {priced / 1e3:.1f} ms ({error:+.1f}%)")
    return {"device": device.name, "method": fit.method, "dtype": fit.dtype,
            "decomposition_overhead_us": fit.decomposition_overhead_us, "row_us": fit.row_us,
            "efficiency": fit.efficiency, "sizes": list(fit.sizes),
            "rms_rel_error": fit.rms_rel_error, "max_rel_error": fit.max_rel_error,
            "traces": rows}
