"""NCCL's own choice of algorithm and protocol, and the time it predicts for it.

NCCL does not run one algorithm per collective: for every call it predicts the time of each
(algorithm, protocol) pair it may use and runs the fastest (``ncclTopoGetAlgoTime`` and
``getAlgoInfo`` in NVIDIA/nccl ``src/graph/tuning.cc`` and ``src/enqueue.cc``, from 2.5 on).
This module makes the same prediction from the same constants, for a group of ``p`` ranks over
``nodes`` nodes, so that a cluster preset behaves like the library its users run:

* **algorithms**: ``ring`` for every collective; ``tree`` (a double binary tree over nodes,
  a chain inside each node) for all-reduce only (reduce-scatter, all-gather and broadcast stay
  ring-only through NCCL 2.18);
* **protocols**: ``LL`` (lowest latency, a quarter to a third of the bandwidth), ``LL128``
  (92 % of it) and ``Simple`` (all of it, the largest latency);
* **time** = latency + bytes / algorithm bandwidth, with

  - ring all-reduce: ``base + (2(p-1) - 2(N-1)) h_nvlink + 2(N-1) h_net`` over
    ``busBw p / (2(p-1))``; reduce-scatter / all-gather: ``p-1`` steps, ``N-1`` of them across
    nodes, over ``busBw p / (p-1)``; broadcast: a pipelined chain, one hop of latency, over
    ``busBw``;
  - tree all-reduce: ``base + 2((g-1) h_nvlink + floor(log2 N) h_net)`` over
    ``0.5 x 0.92 busBw``;
  - ``busBw`` is the node's bus bandwidth inside one node (the cluster's intra tier) and its
    network bandwidth across nodes (the inter tier's per-GPU share times the group's GPUs per
    node: a ring enters and leaves every node through its NICs);
  - the protocol's share of that bandwidth; ring/Simple all-reduce across nodes pays 1.9x its
    latency once the message is large (NCCL's "plateau" correction); LL hops inside a node
    cost 1.8x across nodes (2.7/2.8).

Constants (microseconds; GB/s) are NCCL's, per version, as published in its source; they are
NCCL's model of the hardware, not measurements: ``base`` the per-call latency of an
(algorithm, protocol), ``hop`` the latency of one step over NVLink or the network.  What
the model leaves out: per-channel bandwidth caps, the tree's per-size correction table, and
NVLS/CollNet (H100 NVLink SHARP), which the profiles below do not enable.
"""
from __future__ import annotations

from dataclasses import dataclass

PROTOCOLS: tuple[str, ...] = ("LL", "LL128", "Simple")
NCCL_ALGORITHMS: tuple[str, ...] = ("ring", "tree")


@dataclass(frozen=True, kw_only=True)
class NcclProfile:
    """One NCCL version's tuning constants (``src/graph/tuning.cc``)."""

    version: str
    base: dict[tuple[str, str], float]  # (algorithm, protocol) -> us per call
    hop_nvlink: dict[tuple[str, str], float]  # (algorithm, protocol) -> us per intra-node step
    hop_net: dict[tuple[str, str], float]  # (algorithm, protocol) -> us per inter-node step
    ll_share_all_reduce: float  # ring LL's share of the bus bandwidth, all-reduce
    ll_share_other: float  # ... other collectives
    ll_intra_multinode: float  # LL's NVLink hop latency factor when the group spans nodes
    ring_simple_plateau: float  # ring/Simple all-reduce latency factor, large and multi-node
    source: str


def _table(values: dict[str, tuple[float, float, float]]) -> dict[tuple[str, str], float]:
    return {(algo, proto): v for algo, row in values.items() for proto, v in zip(PROTOCOLS, row)}


PROFILES: dict[str, NcclProfile] = {
    "2.8": NcclProfile(
        version="2.8",
        base=_table({"tree": (4.4, 4.4, 0.0), "ring": (3.6, 10.0, 8.4)}),
        hop_nvlink=_table({"tree": (0.52, 1.25, 28.0), "ring": (0.47, 1.9, 3.4)}),
        hop_net=_table({"tree": (5.0, 8.5, 28.0), "ring": (2.7, 4.0, 9.6)}),
        ll_share_all_reduce=1 / 4, ll_share_other=1 / 3, ll_intra_multinode=1.8,
        ring_simple_plateau=1.9,
        source="NVIDIA/nccl v2.8.4-1 src/graph/tuning.cc (baseLat, hwLat, the LL and "
               "plateau factors); the NCCL of V100 clusters in 2019-2021",
    ),
    "2.18": NcclProfile(
        version="2.18",
        base=_table({"tree": (6.8, 14.0, 0.0), "ring": (6.6, 14.0, 8.4)}),
        hop_nvlink=_table({"tree": (0.6, 1.25, 4.0), "ring": (0.6, 1.9, 3.4)}),
        hop_net=_table({"tree": (5.0, 8.5, 14.0), "ring": (2.7, 4.0, 14.0)}),
        ll_share_all_reduce=1 / 4, ll_share_other=1 / 3, ll_intra_multinode=1.0,
        ring_simple_plateau=1.4,
        source="NVIDIA/nccl v2.18.3-1 src/graph/tuning.cc (baseLat, hwLat, the LL and "
               "plateau factors; plateau 1.4 on compute capability >= 8.0)",
    ),
}

TREE_SHARE = 0.92
"""Tree's share of the bus bandwidth (NCCL caps tree bandwidth at 92 %)."""
TREE_PROTOCOL_SHARE = {"LL": 1 / 3.8, "LL128": 0.915, "Simple": 1.0}
LL128_SHARE = 0.92
PLATEAU_BYTES_PER_RANK = 64 * 1024 / 16
"""Ring/Simple all-reduce across nodes pays the plateau factor from ``p / 16 x 64 KiB``."""


@dataclass(frozen=True)
class NcclChoice:
    """What NCCL runs for one call and the time it takes (us)."""

    algorithm: str
    protocol: str
    time_us: float


def _log2(n: int) -> int:
    """NCCL's ``log2i``: the floor of log2 (``log2Down`` in its ``utils.h``)."""
    return n.bit_length() - 1 if n > 1 else 0


def nccl_choice(profile: NcclProfile, op: str, nbytes: float, *, ranks: int, nodes: int,
                intra_GBps: float, node_net_GBps: float,
                latency_scale: float = 1.0) -> NcclChoice:
    """NCCL's fastest (algorithm, protocol) for ``op`` on ``ranks`` ranks over ``nodes`` nodes.

    ``nbytes`` is the full buffer (all-reduce buffer, reduce-scatter input, all-gather
    output, broadcast payload); ``intra_GBps`` the bus bandwidth inside a node,
    ``node_net_GBps`` a node's network bandwidth for this group (its GPUs' share of the NICs);
    ``latency_scale`` a what-if factor on every latency (the choice follows it, as NCCL's
    would on such hardware).
    """
    if op not in ("all_reduce", "reduce_scatter", "all_gather", "broadcast"):
        raise ValueError(f"NCCL model: unknown collective {op!r}")
    p, n = ranks, float(nbytes)
    if p <= 1 or n <= 0:
        return NcclChoice("ring", "Simple", 0.0)
    multi = nodes > 1
    bus = min(intra_GBps, node_net_GBps) if multi else intra_GBps
    best: NcclChoice | None = None
    for algo in NCCL_ALGORITHMS:
        if algo == "tree" and op != "all_reduce":
            continue
        for proto in PROTOCOLS:
            lat = latency_scale * _latency_us(profile, op, algo, proto, p, nodes, n)
            bw = _algorithm_GBps(profile, op, algo, proto, p, bus, multi)
            t = lat + n / (bw * 1e3)
            if best is None or t < best.time_us:
                best = NcclChoice(algo, proto, t)
    assert best is not None
    return best


def _latency_us(profile: NcclProfile, op: str, algo: str, proto: str, p: int, nodes: int,
                n: float) -> float:
    key = (algo, proto)
    base, h_net = profile.base[key], profile.hop_net[key]
    h_nv = profile.hop_nvlink[key]
    if nodes > 1 and proto == "LL":
        h_nv *= profile.ll_intra_multinode
    if algo == "tree":
        per_node = -(-p // nodes)
        return base + 2 * ((per_node - 1) * h_nv + _log2(nodes) * h_net)
    if op == "broadcast":  # a pipelined chain: one hop before data flows at full rate
        return base + (h_net if nodes > 1 else h_nv)
    steps, inter = (2 * (p - 1), 2 * (nodes - 1)) if op == "all_reduce" else (p - 1, nodes - 1)
    lat = base + (steps - inter) * h_nv + inter * h_net
    if (op == "all_reduce" and proto == "Simple" and nodes > 1
            and n >= p * PLATEAU_BYTES_PER_RANK):
        lat *= profile.ring_simple_plateau
    return lat


def _algorithm_GBps(profile: NcclProfile, op: str, algo: str, proto: str, p: int, bus: float,
                    multi: bool) -> float:
    if algo == "tree":
        return 0.5 * TREE_SHARE * TREE_PROTOCOL_SHARE[proto] * bus
    if proto == "LL":
        share = profile.ll_share_all_reduce if op == "all_reduce" else profile.ll_share_other
    elif proto == "LL128":
        share = LL128_SHARE
    else:
        share = 1.0
    steps = {"all_reduce": 2 * (p - 1), "reduce_scatter": p - 1, "all_gather": p - 1,
             "broadcast": p}[op]
    return share * bus * p / steps


def ring_latency(profile: NcclProfile, *, ranks: int, nodes: int) -> float:
    """Latency (us) of ``ranks - 1`` ring/Simple steps, ``nodes - 1`` of them across nodes:
    what a reduce-scatter or all-gather pays before its bytes, as a ring visits every rank."""
    key = ("ring", "Simple")
    inter = max(0, nodes - 1)
    return (profile.base[key] + (ranks - 1 - inter) * profile.hop_nvlink[key]
            + inter * profile.hop_net[key])
