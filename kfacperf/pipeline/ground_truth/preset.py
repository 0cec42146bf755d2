"""The device preset with what the ground truth measured folded in.

A committed GPU preset (``models/devices/h200.toml``) holds datasheet peaks and stage terms
assumed from another GPU.  After the ground-truth run, :func:`fold_into_preset` proposes its
successor: the same peaks, memory and name, every stage term the traces fitted
(``assumed = false``) in place of the assumed one, the capture overhead and host work per
layer the K-FAC traces measured, and the Cholesky inverse's terms from the kernel timings
(the profiles invert with ``eigen``, whose cost the fitted ``inverse`` stage holds).  What
nothing measured stays as it was, still ``assumed = true``, and ``source`` says which term
came from where.

Efficiencies are fractions of the device's peaks, so a fitted model folds only into a preset
with the peaks it was fitted against; anything else is refused.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from kfacperf.calibrate.kernels import InverseKernelFit
from kfacperf.sim.models.device import DeviceModel


def fold_into_preset(preset: DeviceModel, fitted: DeviceModel, *, fitted_from: str,
                     kernel_fits: Sequence[InverseKernelFit] = (),
                     kernels_from: str = "kernels.json") -> DeviceModel:
    """``preset`` with the terms of ``fitted`` (a device model calibrated from traces,
    described by ``fitted_from``) that were fitted, and each kernel fit as its method's
    ``[inverse_method.<method>]``; see the module docstring.

    Raises ValueError when ``fitted`` was fitted against other peaks than ``preset``'s.
    """
    mine, theirs = preset.peaks, fitted.peaks
    differ = [k for k in mine if mine[k] != theirs[k]]
    if differ:
        raise ValueError(
            f"{fitted.name} was fitted against other peaks than preset {preset.name} ("
            + ", ".join(f"{k} {theirs[k]:g} vs {mine[k]:g}" for k in differ)
            + "): its efficiencies are fractions of those peaks and do not carry over")
    measured = [k for k, s in fitted.stages.items() if not s.assumed]
    stages = {k: fitted.stages[k] if k in measured else s for k, s in preset.stages.items()}
    methods = dict(preset.inverse_methods)
    for fit in kernel_fits:
        methods[fit.method] = fit.stage_efficiency()
    kept = [k for k in preset.stages if k not in measured]
    # a preset's source opens with where its peaks came from; the rest is rewritten here
    parts = [preset.source.split(";")[0].strip() or "peak rates: the datasheet"]
    if measured:
        parts.append(f"stages {', '.join(measured)} fitted to {fitted_from}")
    if fitted.capture_overhead or fitted.layer_host_us:
        parts.append("capture overhead and host work per layer from the same traces")
    parts += [f"inverse_method.{fit.method} fitted to {kernels_from} ({fit.dtype}, sizes "
              f"{min(fit.sizes)}-{max(fit.sizes)})" for fit in kernel_fits]
    if kept:
        parts.append(f"stages {', '.join(kept)} as before (assumed)")
    return replace(
        preset, stages=stages, inverse_methods=methods, measured=(),
        capture_overhead=dict(fitted.capture_overhead or preset.capture_overhead),
        layer_host_us=dict(fitted.layer_host_us or preset.layer_host_us),
        source="; ".join(parts))
