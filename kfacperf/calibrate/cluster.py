"""Fit a cluster model to commbench's measurements.

* collectives: every linear algorithm of each collective is fitted (alpha-beta least squares,
  :func:`kfacperf.calibrate.alpha_beta.fit_alpha_beta`); the lowest relative error wins.  The
  intra tier from groups within a node; the inter tier, when groups spanning nodes were
  measured (``kfacperf commbench --nnodes``), from those, with the intra tier known and the
  ``multi_node`` form (:mod:`kfacperf.calibrate.inter_tier`; by default ``flat`` on gloo,
  whose algorithms run over all ranks, ``hierarchical`` on NCCL).  A tier nothing was
  measured on is a copy of the other, marked assumed;
The host model (:class:`kfacperf.sim.models.host.HostModel`, where ranks share CPU cores):

* ``contention`` (and per stage kind): least squares of the probed compute slowdowns over the
  world sizes, ``slowdown(r) = (1 + c (r - 1)) * max(1, r / cores)``;
* ``straggler``: the probed straggler of ``r`` ranks scaled to two ranks by the expected
  maximum of normal draws (:func:`kfacperf.sim.models.cluster.expected_max_normal`), averaged;
* ``comm_contention``: the probed slowdown of collectives issued right after compute (over
  right after a barrier) minus 1, averaged over world sizes.

API::

    fit_cluster(result, *, name, gpus_per_node=None, cores_per_node=None, multi_node=None)
        -> (ClusterModel, {op: every fit tried, intra tier's first, best first per tier})
    fit_host(result, *, cores_per_node=None) -> HostModel | None   (None: dedicated devices)
    fit_points(points, op) -> (best AlphaBetaFit, every fit)   (groups within a node)
    fit_contention(slowdowns, cores) -> float
    fit_straggler(stragglers) -> float
    fit_comm_contention(comm_slowdowns) -> float
"""
from __future__ import annotations

import statistics
from collections.abc import Sequence

from kfacperf.bench.results import CommbenchResult, Point, fmt_size
from kfacperf.calibrate.alpha_beta import (
    AlphaBetaFit,
    cluster_from_fits,
    fit_alpha_beta,
    tier_from_fits,
)
from kfacperf.calibrate.fitting import sig
from kfacperf.calibrate.inter_tier import fit_inter_points
from kfacperf.sim.models.cluster import ALGORITHMS, MULTI_NODE_FORMS, OPS, ClusterModel
from kfacperf.sim.models.device import STAGE_KINDS
from kfacperf.sim.models.host import HostModel, expected_max_normal


def fit_contention(slowdowns: dict[int, float], cores: int) -> float:
    """Least-squares ``c`` in ``slowdown(r) = (1 + c (r - 1)) * max(1, r / cores)``, >= 0."""
    xs, ys = [], []
    for r, s in slowdowns.items():
        over = max(1.0, r / cores) if cores > 0 else 1.0
        xs.append(r - 1)
        ys.append(s / over - 1.0)
    if not xs:
        return 0.0
    c = sum(x * y for x, y in zip(xs, ys)) / sum(x * x for x in xs)
    return max(0.0, c)


def fit_comm_contention(comm_slowdowns: dict[int, float]) -> float:
    """``comm_contention``: the mean over world sizes of (slowdown after compute - 1), >= 0."""
    if not comm_slowdowns:
        return 0.0
    return max(0.0, sum(v - 1.0 for v in comm_slowdowns.values()) / len(comm_slowdowns))


def fit_straggler(stragglers: dict[int, float]) -> float:
    """The two-rank straggler: each world size's value times E[max of 2] / E[max of r], mean."""
    if not stragglers:
        return 0.0
    return max(0.0, statistics.mean(s * expected_max_normal(2) / expected_max_normal(r)
                                    for r, s in stragglers.items()))


def fit_points(points: Sequence[Point], op: str) -> tuple[AlphaBetaFit, list[AlphaBetaFit]]:
    """Fit every linear algorithm of ``op``; the best (lowest relative error) first."""
    samples = [(p.world_size, p.nbytes, p.time_us) for p in points
               if p.op == op and p.nodes == 1]
    fits = []
    for algo in ALGORITHMS[op]:
        if (op, algo) == ("broadcast", "ring"):
            continue  # not linear in alpha, beta
        try:
            fits.append(fit_alpha_beta(samples, op=op, algorithm=algo))
        except ValueError:
            continue
    if not fits:
        sizes = len({n for _, n, _ in samples})
        raise ValueError(f"{op}: the measurements fit no algorithm ({len(samples)} point(s), "
                         f"{sizes} message size(s): a fit needs at least 2 sizes)")
    fits.sort(key=lambda f: f.rms_rel_error)
    return fits[0], fits


def fit_host(result: CommbenchResult, *, cores_per_node: int | None = None) -> HostModel | None:
    """The host model of the measured machine: ranks sharing ``result.cores`` cores (or
    ``cores_per_node``), with the probes' slowdowns; None where nothing says the ranks share
    a host (NCCL on dedicated GPUs, no probe)."""
    cores = result.cores if cores_per_node is None else cores_per_node
    if not (cores > 0 or result.slowdowns or result.stragglers or result.comm_slowdowns):
        return None
    contention = sig(fit_contention(result.slowdowns, cores)) if result.slowdowns else 0.0
    kinds = sorted({k for per in result.stage_slowdowns.values() for k in per},
                   key=STAGE_KINDS.index)
    by_stage = {k: sig(fit_contention({w: per[k] for w, per in result.stage_slowdowns.items()
                                       if k in per}, cores)) for k in kinds}
    straggler = sig(fit_straggler(result.stragglers)) if result.stragglers else 0.0
    comm = sig(fit_comm_contention(result.comm_slowdowns)) if result.comm_slowdowns else 0.0
    return HostModel(cores_per_node=cores, contention=contention, contention_by_stage=by_stage,
                     straggler=straggler, comm_contention=comm)


DEFAULT_MULTI_NODE = {"gloo": "flat", "nccl": "hierarchical"}
"""How groups spanning nodes run, by backend: gloo's algorithms run over all ranks; NCCL's
reduce within a node over NVLink and between nodes over the network."""


def fit_cluster(
    result: CommbenchResult, *, name: str, gpus_per_node: int | None = None,
    cores_per_node: int | None = None, multi_node: str | None = None,
) -> tuple[ClusterModel, dict[str, list[AlphaBetaFit]]]:
    """The cluster model of the measured machine(s), plus every fit tried per collective.

    ``multi_node``: the form of every collective on groups spanning nodes, ``flat`` or
    ``hierarchical`` (default by backend, :data:`DEFAULT_MULTI_NODE`); it matters only when
    such groups were measured."""
    missing = [op for op in OPS if not any(p.op == op for p in result.points)]
    if missing:
        raise ValueError(f"a cluster model needs every collective; not measured: {missing}")
    within = [p for p in result.points if p.nodes == 1]
    spanning = [p for p in result.points if p.nodes > 1]
    short = [op for op in OPS if within and not any(p.op == op for p in within)]
    if short:
        raise ValueError(f"groups within a node were measured without {short}: measure every "
                         "collective on them, or none")
    form = multi_node or DEFAULT_MULTI_NODE.get(result.backend, "flat")
    if form not in MULTI_NODE_FORMS:
        raise ValueError(f"multi_node must be one of {MULTI_NODE_FORMS}, got {form!r}")
    best: dict[str, AlphaBetaFit] = {}
    tried: dict[str, list[AlphaBetaFit]] = {}
    for op in OPS if within else ():
        best[op], tried[op] = fit_points(within, op)
    inter_best: dict[str, AlphaBetaFit] = {}
    if spanning:
        intra = tier_from_fits(best, assumed=False) if best else None
        for op in OPS:
            inter_best[op], inter_tried = fit_inter_points(spanning, op, form=form, intra=intra)
            tried.setdefault(op, []).extend(inter_tried)
    if gpus_per_node is None:
        if spanning:
            gpus_per_node = max(-(-p.world_size // p.nodes) for p in spanning)
        else:
            gpus_per_node = (64 if result.backend == "gloo"
                             else max(p.world_size for p in result.points))
    model = cluster_from_fits(
        best, name=name, gpus_per_node=gpus_per_node,
        host=fit_host(result, cores_per_node=cores_per_node), source=_source(result),
        description=_description(result, form), inter_fits=inter_best or None,
        multi_node={op: form for op in OPS})
    return model, tried


def _description(result: CommbenchResult, form: str) -> str:
    spanning = [p for p in result.points if p.nodes > 1]
    if not spanning:
        return ("Measured on one machine; the inter tier is a copy of the intra tier (nothing "
                "between nodes was measured).")
    nodes = max(p.nodes for p in spanning)
    intra = ("the intra tier from groups within a node"
             if any(p.nodes == 1 for p in result.points)
             else "the intra tier a copy of the inter tier (one rank per node)")
    return (f"Measured on {nodes} nodes: {intra}, the inter tier from groups spanning nodes "
            f"({form}).")


def _source(result: CommbenchResult) -> str:
    worlds = sorted({p.world_size for p in result.points})
    sizes = sorted({p.nbytes for p in result.points})
    means = "; ".join(f"{w} ranks: mean of {n} probes" for w, n in sorted(result.probes.items())
                      if n > 1)
    per_kind = "; ".join(
        f"{w}: " + ", ".join(f"{k} {v:.2f}" for k, v in per.items())
        for w, per in sorted(result.stage_slowdowns.items()))
    measured = ", ".join(f"{k}: {v:.2f}" for k, v in sorted(result.slowdowns.items()))
    src = (f"kfacperf commbench, backend {result.backend}, world sizes {worlds}, sizes "
           f"{fmt_size(sizes[0])}..{fmt_size(sizes[-1])}; compute slowdown of ranks sharing "
           f"cores: {measured or 'not measured'}"
           + (f" ({means})" if means else "")
           + (f"; per stage kind: {per_kind}" if per_kind else "")
           + ("; straggler: "
              + ", ".join(f"{w}: {v:.3f}" for w, v in sorted(result.stragglers.items()))
              if result.stragglers else "")
           + ("; collectives after compute over after a barrier: "
              + ", ".join(f"{w}: {v:.2f}" for w, v in sorted(result.comm_slowdowns.items()))
              if result.comm_slowdowns else ""))
    groups = sorted({(p.nodes, -(-p.world_size // p.nodes)) for p in result.points
                     if p.nodes > 1})
    if groups:  # measured across nodes
        src += "; groups spanning nodes: " + ", ".join(
            f"{n} nodes x {g} rank{'s' if g > 1 else ''}" for n, g in groups)
    return src
