"""The landing's last step: the traced GPU's preset with what was fitted folded in
(:mod:`kfacperf.pipeline.ground_truth.preset`), its memory the GPU's own, and its
siblings' presets with the terms carried over."""
from __future__ import annotations

from collections.abc import Callable

from kfacperf import vocab as S
from kfacperf.bench.kernels.records import OUTPUT_FILE as KERNELS_FILE
from kfacperf.pipeline.ground_truth.landed import Finished, shown_path
from kfacperf.pipeline.ground_truth.plan import CALIBRATION

PRESET_PRECISIONS: tuple[str, ...] = (S.BF16, S.TF32, S.FP32)
"""Whose fitted terms go into the preset, the first that validated: the precision users
train in first."""


def reported_memory(done: Finished) -> tuple[float, str] | None:
    """The memory total the traced GPU reported (MiB) and the run.json it is in, from the
    first trace that recorded one."""
    from kfacperf.trace.schema import RUN_FILE
    from kfacperf.trace.store import read_run

    for t in done.traces:
        try:
            device = read_run(t.path / RUN_FILE).get("device") or {}
        except (OSError, ValueError):
            continue
        mib = device.get("memory_total_mib")
        if isinstance(mib, (int, float)) and mib > 0:
            return float(mib), f"{shown_path(t.path)}/{RUN_FILE}"
    return None


def fold_preset(done: Finished, device_name: str, say: Callable[[str], None]) -> None:
    """Write ``DEVICE-preset.toml``: the preset of the traced GPU with the fitted terms."""
    from kfacperf.calibrate.kernels import fit_inverse_kernels
    from kfacperf.pipeline.ground_truth.preset import (
        carry_to_sibling,
        fold_into_preset,
        sibling_presets,
        with_reported_memory,
    )
    from kfacperf.safety import load_json_file
    from kfacperf.sim.models import load_device
    from kfacperf.sim.models.device import load_device_model, save_device_model

    precision = next((p for p in PRESET_PRECISIONS if p in done.device_files), None)
    if not done.gpu or precision is None:
        say("preset: not folded (" + ("a dry run's outputs" if not done.gpu
                                      else "no precision was validated") + ")")
        return
    try:
        preset = load_device(device_name)
    except ValueError as exc:
        say(f"preset: not folded ({exc})")
        return
    fits = []
    kernels = done.into / KERNELS_FILE
    if kernels.is_file():
        try:
            fits.append(fit_inverse_kernels(load_json_file(kernels, what="kernel timings"),
                                            preset, method=S.CHOLESKY, dtype=S.FP64))
        except (ValueError, OSError) as exc:
            say(f"preset: cholesky terms kept as they were ({exc})")
    batches = sorted({t.batch for t in done.traces
                      if t.precision == precision and t.role == CALIBRATION and t.batch > 0})
    fitted_from = (f"the {precision} calibration traces in {shown_path(done.into / precision)}"
                   + (f" (batch {' and '.join(map(str, batches))} per GPU)" if batches else ""))
    try:
        folded = fold_into_preset(preset, load_device_model(done.device_files[precision]),
                                  fitted_from=fitted_from, kernel_fits=fits,
                                  kernels_from=shown_path(kernels))
    except ValueError as exc:
        say(f"preset: not folded ({exc})")
        return
    reported = reported_memory(done)
    if reported is not None:
        mib, where = reported
        folded = with_reported_memory(folded, mib, where=where)
        say(f"preset: memory {folded.memory_GB:g} GB, the {mib:,.0f} MiB the GPU reported "
            f"(was {preset.memory_GB:g} GB from the datasheet)")
    path = save_device_model(folded, done.into / f"{preset.name}-preset.toml")
    say(f"preset: {path.name}, models/devices/{preset.name}.toml with the {precision} fit and "
        + (f"the {', '.join(f.method for f in fits)} kernel terms; " if fits else
           "no kernel terms (see above); ")
        + "review, then copy it over the preset")
    for sibling in sibling_presets(folded):
        path = save_device_model(
            carry_to_sibling(folded, sibling, measured_on=shown_path(done.into / precision)),
            done.into / f"{sibling.name}-preset.toml")
        say(f"preset: {path.name}, models/devices/{sibling.name}.toml with the terms measured "
            f"on {preset.name} carried over (the same compute peaks; still assumed there)")
