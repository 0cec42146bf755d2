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
                 v_collectives: "padded" | "pipelined", host: HostModel | None = None,
                 source: str = "", description: str = "")
        .nodes_spanned(group_size) -> int
        .host_delays -> HostDelays   (the host model, or DEDICATED without one)
        .scaled(*, bandwidth=1.0, alpha=1.0, tier="both") -> ClusterModel
    load_cluster_model(path) -> ClusterModel  (strict)     save_cluster_model(model, path) -> Path

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
  largest block, ``pipelined`` (chunked ring, bound by total minus smallest block), or
  ``allreduce``: one all-reduce of every block, each rank keeping its own (SP-NGD's Chainer
  implementation packed all blocks into one buffer and all-reduced it; its all-gather-v was an
  all-reduce of a zero-filled buffer).
* ``nccl`` (optional): the NCCL version whose tuning model runs the collectives
  (:mod:`kfacperf.sim.costs.nccl`: ring or tree, LL/LL128/Simple, chosen per call as NCCL
  does).  Then the tiers give only the bandwidths (``intra``: bus bandwidth inside a node;
  ``inter``: each GPU's share of its node's network) and NCCL's own constants the latencies;
  such a file holds no ``alpha_us``, per-collective tables or ``[multi_node]`` (refused: they
  would have no effect).  Without it every tier's ``alpha_us`` and per-collective algorithm
  apply (gloo, fitted commbench models).
* ``[host]`` (optional): the host model (:mod:`kfacperf.sim.models.host`), where ranks share
  CPU cores and so slow each other and wait for each other; absent, every rank has a
  dedicated device (every GPU preset).  Not part of the network: the tiers above describe
  the links alone.

Files of the format ``kfacperf-cluster-1`` (the host's keys in a required ``[compute]`` table,
all zero on dedicated devices) are still read; they are written as ``kfacperf-cluster-2``.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kfacperf.sim.models.host import (
    DEDICATED,
    HostDelays,
    HostModel,
    host_from_table,
    host_to_dict,
)
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
V_FORMS: tuple[str, ...] = ("padded", "pipelined", "allreduce")
NCCL_VERSIONS: tuple[str, ...] = ("2.8", "2.18")
"""NCCL tuning models the simulator knows (:mod:`kfacperf.sim.costs.nccl`)."""
TIERS: tuple[str, ...] = ("intra", "inter")
FORMAT = "kfacperf-cluster-2"
FORMAT_V1 = "kfacperf-cluster-1"
"""The first format: the host's keys in a required ``[compute]`` table (read, not written)."""


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
    nccl: str = ""
    host: HostModel | None = None
    source: str = ""
    description: str = ""
    latency_scale: float = 1.0
    """What-if factor on NCCL's own latencies (a cluster with ``nccl``; see :meth:`scaled`)."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.latency_scale) and self.latency_scale >= 0):
            raise ValueError(f"cluster {self.name!r}: latency_scale must be a finite number "
                             f">= 0, got {self.latency_scale!r}")
        if self.gpus_per_node < 1:
            raise ValueError(f"cluster {self.name!r}: gpus_per_node must be >= 1")
        for op in OPS:
            if self.multi_node.get(op) not in MULTI_NODE_FORMS:
                raise ValueError(
                    f"cluster {self.name!r}: multi_node.{op} not in {MULTI_NODE_FORMS}")
        object.__setattr__(self, "multi_node", {op: self.multi_node[op] for op in OPS})
        if self.v_collectives not in V_FORMS:
            raise ValueError(f"cluster {self.name!r}: v_collectives not in {V_FORMS}")
        if self.nccl not in ("", *NCCL_VERSIONS):
            raise ValueError(f"cluster {self.name!r}: nccl must be one of "
                             f"{', '.join(NCCL_VERSIONS)} (or absent), got {self.nccl!r}")

    def tier(self, name: str) -> Tier:
        if name not in TIERS:
            raise ValueError(f"unknown tier {name!r}; tiers: {TIERS}")
        return self.intra if name == "intra" else self.inter

    def nodes_spanned(self, group_size: int) -> int:
        """Nodes a group of ``group_size`` consecutive ranks (starting on a node) spans."""
        return max(1, -(-group_size // self.gpus_per_node))

    @property
    def host_delays(self) -> HostDelays:
        """What the host adds to the step: the host model, or :data:`DEDICATED` without one."""
        return self.host if self.host is not None else DEDICATED

    def scaled(self, *, bandwidth: float = 1.0, alpha: float = 1.0,
               tier: str = "both") -> ClusterModel:
        """A what-if copy with bandwidths times ``bandwidth`` and latencies times ``alpha``:
        the tiers' ``alpha_us``, or with ``nccl`` NCCL's own latency constants (every one:
        ``tier`` must then be ``both``)."""
        if bandwidth <= 0 or alpha < 0:
            raise ValueError("bandwidth scale must be > 0 and alpha scale >= 0, "
                             f"got {bandwidth}, {alpha}")
        if tier not in ("both", *TIERS):
            raise ValueError(f"tier must be 'both', 'intra' or 'inter', got {tier!r}")
        if self.nccl and alpha != 1.0 and tier != "both":
            raise ValueError(f"cluster {self.name!r} runs NCCL's latency model, whose "
                             "latencies are scaled together (tier 'both'), not one tier's")
        intra = (self.intra.scaled(bandwidth=bandwidth, alpha=alpha) if tier in ("both", "intra")
                 else self.intra)
        inter = (self.inter.scaled(bandwidth=bandwidth, alpha=alpha) if tier in ("both", "inter")
                 else self.inter)
        return replace(self, intra=intra, inter=inter,
                       latency_scale=self.latency_scale * (alpha if self.nccl else 1.0))


# ---------------------------------------------------------------------------------------------
NCCL_RUNS_IT = ("NCCL's tuning model chooses the algorithm and brings its own latencies "
                "(kfacperf.sim.costs.nccl): remove it; a latency what-if is "
                "kfacperf simulate --latency-scale")
"""Why a cluster with ``nccl`` holds no latencies, algorithms or multi-node forms."""


def _refuse_under_nccl(t: Table, key: str, nccl: str) -> None:
    if t.has(key):
        raise t.error(key, f"has no effect in a cluster with nccl = \"{nccl}\": {NCCL_RUNS_IT}")


def _tier_from_table(t: Table, *, nccl: str = "") -> Tier:
    """A tier; with ``nccl`` only its bandwidth (latencies 0, algorithms NCCL's to choose)."""
    if nccl:
        for key in ("alpha_us", *OPS):
            _refuse_under_nccl(t, key, nccl)
        tier = Tier(alpha_us=0.0, bandwidth_GBps=t.float("bandwidth_GBps", positive=True),
                    algorithms={op: ALGORITHMS[op][0] for op in OPS}, assumed=t.bool("assumed"))
        t.done()
        return tier
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
    """Read a cluster TOML strictly; every error names the file and the key.

    Reads both formats: ``kfacperf-cluster-2`` (an optional ``[host]``) and
    ``kfacperf-cluster-1`` (a required ``[compute]``; all zero there means no host model)."""
    root = read_toml(path, fmt=(FORMAT, FORMAT_V1))
    name = root.str("name")
    description = root.str("description", nonempty=False)
    source = root.str("source", nonempty=False)
    gpus_per_node = root.int("gpus_per_node", minimum=1)
    v_form = root.str("v_collectives", choices=V_FORMS)
    nccl = root.str("nccl", choices=NCCL_VERSIONS) if root.has("nccl") else ""
    if nccl:
        _refuse_under_nccl(root, "multi_node", nccl)
        multi_node = dict.fromkeys(OPS, MULTI_NODE_FORMS[0])
    else:
        mn = root.table("multi_node")
        multi_node = {op: mn.str(op, choices=MULTI_NODE_FORMS) for op in OPS}
        mn.done()
    host: HostModel | None = None
    if root.str("format") == FORMAT_V1:
        host = host_from_table(root.table("compute"))
        if host == HostModel(cores_per_node=0):
            host = None  # a dedicated device, as every GPU preset of that format said
    elif root.has("host"):
        host = host_from_table(root.table("host"))
    intra = _tier_from_table(root.table("intra"), nccl=nccl)
    inter = _tier_from_table(root.table("inter"), nccl=nccl)
    root.done()
    return ClusterModel(
        name=name, gpus_per_node=gpus_per_node, intra=intra, inter=inter,
        multi_node=multi_node, v_collectives=v_form, nccl=nccl, host=host, source=source,
        description=description,
    )


def _tier_to_dict(tier: Tier, *, nccl: str = "") -> dict[str, Any]:
    if nccl:
        return {"bandwidth_GBps": float(tier.bandwidth_GBps), "assumed": tier.assumed}
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


def cluster_model_to_dict(model: ClusterModel) -> dict[str, Any]:
    out: dict[str, Any] = {
        "format": FORMAT,
        "name": model.name,
        "description": model.description,
        "source": model.source,
        "gpus_per_node": model.gpus_per_node,
        "v_collectives": model.v_collectives,
        **({"nccl": model.nccl} if model.nccl else {"multi_node": dict(model.multi_node)}),
    }
    if model.host is not None:  # absent: dedicated devices
        out["host"] = host_to_dict(model.host)
    out["intra"] = _tier_to_dict(model.intra, nccl=model.nccl)
    out["inter"] = _tier_to_dict(model.inter, nccl=model.nccl)
    return out


def save_cluster_model(model: ClusterModel, path: str | Path) -> Path:
    links = (("bandwidth_GBps: one direction, effective (bus bw); latencies and algorithms: "
              f"NCCL {model.nccl}'s tuning model.",) if model.nccl else (
        "alpha_us: latency per algorithm step; bandwidth_GBps: one direction, effective (bus bw).",
        "A collective's own alpha_us/bandwidth_GBps (e.g. fitted by commbench) "
        "override the tier's."))
    header = (
        f"Cluster model {model.name!r} for the kfacperf simulator.",
        links[0],
        "intra: per GPU within a node; inter: each GPU's share of its node's network bandwidth.",
        *links[1:],
        *(("[host]: ranks sharing CPU cores slow and wait for each other (no [host]: dedicated "
           "devices).",) if model.host is not None else ()),
    )
    return write_toml(path, cluster_model_to_dict(model), header=header)
