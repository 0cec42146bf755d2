"""A commbench result made from known alpha-beta parameters, for the fits' tests."""
from __future__ import annotations

import math

from kfacperf.bench import results
from kfacperf.sim.costs.collectives import algorithm_us

TRUE = {"all_reduce": ("ring", 40.0, 2.0), "reduce_scatter": ("halving_doubling", 90.0, 0.5),
        "all_gather": ("ring", 25.0, 1.25), "broadcast": ("tree", 10.0, 3.0)}


def synthetic_result(noise: float = 0.0) -> results.CommbenchResult:
    pts = []
    k = 0
    for op, (algo, alpha, gbps) in TRUE.items():
        for p in (2, 3, 4, 8):
            for n in (4096, 65536, 1 << 20, 8 << 20):
                k += 1
                wobble = 1 + noise * math.sin(k * 12.9898)  # deterministic pseudo-noise
                t = algorithm_us(op, algo, p, n, alpha, 1 / (gbps * 1e3)) * wobble
                pts.append(results.Point(op=op, world_size=p, nbytes=n, time_us=t, reps=5))
    return results.CommbenchResult(backend="gloo", points=tuple(pts), slowdowns={2: 1.2, 4: 2.8},
                                   cores=2)
