"""Which of a device's peak rates a profiled run computes at, from its ``run.json``: its
``precision`` for forward and backward, TF32 or not for K-FAC's float32 work.  Calibration
fits each trace against those peaks and validation predicts each run with them, so runs in
different precisions share one set of efficiencies.

This module never imports torch.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kfacperf import vocab as S
from kfacperf.sim.models.device import DeviceModel


@dataclass(frozen=True, kw_only=True)
class RunDtypes:
    """Which peak rates of a device a run's phases compute at: ``dtype`` for forward and
    backward (the :class:`~kfacperf.sim.costs.model.CostModel` option of that name),
    ``kfac_dtype`` for K-FAC's float32 work (factors, preconditioning)."""

    dtype: str = S.FP32
    kfac_dtype: str = S.FP32

    def cost_options(self) -> dict[str, str]:
        """The :class:`~kfacperf.sim.costs.model.CostModel` options."""
        return {"dtype": self.dtype, "kfac_dtype": self.kfac_dtype}

    def __str__(self) -> str:
        if self.dtype == self.kfac_dtype:
            return self.dtype
        return f"{self.dtype} (K-FAC {self.kfac_dtype})"


def run_dtypes(run: Mapping[str, Any], device: DeviceModel, *, label: str = "run") -> RunDtypes:
    """The dtypes a run (a run.json) computes in on ``device``.

    ``precision`` (``fp32`` when absent: traces recorded before it existed) is the forward
    and backward's: ``bf16`` runs them at the device's bf16 rate, ``tf32`` at its tf32 rate.
    K-FAC's float32 work runs at the tf32 rate where TF32 was allowed
    (``precision_flags.matmul_tf32``; without flags, in any precision but ``fp32``).  On a
    device without a TF32 rate (a CPU, Volta) the TF32 switches change nothing: ``fp32``.
    """
    precision = run.get("precision") or S.FP32
    try:
        S.check_choice("precision", precision, S.COMPUTE_DTYPES)
    except ValueError as exc:
        raise ValueError(f"{label}: run.json: {exc}") from None
    flags = run.get("precision_flags") or {}
    tf32 = bool(flags.get("matmul_tf32", precision != S.FP32))
    dtype, kfac = precision, S.TF32 if tf32 else S.FP32
    if device.tf32_tflops <= 0:
        dtype = S.FP32 if dtype == S.TF32 else dtype
        kfac = S.FP32
    if dtype == S.BF16 and device.bf16_tflops <= 0:
        raise ValueError(f"{label}: a bf16 run, and device {device.name!r} has no bf16 rate "
                         "(its bf16_tflops is 0); give a device model that has one")
    return RunDtypes(dtype=dtype, kfac_dtype=kfac)
