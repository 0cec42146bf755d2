"""Alpha-beta fits of collectives, and the cluster model made from them.

API::

    fit_alpha_beta(samples, *, op, algorithm) -> AlphaBetaFit
        samples: iterable of (world_size, nbytes, time_us);
        nbytes as in kfacperf.sim.costs.collectives
    fit_linear_times(rows, known_us, times_us, *, op, algorithm, tier="intra") -> AlphaBetaFit
    tier_from_fits(fits: Mapping[op, AlphaBetaFit], *, assumed) -> Tier
    cluster_from_fits(fits: Mapping[op, AlphaBetaFit], *, name, gpus_per_node, host=None,
                      inter_fits=None, multi_node=None, ...) -> ClusterModel

Each algorithm's time is linear in (alpha, beta): ``t = a(p, n) alpha + b(p, n) beta``
(:func:`kfacperf.sim.costs.collectives.coefficients`).  The fit minimises the *relative* squared
error over all sizes and world sizes (so 4 KiB and 16 MiB points count alike) with
alpha >= 0 and beta >= 0.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from kfacperf.calibrate.fitting import bounded_lstsq, sig
from kfacperf.sim.costs.collectives import coefficients
from kfacperf.sim.models.cluster import OPS, ClusterModel, Tier
from kfacperf.sim.models.host import HostModel


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
    note: str = ""
    tier: str = "intra"  # the tier these values are of (TIERS)

    def predict_us(self, world_size: int, nbytes: float) -> float:
        """The time of ``op`` on ``world_size`` ranks of this tier alone."""
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
    return fit_linear_times(rows, [0.0] * len(rows), times, op=op, algorithm=algorithm)


def fit_linear_times(
    rows: Sequence[tuple[float, float]], known_us: Sequence[float], times_us: Sequence[float],
    *, op: str, algorithm: str, tier: str = "intra", note: str = "",
) -> AlphaBetaFit:
    """Alpha and beta of ``time = known + a alpha + b beta`` (``rows``: ``(a, b)`` per sample),
    minimising the relative error of the whole time, with alpha, beta >= 0."""
    if len(rows) < 2:
        raise ValueError(f"{op}: need at least 2 samples to fit alpha and beta, got {len(rows)}")
    a = np.array(rows, dtype=float)
    y = np.array(times_us, dtype=float)
    known = np.array(known_us, dtype=float)
    w = 1.0 / y
    target = (y - known) * w
    scale = np.abs(a * w[:, None]).max(axis=0)  # column scaling keeps lstsq well conditioned
    scale[scale == 0] = 1.0
    x = bounded_lstsq(a * w[:, None] / scale, target, [0.0, 0.0]) / scale
    notes = [note] if note else []
    if x[1] <= 0:  # noise hid the growth with size: fall back to a bandwidth-only fit
        b = a[:, 1] * w
        x = np.array([0.0, float(b @ target) / float(b @ b)])
        if not x[1] > 0:
            raise ValueError(f"{op} ({algorithm}, {tier} tier): the times leave nothing to "
                             "the tier's bandwidth; measure larger sizes")
        notes.append("timings did not grow with message size: alpha set to 0 (use larger sizes)")
    alpha, beta = float(x[0]), float(x[1])
    rel = (a @ x + known - y) / y
    return AlphaBetaFit(
        op=op, algorithm=algorithm, alpha_us=sig(alpha), bandwidth_GBps=sig(1.0 / (beta * 1e3)),
        samples=len(y), rms_rel_error=float(np.sqrt(np.mean(rel ** 2))),
        max_rel_error=float(np.max(np.abs(rel))), note="; ".join(notes), tier=tier,
    )


def cluster_from_fits(
    fits: Mapping[str, AlphaBetaFit],
    *,
    name: str,
    gpus_per_node: int,
    host: HostModel | None = None,
    source: str = "",
    description: str = "",
    inter_fits: Mapping[str, AlphaBetaFit] | None = None,
    multi_node: Mapping[str, str] | None = None,
) -> ClusterModel:
    """A one-node-type cluster whose tiers carry the fitted per-collective values.

    A tier's own alpha/bandwidth are the all-reduce fit (or the first fit); every fitted
    collective overrides them with its own.  ``fits`` are the intra tier's (groups within a
    node), ``inter_fits`` the inter tier's (groups spanning nodes, fitted with the
    ``multi_node`` forms).  A tier nothing was measured on is a copy of the other
    (``assumed = true``); without ``inter_fits`` groups are ``flat``.
    """
    if fits:
        intra = tier_from_fits(fits, assumed=False)
        inter = (tier_from_fits(inter_fits, assumed=False) if inter_fits
                 else replace(intra, assumed=True))
    elif inter_fits:
        inter = tier_from_fits(inter_fits, assumed=False)
        intra = replace(inter, assumed=True)
    else:
        raise ValueError("no fit of any collective: nothing to make a cluster model of")
    forms = dict(multi_node) if inter_fits and multi_node else {op: "flat" for op in OPS}
    return ClusterModel(
        name=name, gpus_per_node=gpus_per_node, intra=intra, inter=inter, multi_node=forms,
        v_collectives="padded", host=host, source=source, description=description,
    )


def tier_from_fits(fits: Mapping[str, AlphaBetaFit], *, assumed: bool) -> Tier:
    """A tier of every collective's fitted algorithm and values (its own: the all-reduce's)."""
    missing = [op for op in OPS if op not in fits]
    if missing:
        raise ValueError(f"no fit for collective(s) {', '.join(missing)}")
    ref = fits.get("all_reduce") or next(iter(fits.values()))
    return Tier(alpha_us=ref.alpha_us, bandwidth_GBps=ref.bandwidth_GBps,
                algorithms={op: fits[op].algorithm for op in OPS},
                overrides={op: (fits[op].alpha_us, fits[op].bandwidth_GBps) for op in OPS},
                assumed=assumed)
