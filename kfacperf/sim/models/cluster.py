"""Cluster model: GPUs per node and the two network tiers that connect them.

API (stable)::

    OPS = ("all_reduce", "reduce_scatter", "all_gather", "broadcast")
    ALGORITHMS[op] -> allowed algorithm names of that op on one tier
    CollectiveParams(*, algorithm, alpha_us, bandwidth_GBps)
    Tier(*, alpha_us, bandwidth_GBps, algorithms: Mapping[op, str],
         overrides: Mapping[op, tuple[alpha_us, bandwidth_GBps]] = {}, assumed: bool)
        .params(op) -> CollectiveParams
    ClusterModel(*, name, gpus_per_node, intra: Tier, inter: Tier,
                 multi_node: Mapping[op, "hierarchical" | "flat"],
                 v_collectives: "padded" | "pipelined", cores_per_node: int = 0,
                 contention: float = 0.0, contention_by_stage: Mapping[kind, float] = {},
                 straggler: float = 0.0, comm_contention: float = 0.0, source: str = "",
                 description: str = "")
        .nodes_spanned(group_size) -> int
        .compute_slowdown(ranks_on_node, threads, stage=None) -> float
        .comm_slowdown(ranks_on_node) -> float
        .straggle(group_size) -> float
        .scaled(*, bandwidth=1.0, alpha=1.0, tier="both") -> ClusterModel
    load_cluster_model(path) -> ClusterModel  (strict)     save_cluster_model(model, path) -> Path
    expected_max_normal(n) -> float   (mean of the largest of n standard normal draws)

Units and meaning:

* ``intra.bandwidth_GBps``: what one GPU can push to its node peers (GB/s = 1e9 B/s, one
  direction, effective, i.e. NCCL bus bandwidth), ``intra.alpha_us`` the latency of one step.
* ``inter.bandwidth_GBps``: each GPU's share of its node's network bandwidth (node NIC total
  / ``gpus_per_node``), one direction; ``inter.alpha_us`` the latency of one inter-node step.
* Per collective, a tier names its algorithm (``ring``, ``tree``, ``halving_doubling``; see
  :mod:`kfacperf.sim.costs.collectives`) and may override alpha and bandwidth for that collective
  (``kfacperf commbench`` writes fitted values there).
* ``multi_node[op]``: how a group that spans nodes runs ``op``: ``hierarchical`` (intra-node
  phase, inter-node phase on the inter tier, intra-node phase) or ``flat`` (the inter tier's
  algorithm over all ranks, every step paced by the slowest link).
* ``v_collectives``: how uneven reduce-scatter-v / all-gather-v are run: ``padded`` to the
  largest block, or ``pipelined`` (chunked ring, bound by total minus smallest block).
* ``[compute]``: ``cores_per_node`` > 0 when ranks share CPU cores (oversubscription slows
  compute by ranks x threads / cores) and ``contention``, the relative slowdown each extra
  rank on a node adds even below that (shared memory bandwidth).  Ranks slow each other by
  different amounts per kind of work (a cache-resident GEMM barely, a memory-bound factor
  statistic a lot), so an optional ``[compute.contention_by_stage]`` table gives the factor
  per compute stage kind (keys from :data:`kfacperf.sim.models.device.STAGE_KINDS`); a kind it
  does not name uses ``contention``.
* ``[compute] straggler`` (optional, 0 when absent): ranks are not only slower when they
  share cores but uneven, and every collective waits for the slowest member.  ``straggler``
  is how much longer the slowest of two ranks takes than their mean, relative to the mean,
  between two synchronisations; for a group of ``n`` it grows like the expected maximum of
  ``n`` normal draws (``straggler * E[max of n] / E[max of 2]``, :meth:`ClusterModel.straggle`).
  The engine starts each collective that much later.  On a 2-vCPU VM two ranks doing
  identical work differed by 2.5-5 ms per ~75 ms step.
* ``[compute] comm_contention`` (optional, 0 when absent): a collective that ranks sharing
  cores issue between bursts of compute, as training does, takes ``1 + comm_contention``
  times what ``kfacperf commbench`` times after a barrier (:meth:`ClusterModel.comm_slowdown`).
  On a 2-vCPU VM 1 MiB collectives took 1.09x as long on average (42 probes of one session,
  0.74-1.41x each), their stalls (gloo's milliseconds-long waits) more frequent, right after
  a ResNet-20 forward and backward pass than right after a barrier.  It applies where ranks
  share cores (``cores_per_node`` > 0) and more than one rank is on the node.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kfacperf.sim.models.device import STAGE_KINDS
from kfacperf.sim.models.toml_io import Table, read_toml, write_toml
from kfacperf.vocab import COLLECTIVE_OPS

OPS: tuple[str, ...] = COLLECTIVE_OPS
ALGORITHMS: dict[str, tuple[str, ...]] = {
    "all_reduce": ("ring", "tree", "halving_doubling"),
    "reduce_scatter": ("ring", "halving_doubling"),
    "all_gather": ("ring", "halving_doubling"),
    "broadcast": ("tree", "ring", "halving_doubling"),
}
MULTI_NODE_FORMS: tuple[str, ...] = ("hierarchical", "flat")
V_FORMS: tuple[str, ...] = ("padded", "pipelined")
TIERS: tuple[str, ...] = ("intra", "inter")
FORMAT = "kfacperf-cluster-1"


@dataclass(frozen=True, kw_only=True)
class CollectiveParams:
    """The algorithm and alpha-beta parameters one tier uses for one collective."""

    algorithm: str
    alpha_us: float
    bandwidth_GBps: float

    @property
    def beta_us_per_byte(self) -> float:
        return 1.0 / (self.bandwidth_GBps * 1e3)


def _check_link(what: str, alpha_us: float, bandwidth_GBps: float) -> None:
    if not (math.isfinite(alpha_us) and alpha_us >= 0):
        raise ValueError(f"{what}: alpha_us must be >= 0, got {alpha_us}")
    if not (math.isfinite(bandwidth_GBps) and bandwidth_GBps > 0):
        raise ValueError(f"{what}: bandwidth_GBps must be > 0, got {bandwidth_GBps}")


@dataclass(frozen=True, kw_only=True)
class Tier:
    """One level of the network (within a node, or between nodes)."""

    alpha_us: float
    bandwidth_GBps: float
    algorithms: Mapping[str, str]
    overrides: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    assumed: bool = True

    def __post_init__(self) -> None:
        _check_link("tier", self.alpha_us, self.bandwidth_GBps)
        for op in OPS:
            algo = self.algorithms.get(op)
            if algo not in ALGORITHMS[op]:
                raise ValueError(f"{op}: algorithm {algo!r} not in {ALGORITHMS[op]}")
        for op, (a, b) in self.overrides.items():
            if op not in OPS:
                raise ValueError(f"override for unknown collective {op!r}")
            _check_link(op, a, b)
        object.__setattr__(self, "algorithms", {op: self.algorithms[op] for op in OPS})
        object.__setattr__(self, "overrides", dict(self.overrides))

    def params(self, op: str) -> CollectiveParams:
        alpha, bw = self.overrides.get(op, (self.alpha_us, self.bandwidth_GBps))
        return CollectiveParams(algorithm=self.algorithms[op], alpha_us=alpha, bandwidth_GBps=bw)

    def scaled(self, *, bandwidth: float = 1.0, alpha: float = 1.0) -> Tier:
        return replace(
            self,
            alpha_us=self.alpha_us * alpha,
            bandwidth_GBps=self.bandwidth_GBps * bandwidth,
            overrides={op: (a * alpha, b * bandwidth) for op, (a, b) in self.overrides.items()},
        )


@dataclass(frozen=True, kw_only=True)
class ClusterModel:
    """Nodes of ``gpus_per_node`` ranks; an intra-node and an inter-node tier."""

    name: str
    gpus_per_node: int
    intra: Tier
    inter: Tier
    multi_node: Mapping[str, str]
    v_collectives: str = "padded"
    cores_per_node: int = 0
    contention: float = 0.0
    contention_by_stage: Mapping[str, float] = field(default_factory=dict)
    straggler: float = 0.0
    comm_contention: float = 0.0
    source: str = ""
    description: str = ""

    def __post_init__(self) -> None:
        if self.gpus_per_node < 1:
            raise ValueError(f"cluster {self.name!r}: gpus_per_node must be >= 1")
        for op in OPS:
            if self.multi_node.get(op) not in MULTI_NODE_FORMS:
                raise ValueError(f"cluster {self.name!r}: multi_node.{op} not in {MULTI_NODE_FORMS}")
        object.__setattr__(self, "multi_node", {op: self.multi_node[op] for op in OPS})
        if self.v_collectives not in V_FORMS:
            raise ValueError(f"cluster {self.name!r}: v_collectives not in {V_FORMS}")
        if self.cores_per_node < 0 or self.contention < 0:
            raise ValueError(f"cluster {self.name!r}: cores_per_node and contention must be >= 0")
        if not (math.isfinite(self.straggler) and self.straggler >= 0):
            raise ValueError(f"cluster {self.name!r}: straggler must be >= 0, got {self.straggler}")
        if not (math.isfinite(self.comm_contention) and self.comm_contention >= 0):
            raise ValueError(f"cluster {self.name!r}: comm_contention must be >= 0, got "
                             f"{self.comm_contention}")
        for kind, c in self.contention_by_stage.items():
            if kind not in STAGE_KINDS:
                raise ValueError(f"cluster {self.name!r}: contention_by_stage has unknown stage "
                                 f"kind {kind!r}; kinds: {STAGE_KINDS}")
            if not (math.isfinite(c) and c >= 0):
                raise ValueError(f"cluster {self.name!r}: contention_by_stage.{kind} must be "
                                 f">= 0, got {c}")
        object.__setattr__(self, "contention_by_stage",
                           {k: float(self.contention_by_stage[k]) for k in STAGE_KINDS
                            if k in self.contention_by_stage})

    def tier(self, name: str) -> Tier:
        if name not in TIERS:
            raise ValueError(f"unknown tier {name!r}; tiers: {TIERS}")
        return self.intra if name == "intra" else self.inter

    def nodes_spanned(self, group_size: int) -> int:
        """Nodes a group of ``group_size`` consecutive ranks (starting on a node) spans."""
        return max(1, -(-group_size // self.gpus_per_node))

    def stage_contention(self, stage: str | None = None) -> float:
        """The contention of compute ``stage`` (``contention`` where the stage has none)."""
        if stage is None:
            return self.contention
        if stage not in STAGE_KINDS:
            raise ValueError(f"{stage!r} is not a compute stage kind; kinds: {STAGE_KINDS}")
        return self.contention_by_stage.get(stage, self.contention)

    def compute_slowdown(self, ranks_on_node: int, threads_per_rank: int = 1,
                         stage: str | None = None) -> float:
        """Factor by which compute (of ``stage``, if given) slows when ``ranks_on_node`` ranks
        share a node."""
        r = max(1, ranks_on_node)
        factor = 1.0 + self.stage_contention(stage) * (r - 1)
        if self.cores_per_node > 0:
            factor *= max(1.0, r * max(1, threads_per_rank) / self.cores_per_node)
        return factor

    def comm_slowdown(self, ranks_on_node: int) -> float:
        """Factor on a collective's time when ``ranks_on_node`` ranks share a node's cores and
        compute between collectives (1 on GPUs, alone, or without ``comm_contention``)."""
        if self.cores_per_node <= 0 or ranks_on_node <= 1:
            return 1.0
        return 1.0 + self.comm_contention

    def straggle(self, group_size: int) -> float:
        """How late, as a fraction of the time since the previous collective, the slowest of
        ``group_size`` uneven ranks reaches a collective (0 for one rank or no straggler)."""
        if self.straggler <= 0 or group_size <= 1:
            return 0.0
        return self.straggler * expected_max_normal(group_size) / expected_max_normal(2)

    def scaled(self, *, bandwidth: float = 1.0, alpha: float = 1.0, tier: str = "both") -> ClusterModel:
        """A what-if copy with bandwidths times ``bandwidth`` and latencies times ``alpha``."""
        if bandwidth <= 0 or alpha < 0:
            raise ValueError(f"bandwidth scale must be > 0 and alpha scale >= 0, got {bandwidth}, {alpha}")
        if tier not in ("both", *TIERS):
            raise ValueError(f"tier must be 'both', 'intra' or 'inter', got {tier!r}")
        intra = self.intra.scaled(bandwidth=bandwidth, alpha=alpha) if tier in ("both", "intra") else self.intra
        inter = self.inter.scaled(bandwidth=bandwidth, alpha=alpha) if tier in ("both", "inter") else self.inter
        return replace(self, intra=intra, inter=inter)


@functools.cache
def expected_max_normal(n: int) -> float:
    """E[max of ``n`` independent standard normal draws] (0 for n = 1, 1/sqrt(pi) for n = 2).

    Numerically, as the integral of ``x n phi(x) Phi(x)^(n-1)`` over [-10, 10] (trapezoid,
    0.002 steps: 1e-9 from the closed forms for n <= 5)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if n == 1:
        return 0.0
    h = 0.002
    total = 0.0
    for i in range(10001):
        x = -10.0 + i * h
        pdf = math.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
        cdf = 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))
        w = 0.5 if i in (0, 10000) else 1.0
        total += w * x * n * pdf * cdf ** (n - 1)
    return total * h


# ---------------------------------------------------------------------------------------------
def _tier_from_table(t: Table) -> Tier:
    alpha = t.float("alpha_us", nonnegative=True)
    bw = t.float("bandwidth_GBps", positive=True)
    assumed = t.bool("assumed")
    algorithms: dict[str, str] = {}
    overrides: dict[str, tuple[float, float]] = {}
    for op in OPS:
        ot = t.table(op)
        algorithms[op] = ot.str("algorithm", choices=ALGORITHMS[op])
        has_a, has_b = ot.has("alpha_us"), ot.has("bandwidth_GBps")
        if has_a != has_b:
            missing = "bandwidth_GBps" if has_a else "alpha_us"
            raise ValueError(
                f"{ot.source}: missing key '{ot.key_path(missing)}' "
                "(a per-collective override needs both alpha_us and bandwidth_GBps)"
            )
        if has_a:
            overrides[op] = (
                ot.float("alpha_us", nonnegative=True), ot.float("bandwidth_GBps", positive=True)
            )
        ot.done()
    t.done()
    return Tier(alpha_us=alpha, bandwidth_GBps=bw, algorithms=algorithms, overrides=overrides,
                assumed=assumed)


def load_cluster_model(path: str | Path) -> ClusterModel:
    """Read a cluster TOML strictly; every error names the file and the key."""
    root = read_toml(path, fmt=FORMAT)
    name = root.str("name")
    description = root.str("description", nonempty=False)
    source = root.str("source", nonempty=False)
    gpus_per_node = root.int("gpus_per_node", minimum=1)
    v_form = root.str("v_collectives", choices=V_FORMS)
    mn = root.table("multi_node")
    multi_node = {op: mn.str(op, choices=MULTI_NODE_FORMS) for op in OPS}
    mn.done()
    comp = root.table("compute")
    cores = comp.int("cores_per_node", minimum=0)
    contention = comp.float("contention", nonnegative=True)
    by_stage: dict[str, float] = {}
    if comp.has("contention_by_stage"):
        bt = comp.table("contention_by_stage")
        for key in bt.keys():
            if key not in STAGE_KINDS:
                raise bt.error(key, f"unknown stage kind; the stage kinds are: {', '.join(STAGE_KINDS)}")
            by_stage[key] = bt.float(key, nonnegative=True)
        bt.done()
    straggler = comp.float("straggler", nonnegative=True) if comp.has("straggler") else 0.0
    comm_contention = (comp.float("comm_contention", nonnegative=True)
                       if comp.has("comm_contention") else 0.0)
    comp.done()
    intra = _tier_from_table(root.table("intra"))
    inter = _tier_from_table(root.table("inter"))
    root.done()
    return ClusterModel(
        name=name, gpus_per_node=gpus_per_node, intra=intra, inter=inter,
        multi_node=multi_node, v_collectives=v_form, cores_per_node=cores,
        contention=contention, contention_by_stage=by_stage, straggler=straggler,
        comm_contention=comm_contention, source=source, description=description,
    )


def _tier_to_dict(tier: Tier) -> dict[str, Any]:
    out: dict[str, Any] = {
        "alpha_us": float(tier.alpha_us),
        "bandwidth_GBps": float(tier.bandwidth_GBps),
        "assumed": tier.assumed,
    }
    for op in OPS:
        entry: dict[str, Any] = {"algorithm": tier.algorithms[op]}
        if op in tier.overrides:
            a, b = tier.overrides[op]
            entry["alpha_us"] = float(a)
            entry["bandwidth_GBps"] = float(b)
        out[op] = entry
    return out


def _compute_to_dict(model: ClusterModel) -> dict[str, Any]:
    out: dict[str, Any] = {"cores_per_node": model.cores_per_node,
                           "contention": float(model.contention)}
    if model.straggler:  # absent: 0
        out["straggler"] = float(model.straggler)
    if model.comm_contention:  # absent: 0
        out["comm_contention"] = float(model.comm_contention)
    if model.contention_by_stage:  # absent table: every stage uses ``contention``
        out["contention_by_stage"] = dict(model.contention_by_stage)
    return out


def cluster_model_to_dict(model: ClusterModel) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "name": model.name,
        "description": model.description,
        "source": model.source,
        "gpus_per_node": model.gpus_per_node,
        "v_collectives": model.v_collectives,
        "multi_node": dict(model.multi_node),
        "compute": _compute_to_dict(model),
        "intra": _tier_to_dict(model.intra),
        "inter": _tier_to_dict(model.inter),
    }


def save_cluster_model(model: ClusterModel, path: str | Path) -> Path:
    header = (
        f"Cluster model {model.name!r} for the kfacperf simulator.",
        "alpha_us: latency per algorithm step; bandwidth_GBps: one direction, effective (bus bw).",
        "intra: per GPU within a node; inter: each GPU's share of its node's network bandwidth.",
        "A collective's own alpha_us/bandwidth_GBps (e.g. fitted by commbench) override the tier's.",
    )
    return write_toml(path, cluster_model_to_dict(model), header=header)
