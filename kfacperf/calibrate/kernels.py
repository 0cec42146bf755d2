"""The inverse stage's terms from isolated kernel timings (``kernels.json``).

``python -m kfacperf.bench.kernels`` times, on one device, the decomposition of one SPD
matrix of side n (``eigh``; Cholesky's ``spd_inverse``) for n from 64 to 8,192.  The device
model prices a layer's inverse as (:mod:`kfacperf.sim.costs.model`, roofline mode)::

    overhead_us + row_us (dA + dG) + sum over its two factors of max(c n^3 / (peak * eff), ...)

with ``c`` the method's FLOPs per n^3 (:data:`~kfacperf.sim.costs.stage_work.
INVERSE_FLOPS_PER_D3`) and ``peak`` the device's fp32 rate.  One decomposition of side n is
then ``o + row_us n + c n^3 / (peak eff)`` with ``o`` half the layer's overhead (a layer
decomposes two factors per call).  :func:`fit_inverse_kernels` fits ``o``, ``row_us`` and
``eff`` to the timings by least squares on relative errors, each term at least 0 and ``eff``
at most 1; the memory term (12 n^2 bytes) is left out, microseconds below every timing.

The result is an independent reference for the inverse stage that a calibration from traces
fits: :func:`kernel_inverse_us` prices a workload's inverse step with it.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from kfacperf import vocab as S
from kfacperf.calibrate.fitting import bounded_lstsq, sig
from kfacperf.sim.costs.stage_work import INVERSE_FLOPS_PER_D3
from kfacperf.sim.models.device import DeviceModel, StageEfficiency

KERNEL_OPS: dict[str, tuple[str, str]] = {S.EIGEN: ("eigh", "eigh"),
                                          S.CHOLESKY: ("cholesky", "spd_inverse")}
"""Per inverse method: the ``kernels.json`` list and the op that is one factor's inverse."""


@dataclass(frozen=True, kw_only=True)
class InverseKernelFit:
    """One method's per-decomposition terms, fitted to kernel timings of one dtype."""

    method: str
    dtype: str
    decomposition_overhead_us: float
    row_us: float
    efficiency: float
    sizes: tuple[int, ...]
    rms_rel_error: float
    max_rel_error: float

    def stage_efficiency(self) -> StageEfficiency:
        """The terms as the device model's ``[inverse_method.<method>]`` (per layer call: two
        decompositions, so twice the per-decomposition overhead)."""
        return StageEfficiency(efficiency=self.efficiency, mem_efficiency=1.0,
                               overhead_us=sig(2.0 * self.decomposition_overhead_us),
                               row_us=self.row_us, assumed=False)

    def predict_us(self, n: int, device: DeviceModel) -> float:
        """One decomposition of side ``n``, as fitted."""
        return (self.decomposition_overhead_us + self.row_us * n
                + INVERSE_FLOPS_PER_D3[self.method] * n ** 3
                / (device.peak_flops_per_us(S.FP32) * self.efficiency))

    def text(self) -> str:
        return (f"{self.method} ({self.dtype}, {len(self.sizes)} sizes {min(self.sizes)}-"
                f"{max(self.sizes)}): {self.decomposition_overhead_us:.1f} us + "
                f"{self.row_us:.3f} us/row + n^3 at {100 * self.efficiency:.3g}% of the fp32 "
                f"peak; rms error {100 * self.rms_rel_error:.1f}%, worst "
                f"{100 * self.max_rel_error:.1f}%")


def kernel_samples(report: Mapping[str, Any], method: str, dtype: str) -> list[tuple[int, float]]:
    """``(n, median µs)`` of one factor's inverse by ``method`` in ``dtype``, by size."""
    if method not in KERNEL_OPS:
        raise ValueError(f"no kernel timing for inverse method {method!r}; known: "
                         f"{', '.join(KERNEL_OPS)}")
    key, op = KERNEL_OPS[method]
    out = []
    for r in report.get(key) or []:
        if not isinstance(r, Mapping) or r.get("op", key) != op or r.get("dtype") != dtype:
            continue
        us = float((r.get("timing") or {}).get("median_us", float("nan")))
        if np.isfinite(us) and us > 0:
            out.append((int(r["n"]), us))
    return sorted(out)


def fit_inverse_kernels(report: Mapping[str, Any], device: DeviceModel, *,
                        method: str = S.EIGEN, dtype: str = S.FP64) -> InverseKernelFit:
    """Fit ``method``'s decomposition terms to ``report``'s timings in ``dtype`` (at least
    three sizes), against ``device``'s fp32 peak as the cost model prices them."""
    samples = kernel_samples(report, method, dtype)
    if len(samples) < 3:
        raise ValueError(f"{len(samples)} {method} timing(s) in {dtype}; the fit needs 3 sizes "
                         "or more")
    n = np.array([s[0] for s in samples], dtype=float)
    y = np.array([s[1] for s in samples], dtype=float)
    cubic = INVERSE_FLOPS_PER_D3[method] * n ** 3 / device.peak_flops_per_us(S.FP32)
    cols = np.column_stack([np.ones_like(n), n, cubic]) / y[:, None]  # relative errors
    scale = np.abs(cols).max(axis=0)
    x = bounded_lstsq(cols / scale, np.ones_like(y), np.array([0.0, 0.0, 1.0]) * scale) / scale
    rel = (np.column_stack([np.ones_like(n), n, cubic]) @ x - y) / y
    return InverseKernelFit(method=method, dtype=dtype, decomposition_overhead_us=sig(x[0]),
                            row_us=sig(x[1]), efficiency=sig(min(1.0, 1.0 / x[2])),
                            sizes=tuple(int(v) for v in n),
                            rms_rel_error=float(np.sqrt(np.mean(rel ** 2))),
                            max_rel_error=float(np.max(np.abs(rel))))


def kernel_inverse_us(fit: InverseKernelFit, device: DeviceModel, workload: Any,
                      layers: Sequence[str] | None = None) -> float:
    """A workload's inverse step (every K-FAC layer's two factors, or only ``layers``) priced
    with the kernel-fitted terms, as the cost model prices it."""
    from kfacperf.calibrate.device import null_cluster
    from kfacperf.sim.costs.model import CostModel

    dev = replace(device, measured=(), inverse_methods={
        **device.inverse_methods, fit.method: fit.stage_efficiency()})
    model = CostModel(workload=workload, device=dev, cluster=null_cluster(),
                      inverse_method=fit.method, use_measured=False)
    chosen = [l for l in workload.layers if layers is None or l.name in layers]
    return sum(model.compute_us(S.INVERSE, l, batch=1) for l in chosen)
