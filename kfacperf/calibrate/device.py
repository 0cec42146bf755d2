"""Fit the device model to measured traces: efficiencies per stage kind, and the rest.

API::

    fit_device_model(traces, *, workloads, base=None, name, include_measured=True, mode=None)
        -> DeviceCalibration(.device, .fits: {kind: StageFit}, .traces_used, .notes,
                             .measured_dtypes)
    base_device_for(run) -> DeviceModel               (peaks to fit efficiencies against)
    (which of the device's peaks a run computes at: :mod:`kfacperf.calibrate.run_dtypes`)

(Collectives are fitted in :mod:`kfacperf.calibrate.alpha_beta`.)

Per stage kind ``k``, every (trace, stage, layer) gives one sample: the median over the
measured steps and ranks of the stage's time as :mod:`kfacperf.trace.measure` defines it
(*exclusive*: time of compute stages nested inside it, such as the factor statistics
computed in backward hooks, is subtracted; occurrences of one (stage, layer) within a step
are summed), forward and backward on factor steps apart from plain steps, against the regressors of
:meth:`kfacperf.sim.costs.model.CostModel.regressors` (calls ``c``, compute time ``F/peak``, memory
time ``B/bw``, roofline time).  In ``additive`` mode ``t = overhead c + (F/peak) / efficiency
+ (B/bw) / mem_efficiency``; in ``roofline`` mode ``t = overhead c + roofline / efficiency``
(one efficiency for both).  The fit is relative least squares with overhead >= 0 and
efficiencies <= 1.  A term the samples cannot separate from the others (one batch size of a
whole-model stage; FLOPs proportional to bytes, as in the update) is left at its bound
(overhead 0, efficiency 1) and noted.  Each trace's regressors use the peaks of its
``precision`` (:func:`run_dtypes`), so runs in different precisions share one set of
efficiencies.  Only single-process traces are used when any is given:
ranks sharing the machine slow each other down, which is the host model's
``contention``, not the device's.  The same traces give the factor steps' capture overhead
and the host work between stages (:mod:`kfacperf.calibrate.host_gaps`).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from kfacperf import vocab as S
from kfacperf.calibrate.fitting import bounded_lstsq, sig
from kfacperf.calibrate.host_gaps import fit_layer_host_us, kfac_trace_gaps_input
from kfacperf.calibrate.run_dtypes import RunDtypes, run_dtypes
from kfacperf.sim.costs.model import CostModel, Regressors
from kfacperf.sim.models.cluster import OPS, ClusterModel, Tier
from kfacperf.sim.models.device import (
    CAPTURE_STAGES,
    MODES,
    STAGE_KINDS,
    DeviceModel,
    MeasuredTime,
    StageEfficiency,
)
from kfacperf.sim.models.workload import BATCHNORM, WorkloadModel
from kfacperf.trace.coverage import check_stage_spans
from kfacperf.trace.measure import measured_events, rank_stage_times, run_step_kind
from kfacperf.trace.schema import fisher_options, run_device

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd


# --------------------------------------------------------------------------- device
@dataclass(frozen=True, kw_only=True)
class StageFit:
    """The fit of one stage kind, with its error on the samples it was fitted to."""

    kind: str
    efficiency: float
    mem_efficiency: float
    overhead_us: float
    samples: int
    rms_rel_error: float
    max_rel_error: float
    note: str = ""


@dataclass(frozen=True, kw_only=True)
class DeviceCalibration:
    device: DeviceModel
    fits: dict[str, StageFit]
    traces_used: tuple[str, ...]
    notes: tuple[str, ...] = field(default=())
    measured_dtypes: RunDtypes | None = None
    """The dtypes of the runs whose times ``device.measured`` holds (None: it holds none).
    A ``[[measured]]`` time carries no precision: it applies to runs of these dtypes only."""


#: Nominal peaks of one CPU thread (an AVX-512 core near 3 GHz: 2 FMA units x 16 fp32 lanes x
#: 2 FLOP; bf16 twice that) used when a CPU trace is calibrated without a base device.  Only
#: the products peak x efficiency matter for predictions on the calibrated device.
CPU_THREAD_PEAKS = {"fp32_tflops": 0.2, "tf32_tflops": 0.0, "bf16_tflops": 0.4,
                    "mem_bandwidth_GBps": 20.0}
_GPU_PRESETS = (("h200", "h200"), ("h100", "h100-sxm5"), ("a100", "a100-sxm4"),
                ("v100", "v100-sxm2"))
_OTHER_PARTS = ("pcie", "nvl", "gh200", "gb200")
"""Words in a GPU's name for parts of a family other than the SXM one its preset describes
(other peaks, clocks or memory)."""


def gpu_preset_for(run: Mapping[str, Any]) -> tuple[str | None, str]:
    """The device preset whose peaks a GPU trace is fitted against, and a note where the GPU
    is another part of that preset's family (``NVIDIA H100 PCIe`` for ``h100-sxm5``): its
    fitted efficiencies are then fractions of the preset's peaks, which predict that GPU's
    own runs alike but are no terms of the preset.  ``(None, "")`` for a CPU or an unknown
    GPU."""
    dev = run.get("device") or {}
    name = str(dev.get("name", ""))
    label = " ".join(str(dev.get(k, "")) for k in ("name", "kind", "type")).lower()
    for needle, preset in _GPU_PRESETS:
        if needle in label:
            other = [w for w in _OTHER_PARTS if w in label]
            note = (f"GPU {name!r} is another part ({', '.join(other)}) than the one preset "
                    f"{preset} describes: its efficiencies are fitted against {preset}'s peaks "
                    "(they predict this GPU's runs alike, but are not the preset's terms)"
                    if other else "")
            return preset, note
    return None, ""


def base_device_for(run: Mapping[str, Any]) -> DeviceModel:
    """The device whose peaks a trace's efficiencies are fitted against.

    A GPU named in ``run["device"]`` maps to its datasheet preset (:func:`gpu_preset_for`);
    a GPU no preset describes is a ValueError (its peaks are needed: ``--start-from``); a
    CPU gets nominal per-thread peaks times ``threads_per_rank``.
    """
    from kfacperf.sim.models import load_device

    preset, _ = gpu_preset_for(run)
    if preset is not None:
        return load_device(preset)
    dev = run.get("device") or {}
    if dev.get("kind") == "gpu":
        raise ValueError(
            f"no device preset has the peaks of GPU {dev.get('name') or '?'!r} (presets: "
            f"{', '.join(p for _, p in _GPU_PRESETS)}): write a device model with its "
            "datasheet peaks (a file of models/devices/ shows the format) and calibrate "
            "with --start-from FILE")
    threads = max(1, int(run.get("threads_per_rank") or 1))
    stages = {k: StageEfficiency(efficiency=1.0, mem_efficiency=1.0, overhead_us=0.0,
                                 assumed=True) for k in STAGE_KINDS}
    return DeviceModel(name="cpu-nominal", stages=stages, mode="additive",
                       source=f"nominal peaks of {threads} CPU thread(s)",
                       fp32_tflops=CPU_THREAD_PEAKS["fp32_tflops"] * threads,
                       tf32_tflops=CPU_THREAD_PEAKS["tf32_tflops"] * threads,
                       bf16_tflops=CPU_THREAD_PEAKS["bf16_tflops"] * threads,
                       mem_bandwidth_GBps=CPU_THREAD_PEAKS["mem_bandwidth_GBps"] * threads)


@dataclass(frozen=True)
class _Sample:
    kind: str
    workload: str
    layer: str
    batch: int
    inverse_method: str
    time_us: float
    reg: Regressors
    captured: bool = False  # a forward/backward median over factor steps (statistics captured)
    batchnorm: bool = False  # a BatchNorm Fisher block's stage
    fingerprint: str = ""  # the workload model's (with ``workload``, its identity)


def _trace_samples(trace: Any, workload: WorkloadModel, base: DeviceModel,
                   dtypes: RunDtypes) -> list[_Sample]:
    run = trace.run
    if run.get("batch_per_rank") is None:  # a stage's FLOPs and bytes scale with it
        raise ValueError(f"{trace_label(trace)}: run.json has no 'batch_per_rank' (the "
                         "examples per rank per step); a trace without it cannot be calibrated")
    batch = int(run["batch_per_rank"])
    method = str(run.get("inverse_method") or S.EIGEN)
    try:
        S.check_choice("inverse_method", method, S.INVERSE_METHODS)
    except ValueError as exc:
        raise ValueError(f"{trace_label(trace)}: {exc}") from None
    table = compute_stage_times(measured_events(trace))
    options = fisher_options(run)
    # forward and backward: plain steps and factor steps apart (capture_overhead).  With the
    # Monte-Carlo Fisher the statistics are captured in the extra backward (its own rows,
    # layer mc_fisher), and the true labels' backward is a plain one.
    captured = table["stage"].isin(CAPTURE_STAGES) & table["step"].map(
        lambda k: run_step_kind(int(k), run) != S.PLAIN_STEP.name)
    if options["fisher"] == S.FISHER_MC:
        captured &= ~((table["stage"] == S.BACKWARD) & (table["layer"] == ""))
    table["captured"] = captured
    med = table.groupby(["stage", "layer", "captured"], sort=False)["dur_us"].median()
    cost = CostModel(workload=workload, device=base, cluster=null_cluster(),
                     inverse_method=method, use_measured=False, **options,
                     **dtypes.cost_options())
    out = []
    for (stage, layer, captured), t in med.items():
        if stage not in STAGE_KINDS or not t > 0:
            continue
        if stage == S.BACKWARD and layer == S.MC_FISHER_PASS:
            layer = ""  # a whole-model backward like the true one
        lm = workload.layer(layer) if layer else None
        if lm is None and stage not in (S.FORWARD, S.BACKWARD, S.UPDATE):
            raise ValueError(f"{trace_label(trace)}: {stage} event without a layer name")
        reg = cost.regressors(stage, lm, batch=batch)
        # the base device's time per factorised row is known, not fitted: take it off
        known = base.stage(stage, method).row_us * reg.rows
        out.append(_Sample(stage, workload.name, layer, batch, method, float(t) - known, reg,
                           bool(captured), lm is not None and lm.kind == BATCHNORM,
                           workload.fingerprint))
    return out


def fit_capture_overhead(samples: Sequence[_Sample]) -> tuple[dict[str, float], list[str]]:
    """Relative extra forward/backward time on factor steps, and notes.

    Per stage, every (workload model, layer, batch) measured on both plain and factor steps gives
    the ratio of the medians (over traces) of the two; the overhead is the median ratio - 1
    (at least 0).  Without such a pair it is 0 (noted).
    """
    out: dict[str, float] = {}
    notes: list[str] = []
    for kind in CAPTURE_STAGES:
        groups: dict[tuple[str, str, str, int], dict[bool, list[float]]] = {}
        for s in samples:
            if s.kind == kind:
                key = (s.workload, s.fingerprint, s.layer, s.batch)
                groups.setdefault(key, {True: [], False: []})[s.captured].append(s.time_us)
        ratios = [float(np.median(g[True])) / float(np.median(g[False]))
                  for g in groups.values() if g[True] and g[False]]
        if not ratios:
            if any(s.captured for s in samples if s.kind == kind):
                notes.append(f"{kind}: no run measured both plain and factor steps of one "
                             "workload and batch; capture overhead taken as 0")
            continue
        out[kind] = sig(max(0.0, float(np.median(ratios)) - 1.0), 4)
        notes.append(f"{kind}: {100 * out[kind]:.1f}% slower on factor steps besides the "
                     f"statistics (median of {len(ratios)} workload/batch pair(s))")
    return out, notes


def compute_stage_times(events: pd.DataFrame) -> pd.DataFrame:
    """Per (rank, step, stage, layer) the time of each compute stage
    (:func:`kfacperf.trace.measure.rank_stage_times`)."""
    table = rank_stage_times(events)
    return table[table["stage"].isin(S.COMPUTE_STAGES)].reset_index(drop=True)


def trace_label(trace: Any) -> str:
    return str(getattr(trace, "path", None) or trace.run.get("workload", "trace"))


def null_cluster() -> ClusterModel:
    """A cluster without cost, for pricing one device's compute (no collective is asked)."""
    algos = {"all_reduce": "ring", "reduce_scatter": "ring", "all_gather": "ring",
             "broadcast": "tree"}
    tier = Tier(alpha_us=0.0, bandwidth_GBps=1.0, algorithms=algos)
    return ClusterModel(name="none", gpus_per_node=1, intra=tier, inter=tier,
                        multi_node={op: "flat" for op in OPS})


def _fit_kind(kind: str, samples: list[_Sample], mode: str) -> StageFit:
    y = np.array([s.time_us for s in samples], dtype=float)
    calls = np.array([s.reg.calls for s in samples], dtype=float)
    if mode == "additive":
        cols = [calls, np.array([s.reg.compute_us for s in samples]),
                np.array([s.reg.memory_us for s in samples])]
        names: tuple[str, ...] = ("overhead", "compute efficiency", "memory efficiency")
    else:
        cols = [calls, np.array([s.reg.roofline_us for s in samples])]
        names = ("overhead", "efficiency")
    a = np.column_stack(cols) / y[:, None]  # relative errors
    scale = np.abs(a).max(axis=0)
    scale[scale == 0] = 1.0
    lower = np.array([0.0] + [1.0] * (len(cols) - 1)) * scale
    x = bounded_lstsq(a / scale, np.ones_like(y), lower) / scale
    at_bound = [n for n, v, lo in zip(names, x, lower / scale) if v <= lo * (1 + 1e-9)]
    note = f"at bound (not supported by these samples): {', '.join(at_bound)}" if at_bound else ""
    pred = np.column_stack(cols) @ x
    rel = (pred - y) / y
    eff = 1.0 / x[1]
    mem_eff = 1.0 / x[2] if mode == "additive" else eff
    return StageFit(kind=kind, efficiency=sig(min(1.0, eff)), mem_efficiency=sig(min(1.0, mem_eff)),
                    overhead_us=sig(float(x[0])), samples=len(y),
                    rms_rel_error=float(np.sqrt(np.mean(rel ** 2))),
                    max_rel_error=float(np.max(np.abs(rel))), note=note)


def fit_device_model(
    traces: Sequence[Any],
    *,
    workloads: Mapping[str, WorkloadModel] | Callable[[Mapping[str, Any]], WorkloadModel],
    base: DeviceModel | None = None,
    name: str,
    include_measured: bool = True,
    description: str = "",
    mode: str | None = None,
) -> DeviceCalibration:
    """Fit efficiencies and per-call overheads of ``base`` to measured traces.

    ``traces`` are :class:`kfacperf.trace.store.Trace` objects (``.run`` and ``.events``; steps
    before ``run["warmup"]`` are left out).  ``workloads`` gives each trace's
    :class:`WorkloadModel`: a mapping from ``run["workload"]``, or a function of the run dict
    (e.g. ``lambda run: workload_for_run(run["workload"], run.get("workload_options"))``).
    Stage kinds absent from the traces keep ``base``'s values.  A trace with a compute stage
    longer than its step is refused (:func:`kfacperf.trace.coverage.check_stage_spans`).
    With ``include_measured`` the medians of single-process traces are stored as
    ``[[measured]]`` times (used when simulating this very device, for the same workload
    model only: its name and fingerprint), when those traces share one precision
    (:func:`run_dtypes`; a ``[[measured]]`` time carries none).  ``mode`` (``roofline`` or
    ``additive``) defaults to ``base``'s.
    """
    if not traces:
        raise ValueError("no traces to calibrate from")
    for tr in traces:  # a stage longer than its step: corrupt times, not a sample
        check_stage_spans(tr, label=trace_label(tr))
    check_one_device(traces)
    single = [t for t in traces if int(t.run.get("world_size", 1) or 1) == 1]
    used = single or list(traces)
    notes: list[str] = []
    if single and len(single) < len(traces):
        notes.append(f"{len(traces) - len(single)} multi-process trace(s) not used for the device")
    if not single:
        notes.append("only multi-process traces: their compute times include the slowdown of "
                     "ranks sharing the machine, which a cluster model's [host] contention "
                     "adds again; calibrate on one-process traces where there are any")
    if base is None:
        base = base_device_for(used[0].run)
        notes.extend(n for n in [gpu_preset_for(used[0].run)[1]] if n)
    mode = mode or base.mode
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    samples: list[_Sample] = []
    host_inputs: list[tuple[str, Any, int]] = []
    dtypes: set[RunDtypes] = set()
    for tr in used:
        w = _workload_of(tr, workloads)
        d = run_dtypes(tr.run, base, label=trace_label(tr))
        dtypes.add(d)
        samples.extend(_trace_samples(tr, w, base, d))
        gaps = kfac_trace_gaps_input(tr, w)
        if gaps is not None:
            host_inputs.append(gaps)
    if not samples:  # e.g. every dur_us 0: a "fit" would be the base device's defaults
        raise ValueError(f"{', '.join(trace_label(t) for t in used)}: no compute stage with a "
                         "positive duration in the measured steps; there is nothing to fit")
    capture, capture_notes = fit_capture_overhead(samples)
    notes.extend(capture_notes)
    host, host_notes = fit_layer_host_us(host_inputs)
    notes.extend(host_notes)
    # factor-step forward/backward medians, brought to plain steps
    samples = [replace(s, time_us=s.time_us / (1.0 + capture.get(s.kind, 0.0)), captured=False)
               if s.captured else s for s in samples]
    fits, stages = _fit_stages(samples, base, mode, notes)
    measured: tuple[MeasuredTime, ...] = ()
    measured_dtypes: RunDtypes | None = None
    if include_measured and single:
        measured, measured_dtypes = _measured_times(samples, dtypes, notes)
    labels = tuple(trace_label(t) for t in used)
    device = DeviceModel(
        name=name, fp32_tflops=base.fp32_tflops, tf32_tflops=base.tf32_tflops,
        bf16_tflops=base.bf16_tflops, mem_bandwidth_GBps=base.mem_bandwidth_GBps,
        stages=stages, mode=mode, measured=measured, capture_overhead=capture,
        layer_host_us=host,
        source=f"kfacperf calibrate from {', '.join(labels)}; peaks from {base.name}",
        description=description or base.description,
    )
    return DeviceCalibration(device=device, fits=fits, traces_used=labels, notes=tuple(notes),
                             measured_dtypes=measured_dtypes)


def check_one_device(traces: Sequence[Any]) -> None:
    """Refuse traces recorded on different devices (or with different threads per rank): one
    device model has one set of efficiencies, fitted against the peaks of one device."""
    devices: dict[str, Any] = {}
    for t in traces:
        devices.setdefault(run_device(t.run), t)
    if len(devices) > 1:
        listed = "; ".join(f"{trace_label(t)} on {key}" for key, t in devices.items())
        raise ValueError(f"the traces ran on {len(devices)} different devices ({listed}): a "
                         "device model is fitted to one device; calibrate each device's "
                         "traces apart")


def _workload_of(trace: Any, workloads: Mapping[str, WorkloadModel]
                 | Callable[[Mapping[str, Any]], WorkloadModel]) -> WorkloadModel:
    wname = str(trace.run.get("workload") or "")
    if not wname:
        raise ValueError(f"{trace_label(trace)}: run.json has no 'workload'")
    if not isinstance(workloads, Mapping):
        return workloads(trace.run)
    if wname not in workloads:
        raise ValueError(f"{trace_label(trace)}: no workload model for {wname!r}")
    return workloads[wname]


def _fit_stages(samples: Sequence[_Sample], base: DeviceModel, mode: str, notes: list[str]
                ) -> tuple[dict[str, StageFit], dict[str, StageEfficiency]]:
    """Each stage kind's fit, and the device's stages with them (``base``'s elsewhere)."""
    fits: dict[str, StageFit] = {}
    stages = dict(base.stages)
    for kind in STAGE_KINDS:
        ks = [s for s in samples if s.kind == kind]
        if not ks:
            notes.append(f"{kind}: not in the traces, kept {base.name}'s values")
            continue
        fit = _fit_kind(kind, ks, mode)
        fits[kind] = fit
        stages[kind] = StageEfficiency(efficiency=fit.efficiency,
                                       mem_efficiency=fit.mem_efficiency,
                                       overhead_us=fit.overhead_us, assumed=False,
                                       row_us=base.stages[kind].row_us)
    return fits, stages


def _measured_times(samples: Sequence[_Sample], dtypes: set[RunDtypes], notes: list[str]
                    ) -> tuple[tuple[MeasuredTime, ...], RunDtypes | None]:
    """The samples as ``[[measured]]`` times, and the dtypes they were measured in; none when
    the traces were of several precisions (a measured time names no precision)."""
    if len(dtypes) > 1:
        notes.append("traces of several precisions (" + ", ".join(sorted(map(str, dtypes)))
                     + "): no [[measured]] times kept (they name no precision); the fitted "
                     "efficiencies alone predict")
        return (), None
    [only] = dtypes
    # One entry per (model, stage, layer, batch, method): the mean over the traces, which is
    # what the cost model takes of several entries of one key (so the file stays small when
    # many recordings of one configuration are calibrated together).  BatchNorm blocks get
    # none: see kfacperf.sim.costs.model.
    groups: dict[tuple[str, str, str, str, int, str], list[float]] = {}
    for s in samples:
        if not s.batchnorm:
            key = (s.workload, s.fingerprint, s.kind, s.layer, s.batch, s.inverse_method)
            groups.setdefault(key, []).append(s.time_us)
    measured = tuple(
        MeasuredTime(workload=w, fingerprint=f, stage=kind, layer=layer, batch=batch,
                     inverse_method=method, time_us=sig(sum(times) / len(times)))
        for (w, f, kind, layer, batch, method), times in groups.items())
    if only != RunDtypes():
        notes.append(f"[[measured]] times are of {only} runs: they hold for runs in that "
                     "precision only")
    return measured, only
