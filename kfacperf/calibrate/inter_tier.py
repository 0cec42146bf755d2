"""Fit the inter-node tier to collectives timed on groups that span nodes.

A group of ``p`` ranks over ``N`` nodes, ``g`` of them on the fullest node, costs in the
simulator (:func:`kfacperf.sim.costs.collectives.group_collective_us`):

* ``flat`` (and any group of one rank per node): the inter tier's algorithm over all ``p``
  ranks, every step paced by the slowest link, ``max(alpha_intra, alpha_inter)`` and
  ``max(beta_intra, beta_inter / g)`` (a node's ``g`` ranks share its network).  A measurement
  across nodes is taken where the network is the slow link, so the fit takes the inter terms:
  ``time = a(p, n) alpha_inter + b(p, n) / g beta_inter``;
* ``hierarchical``: the intra-node phases on the intra tier, fitted first from the groups
  within a node, plus one inter-node phase on one rank per node
  (:func:`kfacperf.sim.costs.collectives.hierarchical_phases`):
  ``time = known + a(N, n') alpha_inter + b(N, n') beta_inter``.

Both are linear in the inter tier's (alpha, beta), so the inter tier is fitted as the intra one
is: every linear algorithm of the collective, relative least squares of the whole time, the
lowest error wins (:func:`kfacperf.calibrate.alpha_beta.fit_linear_times`).

API::

    spanning_terms(op, algorithm, form, intra, group_size, nodes, nbytes) -> (known_us, a, b)
    fit_inter_points(points, op, *, form, intra) -> (best AlphaBetaFit, every fit)
"""
from __future__ import annotations

from collections.abc import Sequence

from kfacperf.bench.results import Point
from kfacperf.calibrate.alpha_beta import AlphaBetaFit, fit_linear_times
from kfacperf.sim.costs.collectives import algorithm_us, coefficients, hierarchical_phases
from kfacperf.sim.models.cluster import ALGORITHMS, MULTI_NODE_FORMS, Tier


def spanning_terms(op: str, algorithm: str, form: str, intra: Tier | None, group_size: int,
                   nodes: int, nbytes: float) -> tuple[float, float, float]:
    """``(known_us, a, b)``: the simulated time of ``op`` on a group spanning ``nodes`` nodes is
    ``known_us + a alpha_inter + b beta_inter`` with the inter tier running ``algorithm``."""
    if form not in MULTI_NODE_FORMS:
        raise ValueError(f"form must be one of {MULTI_NODE_FORMS}, got {form!r}")
    if not 2 <= nodes <= group_size:
        raise ValueError(f"a group spanning nodes needs 2 <= nodes <= group size, got {nodes} "
                         f"nodes for {group_size} ranks")
    g = -(-group_size // nodes)
    if form == "flat" or g == 1:
        a, b = coefficients(op, algorithm, group_size, nbytes)
        return 0.0, a, b / g
    if intra is None:
        raise ValueError(f"{op}: a hierarchical group of {g} ranks per node needs the intra "
                         "tier: measure groups within a node too (--nproc-per-node >= 2)")
    known, a, b = 0.0, 0.0, 0.0
    for tier, phase_op, ranks, phase_bytes in hierarchical_phases(op, group_size, nodes, nbytes):
        if tier == "inter":
            a, b = coefficients(phase_op, algorithm, ranks, phase_bytes)
        else:
            prm = intra.params(phase_op)
            known += algorithm_us(phase_op, prm.algorithm, ranks, phase_bytes, prm.alpha_us,
                                  prm.beta_us_per_byte)
    return known, a, b


def fit_inter_points(points: Sequence[Point], op: str, *, form: str, intra: Tier | None
                     ) -> tuple[AlphaBetaFit, list[AlphaBetaFit]]:
    """Fit every linear algorithm of ``op`` on the inter tier to the points of groups spanning
    nodes; the best (lowest relative error) first."""
    spanning = [p for p in points if p.op == op and p.nodes > 1]
    fits = []
    for algo in ALGORITHMS[op]:
        if (op, algo) == ("broadcast", "ring"):
            continue  # not linear in alpha, beta
        terms = [spanning_terms(op, algo, form, intra, p.world_size, p.nodes, p.nbytes)
                 for p in spanning]
        try:
            fits.append(fit_linear_times(
                [(a, b) for _, a, b in terms], [k for k, _, _ in terms],
                [p.time_us for p in spanning], op=op, algorithm=algo, tier="inter",
                note=f"groups spanning nodes, {form}"))
        except ValueError:
            continue
    if not fits:
        raise ValueError(f"{op}: the groups spanning nodes fit no algorithm of the inter tier "
                         f"({len(spanning)} point(s); measure more sizes)")
    fits.sort(key=lambda f: f.rms_rel_error)
    return fits[0], fits
