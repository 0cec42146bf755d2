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

One GPU run also informs its *siblings*: presets of GPUs with the same compute peaks (the
H100 SXM5 and the H200 are one GH100 die at the same clocks; only their memory differs).
:func:`carry_to_sibling` gives such a preset the measured terms, each still marked
``assumed = true`` (nothing was measured on that GPU), with its own peaks and memory: a
stage bound by memory bandwidth then takes the sibling's bandwidth at the measured
``mem_efficiency``.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from kfacperf.calibrate.kernels import InverseKernelFit
from kfacperf.sim.models import load_device
from kfacperf.sim.models.device import DeviceModel, StageEfficiency
from kfacperf.sim.models.presets import list_presets

COMPUTE_PEAKS: tuple[str, ...] = ("fp32_tflops", "tf32_tflops", "bf16_tflops")
"""The peaks two GPUs must share for measured compute efficiencies to carry from one to the
other (memory bandwidth may differ: ``mem_efficiency`` is a fraction of each one's own)."""


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
    return _with_terms(preset, fitted, stages=stages, inverse_methods=methods, source=parts)


def with_reported_memory(device: DeviceModel, total_mib: float, *, where: str) -> DeviceModel:
    """``device`` with the memory its GPU reported in all (``total_mib`` MiB, read in
    ``where``) as its capacity, in place of the datasheet's figure."""
    if not total_mib > 0:
        raise ValueError(f"a memory total of {total_mib!r} MiB is no capacity")
    return replace(device, memory_GB=round(total_mib * 2**20 / 1e9, 1),
                   memory_source=f"what the device reports: {total_mib:,.0f} MiB in all "
                                 f"({where})")


def _with_terms(preset: DeviceModel, measured_on: DeviceModel, *,
                stages: dict[str, StageEfficiency], inverse_methods: dict[str, StageEfficiency],
                source: list[str]) -> DeviceModel:
    """``preset`` with these terms, ``measured_on``'s capture overhead and host work per
    layer where it has them, no measured times, and ``source``'s parts as its source."""
    return replace(
        preset, stages=stages, inverse_methods=inverse_methods, measured=(),
        capture_overhead=dict(measured_on.capture_overhead or preset.capture_overhead),
        layer_host_us=dict(measured_on.layer_host_us or preset.layer_host_us),
        source="; ".join(source))


def is_sibling(device: DeviceModel, other: DeviceModel) -> bool:
    """Whether ``other`` is another GPU with ``device``'s compute peaks (all of them > 0)."""
    return other.name != device.name and all(
        getattr(device, k) > 0 and getattr(device, k) == getattr(other, k)
        for k in COMPUTE_PEAKS)


def sibling_presets(device: DeviceModel) -> list[DeviceModel]:
    """The device presets (``models/devices``) of other GPUs with ``device``'s compute peaks;
    a preset that does not load is skipped (the simulator reports it where it is used)."""
    siblings = []
    for name in list_presets("devices"):
        try:
            preset = load_device(name)
        except ValueError:
            continue
        if is_sibling(device, preset):
            siblings.append(preset)
    return siblings


def carry_to_sibling(folded: DeviceModel, sibling: DeviceModel, *,
                     measured_on: str) -> DeviceModel:
    """``sibling`` with every term that :func:`fold_into_preset` measured for ``folded``
    (stages, inverse methods, capture overhead, host work per layer), marked ``assumed``,
    in place of the sibling's own assumed ones (a term fitted on the sibling stays);
    ``measured_on`` says where (a folder of traces).  Its own peaks, memory, name and
    description stay.

    Raises ValueError when the two GPUs' compute peaks differ.
    """
    if not is_sibling(folded, sibling):
        raise ValueError(
            f"{sibling.name} is not a sibling of {folded.name}: "
            + ("the same device" if sibling.name == folded.name else "compute peaks differ ("
               + ", ".join(f"{k} {getattr(sibling, k):g} vs {getattr(folded, k):g}"
                           for k in COMPUTE_PEAKS) + ")")
            + "; measured efficiencies carry only between GPUs with the same compute peaks")

    def carried(s: StageEfficiency) -> StageEfficiency:
        return replace(s, assumed=True)

    # a term fitted on the sibling itself is worth more than one carried from another GPU
    measured = [k for k, s in folded.stages.items()
                if not s.assumed and sibling.stages[k].assumed]
    stages = {k: carried(folded.stages[k]) if k in measured else s
              for k, s in sibling.stages.items()}
    methods = dict(sibling.inverse_methods)
    measured_methods = [m for m, s in folded.inverse_methods.items()
                        if not s.assumed and (m not in methods or methods[m].assumed)]
    methods.update({m: carried(folded.inverse_methods[m]) for m in measured_methods})
    terms = [f"stages {', '.join(measured)}"] if measured else []
    terms += [f"inverse_method.{m}" for m in measured_methods]
    if folded.capture_overhead or folded.layer_host_us:
        terms.append("capture overhead and host work per layer")
    parts = [sibling.source.split(";")[0].strip() or "peak rates: the datasheet"]
    if terms:
        bandwidth = ("the same memory bandwidth" if
                     folded.mem_bandwidth_GBps == sibling.mem_bandwidth_GBps else
                     f"memory bandwidth {sibling.mem_bandwidth_GBps:g} GB/s here against "
                     f"{folded.mem_bandwidth_GBps:g} there, at the same mem_efficiency")
        parts.append(f"{', '.join(terms)} measured on {folded.name} ({measured_on}) and "
                     f"carried over, assumed: the same compute peaks, {bandwidth}")
    kept = [k for k in sibling.stages if k not in measured]
    if kept:
        parts.append(f"stages {', '.join(kept)} as before")
    return _with_terms(sibling, folded, stages=stages, inverse_methods=methods, source=parts)
