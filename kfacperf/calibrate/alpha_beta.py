"""Alpha-beta fits of collectives, and the cluster model made from them.

API::

    fit_alpha_beta(samples, *, op, algorithm) -> AlphaBetaFit
        samples: iterable of (world_size, nbytes, time_us); nbytes as in kfacperf.sim.costs.collectives
    cluster_from_fits(fits: Mapping[op, AlphaBetaFit], *, name, gpus_per_node, ...) -> ClusterModel

Each algorithm's time is linear in (alpha, beta): ``t = a(p, n) alpha + b(p, n) beta``
(:func:`kfacperf.sim.costs.collectives.coefficients`).  The fit minimises the *relative* squared
error over all sizes and world sizes (so 4 KiB and 16 MiB points count alike) with
alpha >= 0 and beta >= 0.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

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
    note = ""
    if x[1] <= 0:  # noise hid the growth with size: fall back to a bandwidth-only fit
        b = a[:, 1] * w
        x = np.array([0.0, float(b @ (y * w)) / float(b @ b)])
        note = "timings did not grow with message size: alpha set to 0 (use larger sizes)"
    alpha, beta = float(x[0]), float(x[1])
    rel = (a @ x - y) / y
    return AlphaBetaFit(
        op=op, algorithm=algorithm, alpha_us=sig(alpha), bandwidth_GBps=sig(1.0 / (beta * 1e3)),
        samples=len(y), rms_rel_error=float(np.sqrt(np.mean(rel ** 2))),
        max_rel_error=float(np.max(np.abs(rel))), note=note,
    )


def cluster_from_fits(
    fits: Mapping[str, AlphaBetaFit],
    *,
    name: str,
    gpus_per_node: int,
    host: HostModel | None = None,
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
        host=host, source=source,
        description=description,
    )
