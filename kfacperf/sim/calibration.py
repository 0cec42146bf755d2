"""Fit the models to measurements: alpha-beta per collective, efficiencies per stage kind.

API::

    fit_alpha_beta(samples, *, op, algorithm) -> AlphaBetaFit
        samples: iterable of (world_size, nbytes, time_us); nbytes as in kfacperf.sim.collectives
    cluster_from_fits(fits: Mapping[op, AlphaBetaFit], *, name, gpus_per_node, ...) -> ClusterModel
    exclusive_compute_times(events) -> DataFrame      (rank, step, stage, layer, dur_us)
    fit_device_model(traces, *, workloads, base=None, name, include_measured=True)
        -> DeviceCalibration(.device, .fits: {kind: StageFit}, .traces_used, .notes)
    base_device_for(run) -> DeviceModel               (peaks to fit efficiencies against)

**Alpha-beta.**  Each algorithm's time is linear in (alpha, beta): ``t = a(p, n) alpha +
b(p, n) beta`` (:func:`kfacperf.sim.collectives.coefficients`).  The fit minimises the
*relative* squared error over all sizes and world sizes (so 4 KiB and 16 MiB points count
alike) with alpha >= 0 and beta >= 0.

**Device.**  Per stage kind ``k``, every (trace, stage, layer) gives one sample: the median
over steps and ranks of the stage's *exclusive* time (time of compute stages nested inside it,
such as the factor statistics computed in backward hooks, is subtracted; occurrences of one
(stage, layer) within a step are summed) against the analytic roofline ``r`` and call count
``c`` of :class:`kfacperf.sim.costs.CostModel`.  The model ``t = overhead * c + r /
efficiency`` is fitted by relative least squares with overhead >= 0 and efficiency <= 1.
When the samples cannot separate the two (one batch size of a whole-model stage), the
overhead is 0.  Only single-process traces are used when any is given: ranks sharing the
machine slow each other down, which is the cluster model's ``contention``, not the device's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from kfacperf import stages as S
from kfacperf.sim.cluster_model import OPS, ClusterModel, Tier
from kfacperf.sim.collectives import coefficients
from kfacperf.sim.costs import CostModel
from kfacperf.sim.device_model import (
    INVERSE_METHODS, STAGE_KINDS, DeviceModel, MeasuredTime, StageEfficiency,
)
from kfacperf.sim.workload_model import WorkloadModel

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd


def bounded_lstsq(a: np.ndarray, y: np.ndarray, lower: Sequence[float]) -> np.ndarray:
    """argmin ||a x - y||^2 subject to x_j >= lower_j, for one or two unknowns.

    Exact: the optimum of a convex quadratic on a box is the unconstrained optimum if it is
    feasible, else lies on a face, where the problem has one unknown fewer.
    """
    a = np.asarray(a, dtype=float)
    y = np.asarray(y, dtype=float)
    k = a.shape[1]
    lo = np.asarray(lower, dtype=float)
    best, best_cost = None, math.inf
    for fixed in _subsets(k):
        x = lo.copy()
        free = [j for j in range(k) if j not in fixed]
        if free:
            rhs = y - a[:, list(fixed)] @ lo[list(fixed)] if fixed else y
            sol, *_ = np.linalg.lstsq(a[:, free], rhs, rcond=None)
            x[free] = sol
        if np.any(x < lo - 1e-12 * np.maximum(1.0, np.abs(lo))):
            continue
        cost = float(np.sum((a @ x - y) ** 2))
        if cost < best_cost * (1 - 1e-12):
            best, best_cost = x, cost
    assert best is not None  # all-fixed is always feasible
    return best


def _subsets(k: int) -> list[tuple[int, ...]]:
    if k == 1:
        return [(), (0,)]
    if k == 2:
        return [(), (0,), (1,), (0, 1)]
    raise ValueError("bounded_lstsq handles one or two unknowns")


# --------------------------------------------------------------------------- alpha-beta
@dataclass(frozen=True, kw_only=True)
class AlphaBetaFit:
    """Fitted alpha (us per step) and bandwidth (GB/s) of one collective's algorithm."""

    op: str
    algorithm: str
    alpha_us: float
    bandwidth_GBps: float
    samples: int
    rms_rel_error: float
    max_rel_error: float

    def predict_us(self, world_size: int, nbytes: float) -> float:
        a, b = coefficients(self.op, self.algorithm, world_size, nbytes)
        return a * self.alpha_us + b / (self.bandwidth_GBps * 1e3)


def fit_alpha_beta(
    samples: Iterable[tuple[int, float, float]], *, op: str, algorithm: str
) -> AlphaBetaFit:
    """Fit alpha and beta of ``op`` run by ``algorithm`` to ``(world_size, nbytes, time_us)``."""
    rows, times = [], []
    for p, n, t in samples:
        if p < 2 or n <= 0 or not (t > 0 and math.isfinite(t)):
            raise ValueError(f"{op}: unusable sample world_size={p}, nbytes={n}, time_us={t}")
        rows.append(coefficients(op, algorithm, p, n))
        times.append(t)
    if len(rows) < 2:
        raise ValueError(f"{op}: need at least 2 samples to fit alpha and beta, got {len(rows)}")
    a = np.array(rows, dtype=float)
    y = np.array(times, dtype=float)
    w = 1.0 / y
    scale = np.abs(a * w[:, None]).max(axis=0)  # column scaling keeps lstsq well conditioned
    scale[scale == 0] = 1.0
    x = bounded_lstsq(a * w[:, None] / scale, y * w, [0.0, 0.0]) / scale
    alpha, beta = float(x[0]), float(x[1])
    if beta <= 0:
        raise ValueError(
            f"{op}: the timings do not grow with message size, so no bandwidth can be fitted "
            "(use larger sizes)"
        )
    rel = (a @ x - y) / y
    return AlphaBetaFit(
        op=op, algorithm=algorithm, alpha_us=alpha, bandwidth_GBps=1.0 / (beta * 1e3),
        samples=len(y), rms_rel_error=float(np.sqrt(np.mean(rel ** 2))),
        max_rel_error=float(np.max(np.abs(rel))),
    )


def cluster_from_fits(
    fits: Mapping[str, AlphaBetaFit],
    *,
    name: str,
    gpus_per_node: int,
    cores_per_node: int = 0,
    contention: float = 0.0,
    source: str = "",
    description: str = "",
) -> ClusterModel:
    """A one-node-type cluster whose intra tier carries the fitted per-collective values.

    The tier's own alpha/bandwidth are the all-reduce fit (or the first fit); every fitted
    collective overrides them with its own.  Nothing inter-node was measured, so the inter
    tier is a copy of the intra tier (``assumed = true``) and groups are ``flat``.
    """
    missing = [op for op in OPS if op not in fits]
    if missing:
        raise ValueError(f"no fit for collective(s) {', '.join(missing)}")
    ref = fits.get("all_reduce") or next(iter(fits.values()))
    algorithms = {op: fits[op].algorithm for op in OPS}
    overrides = {op: (fits[op].alpha_us, fits[op].bandwidth_GBps) for op in OPS}
    intra = Tier(alpha_us=ref.alpha_us, bandwidth_GBps=ref.bandwidth_GBps, algorithms=algorithms,
                 overrides=overrides, assumed=False)
    inter = Tier(alpha_us=ref.alpha_us, bandwidth_GBps=ref.bandwidth_GBps, algorithms=algorithms,
                 overrides=overrides, assumed=True)
    return ClusterModel(
        name=name, gpus_per_node=gpus_per_node, intra=intra, inter=inter,
        multi_node={op: "flat" for op in OPS}, v_collectives="padded",
        cores_per_node=cores_per_node, contention=contention, source=source,
        description=description,
    )


# --------------------------------------------------------------------------- device
@dataclass(frozen=True, kw_only=True)
class StageFit:
    """The fit of one stage kind, with its error on the samples it was fitted to."""

    kind: str
    efficiency: float
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


#: Nominal peaks of one CPU thread (an AVX-512 core near 3 GHz: 2 FMA units x 16 fp32 lanes x
#: 2 FLOP; bf16 twice that) used when a CPU trace is calibrated without a base device.  Only
#: the products peak x efficiency matter for predictions on the calibrated device.
CPU_THREAD_PEAKS = {"fp32_tflops": 0.2, "tf32_tflops": 0.0, "bf16_tflops": 0.4,
                    "mem_bandwidth_GBps": 20.0}
_GPU_PRESETS = (("h200", "h200"), ("h100", "h100-sxm5"), ("a100", "a100-sxm4"),
                ("v100", "v100-sxm2"))


def base_device_for(run: Mapping[str, Any]) -> DeviceModel:
    """The device whose peaks a trace's efficiencies are fitted against.

    A GPU named in ``run["device"]`` maps to its datasheet preset; otherwise (CPU) nominal
    per-thread peaks times ``threads_per_rank``.
    """
    from kfacperf.sim.models import load_device

    dev = run.get("device") or {}
    label = " ".join(str(dev.get(k, "")) for k in ("name", "kind", "type")).lower()
    for needle, preset in _GPU_PRESETS:
        if needle in label:
            return load_device(preset)
    threads = max(1, int(run.get("threads_per_rank") or 1))
    stages = {k: StageEfficiency(efficiency=1.0, overhead_us=0.0, assumed=True) for k in STAGE_KINDS}
    peaks = {k: v * threads for k, v in CPU_THREAD_PEAKS.items()}
    return DeviceModel(name="cpu-nominal", stages=stages,
                       source=f"nominal peaks of {threads} CPU thread(s)", **peaks)


def exclusive_compute_times(events: "pd.DataFrame") -> "pd.DataFrame":
    """Per (rank, step, stage, layer): summed exclusive time of the compute stages.

    A compute event that lies inside another one on the same rank (the factor statistics
    computed in a backward hook lie inside ``backward``) is subtracted from its parent.
    """
    import pandas as pd

    comp = events[(events["lane"] == S.COMPUTE) & (events["stage"] != S.STEP)]
    out_rows: list[tuple[int, int, str, str, float]] = []
    for rank, ev in comp.groupby("rank", observed=True):
        start = ev["start_us"].to_numpy(float)
        dur = ev["dur_us"].to_numpy(float)
        order = np.lexsort((-dur, start))
        end = start + dur
        excl = dur.copy()
        stack: list[int] = []
        eps = 1e-6
        for i in order:
            while stack and end[stack[-1]] <= start[i] + eps:
                stack.pop()
            if stack and end[i] <= end[stack[-1]] + eps:
                excl[stack[-1]] -= dur[i]
            stack.append(i)
        steps = ev["step"].to_numpy()
        stage = ev["stage"].astype(str).to_numpy()
        layer = ev["layer"].astype(str).to_numpy()
        for i in range(len(ev)):
            out_rows.append((int(rank), int(steps[i]), stage[i], layer[i], max(0.0, excl[i])))
    df = pd.DataFrame(out_rows, columns=["rank", "step", "stage", "layer", "dur_us"])
    return df.groupby(["rank", "step", "stage", "layer"], as_index=False, sort=False)["dur_us"].sum()


@dataclass(frozen=True)
class _Sample:
    kind: str
    workload: str
    layer: str
    batch: int
    inverse_method: str
    time_us: float
    roof_us: float
    calls: int


def _trace_samples(trace: Any, workload: WorkloadModel, base: DeviceModel) -> list[_Sample]:
    run = trace.run
    batch = int(run["batch_per_rank"])
    method = str(run.get("inverse_method") or "eigen")
    if method not in INVERSE_METHODS:
        raise ValueError(f"{trace_label(trace)}: inverse_method {method!r} not in {INVERSE_METHODS}")
    events = trace.measured() if hasattr(trace, "measured") else trace.events
    table = exclusive_compute_times(events)
    med = table.groupby(["stage", "layer"], sort=False)["dur_us"].median()
    cost = CostModel(workload=workload, device=base, cluster=_null_cluster(),
                     inverse_method=method, use_measured=False)
    out = []
    for (stage, layer), t in med.items():
        if stage not in STAGE_KINDS or not t > 0:
            continue
        lm = workload.layer(layer) if layer else None
        if lm is None and stage not in (S.FORWARD, S.BACKWARD, S.UPDATE):
            raise ValueError(f"{trace_label(trace)}: {stage} event without a layer name")
        roof, calls = cost.roofline_terms(stage, lm, batch=batch)
        out.append(_Sample(stage, workload.name, layer, batch, method, float(t), roof, calls))
    return out


def trace_label(trace: Any) -> str:
    return str(getattr(trace, "path", None) or trace.run.get("workload", "trace"))


def _null_cluster() -> ClusterModel:
    algos = {"all_reduce": "ring", "reduce_scatter": "ring", "all_gather": "ring",
             "broadcast": "tree"}
    tier = Tier(alpha_us=0.0, bandwidth_GBps=1.0, algorithms=algos)
    return ClusterModel(name="none", gpus_per_node=1, intra=tier, inter=tier,
                        multi_node={op: "flat" for op in OPS})


def _fit_kind(kind: str, samples: list[_Sample]) -> StageFit:
    calls = np.array([s.calls for s in samples], dtype=float)
    roof = np.array([s.roof_us for s in samples], dtype=float)
    y = np.array([s.time_us for s in samples], dtype=float)
    a = np.column_stack([calls, roof]) / y[:, None]
    ones = np.ones_like(y)
    note = ""
    scale = np.abs(a).max(axis=0)
    scale[scale == 0] = 1.0
    separable = np.linalg.matrix_rank(a / scale, tol=1e-6) >= 2
    if separable:
        x = bounded_lstsq(a / scale, ones, [0.0, 1.0 * scale[1]]) / scale
    else:
        x = np.array([0.0, max(1.0, float(bounded_lstsq(a[:, 1:], ones, [1.0])[0]))])
        note = "overhead not separable from these samples: set to 0"
    overhead, inv_eff = float(x[0]), float(x[1])
    if inv_eff <= 1.0 + 1e-9:
        note = (note + "; " if note else "") + "efficiency hit its bound 1.0 (peak rate too low?)"
    pred = calls * overhead + roof * inv_eff
    rel = (pred - y) / y
    return StageFit(kind=kind, efficiency=min(1.0, 1.0 / inv_eff), overhead_us=overhead,
                    samples=len(y), rms_rel_error=float(np.sqrt(np.mean(rel ** 2))),
                    max_rel_error=float(np.max(np.abs(rel))), note=note)


def fit_device_model(
    traces: Sequence[Any],
    *,
    workloads: Mapping[str, WorkloadModel] | Callable[[Mapping[str, Any]], WorkloadModel],
    base: DeviceModel | None = None,
    name: str,
    include_measured: bool = True,
    description: str = "",
) -> DeviceCalibration:
    """Fit efficiencies and per-call overheads of ``base`` to measured traces.

    ``traces`` are :class:`kfacperf.traces.Trace` objects (``.run`` and ``.events``; steps
    before ``run["warmup"]`` are left out).  ``workloads`` gives each trace's
    :class:`WorkloadModel`: a mapping from ``run["workload"]``, or a function of the run dict
    (e.g. ``lambda run: workload_for_run(run["workload"], run.get("workload_options"))``).  Stage kinds absent from the traces keep
    ``base``'s values.  With ``include_measured`` the medians of single-process traces are
    stored as ``[[measured]]`` times (used when simulating this very device).
    """
    if not traces:
        raise ValueError("no traces to calibrate from")
    single = [t for t in traces if int(t.run.get("world_size", 1) or 1) == 1]
    used = single or list(traces)
    notes: list[str] = []
    if single and len(single) < len(traces):
        notes.append(f"{len(traces) - len(single)} multi-process trace(s) not used for the device")
    if base is None:
        base = base_device_for(used[0].run)
    samples: list[_Sample] = []
    for tr in used:
        wname = str(tr.run.get("workload", ""))
        if isinstance(workloads, Mapping):
            if wname not in workloads:
                raise ValueError(f"{trace_label(tr)}: no workload model for {wname!r}")
            w = workloads[wname]
        else:
            w = workloads(tr.run)
        samples.extend(_trace_samples(tr, w, base))
    fits: dict[str, StageFit] = {}
    stages = dict(base.stages)
    for kind in STAGE_KINDS:
        ks = [s for s in samples if s.kind == kind]
        if not ks:
            notes.append(f"{kind}: not in the traces, kept {base.name}'s values")
            continue
        fit = _fit_kind(kind, ks)
        fits[kind] = fit
        stages[kind] = StageEfficiency(efficiency=fit.efficiency, overhead_us=fit.overhead_us,
                                       assumed=False)
    measured: tuple[MeasuredTime, ...] = ()
    if include_measured and single:
        measured = tuple(
            MeasuredTime(workload=s.workload, stage=s.kind, layer=s.layer, batch=s.batch,
                         inverse_method=s.inverse_method, time_us=s.time_us)
            for s in samples
        )
    labels = tuple(trace_label(t) for t in used)
    device = DeviceModel(
        name=name, fp32_tflops=base.fp32_tflops, tf32_tflops=base.tf32_tflops,
        bf16_tflops=base.bf16_tflops, mem_bandwidth_GBps=base.mem_bandwidth_GBps,
        stages=stages, measured=measured,
        source=f"kfacperf calibrate from {', '.join(labels)}; peaks from {base.name}",
        description=description or base.description,
    )
    return DeviceCalibration(device=device, fits=fits, traces_used=labels, notes=tuple(notes))
