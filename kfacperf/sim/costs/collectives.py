"""Alpha-beta cost of collectives, per algorithm, and over a cluster's two tiers.

Notation (Thakur, Rabenseifner & Gropp, IJHPCA 2005; Chan et al. 2007): ``p`` ranks, ``n``
bytes, ``alpha`` microseconds per algorithm step, ``beta`` microseconds per byte.  ``n`` is the
size of the *full* buffer: the all-reduce buffer, the reduce-scatter input of one rank, the
all-gather output of one rank, the broadcast payload.  The reduction cost (gamma) is folded into
beta: fitted betas absorb it, datasheet betas ignore it.

=================  ==========================================================================
ring               all-reduce 2(p-1)a + 2(p-1)/p nb; reduce-scatter, all-gather (p-1)a + (p-1)/p nb;
                   broadcast: pipelined chain with the best segment count k >= 1,
                   (p-2+k)(a + nb/k)
tree               all-reduce: pipelined double binary tree (NCCL), 2 ceil(log2 p) a + 2nb;
                   broadcast: binomial tree, ceil(log2 p)(a + nb)
halving_doubling   all-reduce (Rabenseifner) 2 ceil(log2 p) a + 2(p-1)/p nb; reduce-scatter and
                   all-gather ceil(log2 p) a + (p-1)/p nb; broadcast: scatter by recursive
                   halving + all-gather by recursive doubling, 2 ceil(log2 p) a + 2(p-1)/p nb
=================  ==========================================================================

Two-level (hierarchical) forms over ``N`` nodes of ``g`` ranks (:func:`group_collective_us`):
all-reduce = RS_intra(n) + AR_inter(n/g) + AG_intra(n); reduce-scatter = RS_intra(n) +
RS_inter(n/g); all-gather = AG_inter(n/g) + AG_intra(n); broadcast = BC_inter(n) + BC_intra(n).
Flat forms run the inter tier's algorithm over all ``p`` ranks with the slowest step latency and
per-byte cost ``max(beta_intra, beta_inter / g)`` (a node's ``g`` ranks share its NICs).

Uneven reduce-scatter-v / all-gather-v with blocks ``m_i`` (SP-NGD): ``padded`` runs the even
collective on ``p * max(m)`` bytes; ``pipelined`` is the chunked-ring bound
``(p-1)a + (sum(m) - min(m)) b``; ``allreduce`` is one all-reduce of ``sum(m)`` bytes.

A cluster with an ``nccl`` version runs the even collectives through NCCL's own tuning model
(:mod:`kfacperf.sim.costs.nccl`) instead of the tiers' algorithms; its pipelined v-forms use
NCCL's ring/Simple latency (a step per rank, NVLink inside nodes, the network between) and
the group's bus bandwidth.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from kfacperf import vocab as S
from kfacperf.sim.costs.nccl import PROFILES, nccl_choice, ring_latency
from kfacperf.sim.models.cluster import ALGORITHMS, NCCL_VERSIONS, OPS, V_FORMS, ClusterModel
from kfacperf.vocab import V_OPS

assert set(PROFILES) == set(NCCL_VERSIONS)

ALL_OPS: tuple[str, ...] = S.ALL_COLLECTIVE_OPS


def _log2(p: int) -> int:
    return math.ceil(math.log2(p)) if p > 1 else 0


def ring_all_reduce(p: int, n: float, alpha: float, beta: float) -> float:
    return 2 * (p - 1) * alpha + 2 * (p - 1) / p * n * beta


def ring_reduce_scatter(p: int, n: float, alpha: float, beta: float) -> float:
    return (p - 1) * alpha + (p - 1) / p * n * beta


ring_all_gather = ring_reduce_scatter


def ring_broadcast(p: int, n: float, alpha: float, beta: float) -> float:
    """Pipelined chain broadcast with the segment count k >= 1 that minimises the time."""
    if p <= 1:
        return 0.0
    if alpha == 0:
        return n * beta  # infinitely many segments
    k = max(1.0, math.sqrt((p - 2) * n * beta / alpha))
    return (p - 2 + k) * (alpha + n * beta / k)


def tree_all_reduce(p: int, n: float, alpha: float, beta: float) -> float:
    """Pipelined double binary tree (NCCL): logarithmic latency, full bandwidth."""
    return 2 * _log2(p) * alpha + 2 * n * beta if p > 1 else 0.0


def tree_broadcast(p: int, n: float, alpha: float, beta: float) -> float:
    """Binomial-tree broadcast."""
    return _log2(p) * (alpha + n * beta)


def hd_all_reduce(p: int, n: float, alpha: float, beta: float) -> float:
    """Rabenseifner: recursive-halving reduce-scatter + recursive-doubling all-gather."""
    return 2 * _log2(p) * alpha + 2 * (p - 1) / p * n * beta


def hd_reduce_scatter(p: int, n: float, alpha: float, beta: float) -> float:
    return _log2(p) * alpha + (p - 1) / p * n * beta


hd_all_gather = hd_reduce_scatter


def hd_broadcast(p: int, n: float, alpha: float, beta: float) -> float:
    """Scatter by recursive halving, then all-gather by recursive doubling."""
    return 2 * _log2(p) * alpha + 2 * (p - 1) / p * n * beta


_FORMULAS = {
    ("all_reduce", "ring"): ring_all_reduce,
    ("all_reduce", "tree"): tree_all_reduce,
    ("all_reduce", "halving_doubling"): hd_all_reduce,
    ("reduce_scatter", "ring"): ring_reduce_scatter,
    ("reduce_scatter", "halving_doubling"): hd_reduce_scatter,
    ("all_gather", "ring"): ring_all_gather,
    ("all_gather", "halving_doubling"): hd_all_gather,
    ("broadcast", "tree"): tree_broadcast,
    ("broadcast", "ring"): ring_broadcast,
    ("broadcast", "halving_doubling"): hd_broadcast,
}
assert set(_FORMULAS) == {(op, a) for op in OPS for a in ALGORITHMS[op]}


def algorithm_us(op: str, algorithm: str, p: int, n: float, alpha: float, beta: float) -> float:
    """Time of ``op`` by ``algorithm`` on ``p`` ranks, ``n`` bytes (0 for p <= 1 or n == 0)."""
    try:
        formula = _FORMULAS[(op, algorithm)]
    except KeyError:
        raise ValueError(f"no algorithm {algorithm!r} for {op!r}; "
                         f"known: {ALGORITHMS.get(op, ())}") from None
    if p <= 1 or n <= 0:
        return 0.0
    return float(formula(p, float(n), alpha, beta))


def coefficients(op: str, algorithm: str, p: int, n: float) -> tuple[float, float]:
    """``(a, b)`` with ``time = a * alpha + b * beta`` for the linear formulas.

    Used to fit alpha and beta by least squares.  The pipelined chain broadcast (``ring``)
    optimises its segment count and is not linear in (alpha, beta): an error.
    """
    if (op, algorithm) == ("broadcast", "ring"):
        raise ValueError("the pipelined ring broadcast is not linear in alpha and beta")
    a = algorithm_us(op, algorithm, p, n, 1.0, 0.0)
    b = algorithm_us(op, algorithm, p, n, 0.0, 1.0)
    return a, b


# ---------------------------------------------------------------------------------------------
def group_collective_us(
    cluster: ClusterModel,
    op: str,
    nbytes: float | Sequence[float],
    *,
    group_size: int,
    nodes: int,
    v_form: str | None = None,
) -> float:
    """Time in microseconds of ``op`` on a group of ``group_size`` ranks over ``nodes`` nodes.

    ``nbytes`` is the full buffer size (see the module docstring); for ``*_v`` ops it is the
    list of the ``group_size`` per-rank block sizes.  ``v_form`` overrides the cluster's
    ``v_collectives``.
    """
    S.check_choice("collective", op, ALL_OPS)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if isinstance(nodes, bool) or not isinstance(nodes, int) or not 1 <= nodes <= group_size:
        raise ValueError(f"nodes must be an int in [1, group_size={group_size}], got {nodes!r}")
    if op in V_OPS:
        return _v_collective_us(cluster, op, nbytes, group_size=group_size, nodes=nodes,
                                v_form=v_form or cluster.v_collectives)
    if not isinstance(nbytes, (int, float)) or isinstance(nbytes, bool) or nbytes < 0:
        raise ValueError(f"{op}: nbytes must be a number >= 0, got {nbytes!r}")
    p, n = group_size, float(nbytes)
    if p == 1 or n == 0:
        return 0.0
    if cluster.nccl:
        return _nccl_us(cluster, op, n, p, nodes)
    if nodes == 1:
        return _tier_us(cluster, "intra", op, p, n)
    g = -(-p // nodes)  # ranks on the fullest node
    if cluster.multi_node[op] == "flat" or g == 1:
        alpha, beta = _flat_link(cluster, op, g)
        return algorithm_us(op, cluster.inter.algorithms[op], p, n, alpha, beta)
    total = 0.0
    for tier, phase_op, ranks, phase_bytes in hierarchical_phases(op, p, nodes, n):
        total += _tier_us(cluster, tier, phase_op, ranks, phase_bytes)
    return total


def hierarchical_phases(op: str, group_size: int, nodes: int,
                        nbytes: float) -> tuple[tuple[str, str, int, float], ...]:
    """The two-level form of ``op`` on ``group_size`` ranks over ``nodes`` nodes, as
    ``(tier, op, ranks, bytes)`` phases in order (see the module docstring): the intra-node
    phases run on the ``g`` ranks of the fullest node, the inter-node phase on one rank per
    node.  Exactly one phase is on the inter tier, and it runs ``op`` itself."""
    g = -(-group_size // nodes)
    n = float(nbytes)
    if op == "all_reduce":
        return (("intra", "reduce_scatter", g, n), ("inter", "all_reduce", nodes, n / g),
                ("intra", "all_gather", g, n))
    if op == "reduce_scatter":
        return (("intra", "reduce_scatter", g, n), ("inter", "reduce_scatter", nodes, n / g))
    if op == "all_gather":
        return (("inter", "all_gather", nodes, n / g), ("intra", "all_gather", g, n))
    if op == "broadcast":
        return (("inter", "broadcast", nodes, n), ("intra", "broadcast", g, n))
    raise ValueError(f"no two-level form of {op!r}; collectives: {', '.join(OPS)}")


def _nccl_us(cluster: ClusterModel, op: str, n: float, p: int, nodes: int) -> float:
    intra, node_net = _nccl_bandwidths(cluster, op, p, nodes)
    return nccl_choice(PROFILES[cluster.nccl], op, n, ranks=p, nodes=nodes, intra_GBps=intra,
                       node_net_GBps=node_net, latency_scale=cluster.latency_scale).time_us


def _nccl_bandwidths(cluster: ClusterModel, op: str, p: int, nodes: int) -> tuple[float, float]:
    """(bus bandwidth inside a node, a node's network bandwidth for a group of ``p`` ranks)."""
    per_node = -(-p // nodes)
    return (cluster.intra.params(op).bandwidth_GBps,
            cluster.inter.params(op).bandwidth_GBps * per_node)


def _tier_us(cluster: ClusterModel, tier: str, op: str, p: int, n: float) -> float:
    prm = cluster.tier(tier).params(op)
    return algorithm_us(op, prm.algorithm, p, n, prm.alpha_us, prm.beta_us_per_byte)


def _flat_link(cluster: ClusterModel, op: str, ranks_per_node: int) -> tuple[float, float]:
    """(alpha, beta) of one step of a flat algorithm spanning nodes: the slowest link."""
    intra, inter = cluster.intra.params(op), cluster.inter.params(op)
    alpha = max(intra.alpha_us, inter.alpha_us)
    beta = max(intra.beta_us_per_byte, inter.beta_us_per_byte / ranks_per_node)
    return alpha, beta


def _v_collective_us(
    cluster: ClusterModel, op: str, blocks: float | Sequence[float], *, group_size: int,
    nodes: int, v_form: str,
) -> float:
    if v_form not in V_FORMS:
        raise ValueError(f"v_form must be one of {V_FORMS}, got {v_form!r}")
    if isinstance(blocks, (int, float, str, bytes)) or not hasattr(blocks, "__len__"):
        raise ValueError(f"{op}: nbytes must be a list of per-rank block sizes, got {blocks!r}")
    sizes = [float(b) for b in blocks]
    if len(sizes) != group_size:
        raise ValueError(f"{op}: {len(sizes)} block sizes for a group of {group_size} ranks")
    if any(not math.isfinite(b) or b < 0 for b in sizes):
        raise ValueError(f"{op}: block sizes must be finite and >= 0, got {sizes}")
    base = op[:-2]
    p = group_size
    if p == 1 or max(sizes) == 0:
        return 0.0
    if v_form == "padded":
        return group_collective_us(cluster, base, p * max(sizes), group_size=p, nodes=nodes)
    if v_form == "allreduce":
        return group_collective_us(cluster, "all_reduce", sum(sizes), group_size=p, nodes=nodes)
    if cluster.nccl:
        intra, node_net = _nccl_bandwidths(cluster, base, p, nodes)
        bus = min(intra, node_net) if nodes > 1 else intra
        latency = cluster.latency_scale * ring_latency(PROFILES[cluster.nccl], ranks=p,
                                                       nodes=nodes)
        return latency + (sum(sizes) - min(sizes)) / (bus * 1e3)
    if nodes == 1:
        prm = cluster.intra.params(base)
        alpha, beta = prm.alpha_us, prm.beta_us_per_byte
    else:
        alpha, beta = _flat_link(cluster, base, -(-p // nodes))
    return (p - 1) * alpha + (sum(sizes) - min(sizes)) * beta
