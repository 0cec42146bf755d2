"""Fit a device model's terms to published measurements (the calibration set).

The published cases (:mod:`kfacperf.published.cases`) state their setup; each point
is predicted by the simulator with it.  :func:`fit_device_to_published` adjusts the named terms
of one device model — ``forward.efficiency``, ``inverse.row_us``,
``inverse_method.cholesky.overhead_us``, ... — to minimise the squared relative error
``sum (log(predicted / measured))**2`` over every point of the given cases whose setup names
that device, by a coarse scan of each term, then Levenberg-Marquardt steps on the logarithms of the
terms (so they stay
positive; efficiencies are kept at most 1), with central-difference Jacobians (the simulator
is not differentiable, but each term moves the prediction piecewise smoothly).

Only ``role = "calibration"`` cases may be fitted to: a held-out case given here is an error,
so that what the model is judged on never shaped it.  The fitted terms are written with
``assumed = false``; the device's ``source`` says what they were fitted to.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from kfacperf.calibrate.fitting import sig
from kfacperf.published.cases import PublishedCase, Series, held_out_names
from kfacperf.published.predict import predict_series
from kfacperf.sim.models.cluster import TIERS, ClusterModel, Tier
from kfacperf.sim.models.device import INVERSE_METHODS, STAGE_KINDS, DeviceModel, StageEfficiency

FIELDS: tuple[str, ...] = ("efficiency", "mem_efficiency", "overhead_us", "row_us")
CLUSTER_FIELDS: tuple[str, ...] = ("bandwidth_GBps", "alpha_us")
UNUSABLE = 1e3
"""The residual of every point of a trial whose prediction the simulator refuses."""
_CAPPED = ("efficiency", "mem_efficiency")


@dataclass(frozen=True)
class Term:
    """One fitted term: ``stages.<kind>.<field>``, ``inverse_method.<method>.<field>`` of the
    device, or ``cluster.<intra|inter>.<field>`` of the cluster."""

    table: str  # "stages", "inverse_method" or "cluster"
    key: str  # stage kind, inverse method or tier
    field: str

    @property
    def label(self) -> str:
        prefix = "" if self.table == "stages" else f"{self.table}."
        return f"{prefix}{self.key}.{self.field}"


def parse_term(text: str) -> Term:
    """``forward.efficiency`` or ``inverse_method.cholesky.row_us`` -> :class:`Term`."""
    parts = text.strip().split(".")
    if len(parts) == 3 and parts[0] == "cluster" and parts[1] in TIERS:
        if parts[2] not in CLUSTER_FIELDS:
            raise ValueError(f"cannot fit {text!r}: a tier's fields are "
                             f"{', '.join(CLUSTER_FIELDS)}")
        return Term("cluster", parts[1], parts[2])
    if len(parts) == 3 and parts[0] == "inverse_method" and parts[1] in INVERSE_METHODS:
        term = Term("inverse_method", parts[1], parts[2])
    elif len(parts) == 2 and parts[0] in STAGE_KINDS:
        term = Term("stages", parts[0], parts[1])
    else:
        raise ValueError(f"cannot fit {text!r}: give STAGE.FIELD "
                         f"(stages: {', '.join(STAGE_KINDS)}),"
                         f" inverse_method.METHOD.FIELD (methods: {', '.join(INVERSE_METHODS)}) or "
                         f"cluster.TIER.FIELD (tiers: {', '.join(TIERS)})")
    if term.field not in FIELDS:
        raise ValueError(f"cannot fit {text!r}: fields are {', '.join(FIELDS)}")
    return term


def parse_terms(text: str, *, flag: str = "--fit") -> list[Term]:
    """``forward.efficiency,backward.efficiency`` -> the terms, in order; a term named twice
    is an error naming it (and ``flag``)."""
    terms = [parse_term(t) for t in text.split(",") if t.strip()]
    check_distinct(terms, where=flag)
    return terms


def check_distinct(terms: Sequence[Term], *, where: str = "the terms to fit") -> None:
    """Refuse a term given more than once (each term is one unknown of the fit)."""
    seen: set[Term] = set()
    for t in terms:
        if t in seen:
            raise ValueError(f"{where} names {t.label} more than once; give each term once")
        seen.add(t)


def get_term(device: DeviceModel, term: Term, cluster: ClusterModel | None = None) -> float:
    if term.table == "cluster":
        if cluster is None:
            raise ValueError(f"{term.label}: no cluster to fit (give the cluster preset)")
        if cluster.nccl and term.field == "alpha_us":
            raise ValueError(f"{term.label}: cluster {cluster.name} runs NCCL {cluster.nccl}'s "
                             "latency model, which has no alpha_us to fit; fit its "
                             "bandwidth_GBps, or use a cluster without nccl")
        return float(getattr(cluster.tier(term.key), term.field))
    return float(getattr(_efficiency(device, term), term.field))


def _fitted_tier(tier: Tier, field: str, value: float) -> Tier:
    """``tier`` with ``field`` (one of :data:`CLUSTER_FIELDS`) set and marked fitted."""
    if field == "bandwidth_GBps":
        return replace(tier, bandwidth_GBps=value, assumed=False)
    if field == "alpha_us":
        return replace(tier, alpha_us=value, assumed=False)
    raise ValueError(f"cannot fit tier field {field!r}: fields are {', '.join(CLUSTER_FIELDS)}")


def set_cluster_terms(cluster: ClusterModel, values: dict[Term, float]) -> ClusterModel:
    """``cluster`` with its tiers' terms set (marked fitted: ``assumed = false``)."""
    tiers = {"intra": cluster.intra, "inter": cluster.inter}
    for term, value in values.items():
        if term.table == "cluster":
            tiers[term.key] = _fitted_tier(tiers[term.key], term.field, value)
    return replace(cluster, intra=tiers["intra"], inter=tiers["inter"])


def set_terms(device: DeviceModel, values: dict[Term, float]) -> DeviceModel:
    """``device`` with the terms set (marked fitted: ``assumed = false``)."""
    stages = dict(device.stages)
    methods = dict(device.inverse_methods)
    for term, value in values.items():
        if term.table == "cluster":
            continue
        if term.field in _CAPPED:
            value = min(value, 1.0)
        if term.table == "stages":
            stages[term.key] = replace(stages[term.key], **{term.field: value}, assumed=False)
        else:
            base = methods.get(term.key, device.stages["inverse"])
            methods[term.key] = replace(base, **{term.field: value}, assumed=False)
    return replace(device, stages=stages, inverse_methods=methods)


def _efficiency(device: DeviceModel, term: Term) -> StageEfficiency:
    if term.table == "stages":
        return device.stages[term.key]
    return device.inverse_methods.get(term.key, device.stages["inverse"])


def carry_terms(device: DeviceModel, source: DeviceModel) -> DeviceModel:
    """``device``'s peaks with ``source``'s stage terms, every one marked assumed: the start of
    a fit for a GPU whose own measurements cannot determine every term (the same kernels on a
    newer chip), or the whole model of a GPU no published case measured."""
    return replace(
        device,
        stages={k: replace(s, assumed=True) for k, s in source.stages.items()},
        inverse_methods={m: replace(s, assumed=True) for m, s in source.inverse_methods.items()},
        source=f"{device.source.split(';')[0]}; stage terms from {source.name} (assumed to carry "
               "over)",
    )


@dataclass(frozen=True, kw_only=True)
class PublishedFit:
    device: DeviceModel
    cluster: ClusterModel | None
    terms: dict[str, tuple[float, float]]  # label -> (before, after)
    rms_log_error_before: float
    rms_log_error_after: float
    points: int
    iterations: int


_Series = list[tuple[PublishedCase, Series]]
_Residuals = Callable[[np.ndarray], np.ndarray]


def _series_to_fit(cases: Sequence[PublishedCase], preset: str, cluster: ClusterModel | None,
                   cluster_preset: str) -> _Series:
    """Every series of ``cases`` run on ``preset`` (and ``cluster_preset`` when a cluster is
    fitted); a held-out case is refused."""
    held = [c.name for c in cases if c.role != "calibration"]
    if held:
        raise ValueError(f"case {held[0]!r} is held out: it may be predicted, never fitted")
    committed = held_out_names()
    copies = [c for c in cases if c.name in committed]
    if copies:
        raise ValueError(f"{copies[0].path} is case {copies[0].name!r}, which published/ holds "
                         "out: it may be predicted, never fitted, whatever a copy's role says")
    series = [(c, s) for c in cases for s in c.series if c.setup_of(s)["device"] == preset
              and (cluster is None or c.setup_of(s)["cluster"] == cluster_preset)]
    if not series:
        ran = sorted({f"device {c.setup_of(s)['device']}"
                      + (f" with cluster {c.setup_of(s)['cluster']}" if cluster is not None else "")
                      for c in cases for s in c.series})
        raise ValueError(f"no series of these cases runs on device {preset!r}"
                         + (f" and cluster {cluster_preset!r}" if cluster is not None else "")
                         + f"; they run on {', '.join(ran)} (give --device, and --cluster, as "
                           "the cases name them)")
    return series


def _residual_function(series: _Series, device: DeviceModel, preset: str, terms: Sequence[Term],
                       cluster: ClusterModel | None, cluster_preset: str) -> _Residuals:
    """``log(predicted / measured)`` of every point, as a function of the terms' logarithms."""

    def models(xv: np.ndarray) -> dict[str, Any]:
        values = {t: math.exp(v) for t, v in zip(terms, xv)}
        out: dict[str, Any] = {preset: set_terms(device, values)}
        if cluster is not None:
            out[cluster_preset] = set_cluster_terms(cluster, values)
        return out

    points = sum(len(s.values) for _, s in series)

    def residuals(xv: np.ndarray) -> np.ndarray:
        trial = models(xv)
        out = []
        try:
            for case, s in series:
                for row in predict_series(case, s, models=trial):
                    out.append(math.log(row[6] / row[5]))
        except ValueError:  # terms so extreme the simulator refuses the result: a bad trial
            return np.full(points, UNUSABLE)
        return np.array(out)

    return residuals


def _rms(r: np.ndarray) -> float:
    return float(np.sqrt(np.mean(r ** 2)))


def _coarse_scan(x: np.ndarray, r: np.ndarray, terms: Sequence[Term],
                 residuals: _Residuals) -> tuple[np.ndarray, np.ndarray]:
    """Each term scaled by 1/4 .. 4 in turn, keeping what lowers the error: a term can start
    on a plateau (a bandwidth that is not yet the bottleneck) where no local step sees a
    slope."""
    for j, t in enumerate(terms):
        for factor in (0.25, 0.5, 2.0, 4.0):
            trial = x.copy()
            trial[j] += math.log(factor)
            if t.field in _CAPPED:
                trial[j] = min(trial[j], 0.0)
            rt = residuals(trial)
            if rt @ rt < r @ r:
                x, r = trial, rt
    return x, r


def _jacobian(x: np.ndarray, n: int, residuals: _Residuals) -> np.ndarray:
    jac = np.empty((n, len(x)))
    for j in range(len(x)):  # central: a term may sit at a kink (a cap, a bottleneck)
        dx = np.zeros_like(x)
        dx[j] = 1e-3
        jac[:, j] = (residuals(x + dx) - residuals(x - dx)) / 2e-3
    return jac


def _levenberg_marquardt(
    x: np.ndarray, r: np.ndarray, terms: Sequence[Term], residuals: _Residuals, *,
    max_iterations: int, progress: Callable[[str], None] | None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Levenberg-Marquardt steps from ``x`` (residuals ``r``) until no step improves or
    steps become negligible; the terms, their residuals and the iterations taken."""
    lam, it = 1e-2, 0
    for it in range(1, max_iterations + 1):
        jac = _jacobian(x, len(r), residuals)
        g, h = jac.T @ r, jac.T @ jac
        improved = False
        while lam < 1e6:
            step = -np.linalg.solve(h + lam * np.diag(np.diag(h) + 1e-12), g)
            trial = x + step
            for j, t in enumerate(terms):  # efficiencies stay <= 1
                if t.field in _CAPPED:
                    trial[j] = min(trial[j], 0.0)
            rt = residuals(trial)
            if rt @ rt < r @ r:
                x, r, lam, improved = trial, rt, lam / 3, True
                break
            lam *= 4
        if progress is not None:
            progress(f"iteration {it}: rms log error {_rms(r):.4f}")
        if not improved or np.max(np.abs(step)) < 1e-4:
            break
    return x, r, it


def fit_device_to_published(
    cases: Sequence[PublishedCase], device: DeviceModel, preset: str, terms: Sequence[Term], *,
    cluster: ClusterModel | None = None, cluster_preset: str = "",
    max_iterations: int = 25, progress: Callable[[str], None] | None = None,
) -> PublishedFit:
    """Fit ``terms`` of ``device`` (named ``preset`` in the cases' setups), and of ``cluster``
    (named ``cluster_preset``) for ``cluster.*`` terms, to the cases."""
    series = _series_to_fit(cases, preset, cluster, cluster_preset)
    if not terms:
        raise ValueError("no terms to fit")
    check_distinct(terms)
    start = {t: get_term(device, t, cluster) for t in terms}
    x = np.array([math.log(max(v, 1e-9)) for v in start.values()])
    residuals = _residual_function(series, device, preset, terms, cluster, cluster_preset)
    r = residuals(x)
    if r[0] == UNUSABLE:
        raise ValueError("the starting terms give no usable prediction; start from other "
                         "values (--start-from)")
    before = _rms(r)
    x, r = _coarse_scan(x, r, terms, residuals)
    x, r, it = _levenberg_marquardt(x, r, terms, residuals, max_iterations=max_iterations,
                                    progress=progress)
    fitted = {t: sig(math.exp(v), 4) for t, v in zip(terms, x)}
    return PublishedFit(
        device=set_terms(device, fitted),
        cluster=set_cluster_terms(cluster, fitted) if cluster is not None else None,
        terms={t.label: (start[t], fitted[t]) for t in terms},
        rms_log_error_before=before, rms_log_error_after=_rms(r),
        points=len(r), iterations=it,
    )


def fitted_source(fit: PublishedFit, cases: Sequence[PublishedCase], base_source: str,
                  command: str = "") -> str:
    """The device's ``source`` after a fit: which terms came from which cases, and how."""
    names = ", ".join(c.name for c in cases)
    terms = ", ".join(fit.terms)
    how = f" by `{command}`" if command else ""
    return f"{without_fit_notes(base_source)}; {terms} fitted to published cases {names}{how}"


def without_fit_notes(source: str) -> str:
    """``source`` without the notes of earlier fits (a fit run again replaces its note)."""
    return "; ".join(p for p in source.split("; ") if " fitted to published cases " not in p)


def describe(fit: PublishedFit) -> list[str]:
    """Lines for the terminal: each term before and after, and the error."""
    lines = [f"{'term':<34} {'before':>12} {'after':>12}"]
    for label, (a, b) in fit.terms.items():
        lines.append(f"{label:<34} {a:>12.6g} {b:>12.6g}")
    lines.append(f"{fit.points} points: rms |log(predicted/measured)| "
                 f"{fit.rms_log_error_before:.3f} -> {fit.rms_log_error_after:.3f} "
                 f"({fit.iterations} iteration(s))")
    return lines


__all__: list[Any] = ["FIELDS", "PublishedFit", "Term", "carry_terms", "describe",
                      "fit_device_to_published",
                      "fitted_source", "get_term", "parse_term", "parse_terms", "set_terms"]
