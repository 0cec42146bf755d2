"""Host model: what ranks that share a machine's CPU cores cost each other.

A dedicated accelerator (every GPU preset) runs a rank's work at the device's speed whatever
the other ranks on its node do; ranks that share CPU cores do not.  That co-tenancy is a
property of the host, not of the network, so it is a model of its own, optional in a cluster
(``ClusterModel.host``; absent: dedicated devices).  The simulator reads it through one small
interface, :class:`HostDelays`, that the cost model and the step graphs call; dedicated devices
use :data:`DEDICATED` (no slowdown, no straggler).

API (stable)::

    HostDelays (Protocol)
        .compute_factor(stage | None, *, ranks_on_node, threads_per_rank=1) -> float  (>= 1)
        .comm_factor(ranks_on_node) -> float                                        (>= 1)
        .straggle(group_size) -> float                                              (>= 0)
    DEDICATED: HostDelays   (1, 1, 0: dedicated devices)
    HostModel(*, cores_per_node, contention=0, contention_by_stage={}, straggler=0,
              comm_contention=0)          # a HostDelays
        .stage_contention(stage=None) -> float
    host_from_table(table) -> HostModel   host_to_dict(host) -> dict    (the TOML ``[host]``)
    expected_max_normal(n) -> float   (mean of the largest of n standard normal draws)

Meaning of the fields (the cluster TOML's ``[host]`` table):

* ``cores_per_node`` > 0 when ranks share that many CPU cores (oversubscription slows
  compute by ranks x threads / cores); 0: never oversubscribed.  ``contention`` is the relative
  slowdown each extra rank on a node adds even below that (shared memory bandwidth).  Ranks
  slow each other by different amounts per kind of work (a cache-resident GEMM barely, a
  memory-bound factor statistic a lot), so an optional ``[host.contention_by_stage]`` table
  gives the factor per compute stage kind (keys from
  :data:`kfacperf.sim.models.device.STAGE_KINDS`); a kind it does not name uses ``contention``.
* ``straggler`` (optional, 0 when absent): ranks are not only slower when they share cores but
  uneven, and every collective waits for the slowest member.  ``straggler`` is how much longer
  the slowest of two ranks takes than their mean, relative to the mean, between two
  synchronisations; for a group of ``n`` it grows like the expected maximum of ``n`` normal
  draws (``straggler * E[max of n] / E[max of 2]``, :meth:`HostModel.straggle`).  The engine
  starts each collective that fraction of the compute its members ran since their previous
  collective later: compute-stream busy time between the two launches, not wall time, so
  waiting on a slower network makes no rank later (:mod:`kfacperf.sim.engine`).  On a 2-vCPU
  VM two ranks doing identical work differed by 2.5-5 ms per ~75 ms step.
* ``comm_contention`` (optional, 0 when absent): a collective that ranks sharing cores issue
  between bursts of compute, as training does, takes ``1 + comm_contention`` times what
  ``kfacperf commbench`` times after a barrier (:meth:`HostModel.comm_factor`).  On a 2-vCPU
  VM 1 MiB collectives took 1.09x as long on average (42 probes of one session, 0.74-1.41x
  each), their stalls (gloo's milliseconds-long waits) more frequent, right after a ResNet-20
  forward and backward pass than right after a barrier.  It applies where ranks share cores
  (``cores_per_node`` > 0) and more than one rank is on the node.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from kfacperf.sim.models.device import STAGE_KINDS
from kfacperf.sim.models.toml_io import Table


class HostDelays(Protocol):
    """What the host adds to the simulated step: the one interface the simulator reads."""

    def compute_factor(self, stage: str | None, *, ranks_on_node: int,
                       threads_per_rank: int = 1) -> float:
        """Factor on the time of compute ``stage`` (None: all kinds together) when
        ``ranks_on_node`` ranks of ``threads_per_rank`` threads share a node."""
        ...

    def comm_factor(self, ranks_on_node: int) -> float:
        """Factor on a collective's time when ``ranks_on_node`` ranks share a node."""
        ...

    def straggle(self, group_size: int) -> float:
        """How late, as a fraction of the time since the previous collective, the slowest of
        ``group_size`` ranks reaches a collective."""
        ...


class _Dedicated:
    """Dedicated devices: a rank's work does not depend on its neighbours."""

    def compute_factor(self, stage: str | None, *, ranks_on_node: int,
                       threads_per_rank: int = 1) -> float:
        return 1.0

    def comm_factor(self, ranks_on_node: int) -> float:
        return 1.0

    def straggle(self, group_size: int) -> float:
        return 0.0

    def __repr__(self) -> str:
        return "DEDICATED"


DEDICATED: HostDelays = _Dedicated()
"""The host of dedicated devices (every GPU): no slowdown, no straggler."""


def _check_nonnegative(what: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"host: {what} must be >= 0, got {value}")


@dataclass(frozen=True, kw_only=True)
class HostModel:
    """Ranks sharing ``cores_per_node`` CPU cores: slowdowns and unevenness (see module doc)."""

    cores_per_node: int
    contention: float = 0.0
    contention_by_stage: Mapping[str, float] = field(default_factory=dict)
    straggler: float = 0.0
    comm_contention: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.cores_per_node, bool) or self.cores_per_node < 0:
            raise ValueError(f"host: cores_per_node must be >= 0, got {self.cores_per_node}")
        _check_nonnegative("contention", self.contention)
        _check_nonnegative("straggler", self.straggler)
        _check_nonnegative("comm_contention", self.comm_contention)
        for kind, c in self.contention_by_stage.items():
            if kind not in STAGE_KINDS:
                raise ValueError(f"host: contention_by_stage has unknown stage kind {kind!r}; "
                                 f"kinds: {STAGE_KINDS}")
            _check_nonnegative(f"contention_by_stage.{kind}", c)
        object.__setattr__(self, "contention_by_stage",
                           {k: float(self.contention_by_stage[k]) for k in STAGE_KINDS
                            if k in self.contention_by_stage})

    def stage_contention(self, stage: str | None = None) -> float:
        """The contention of compute ``stage`` (``contention`` where the stage has none)."""
        if stage is None:
            return self.contention
        if stage not in STAGE_KINDS:
            raise ValueError(f"{stage!r} is not a compute stage kind; kinds: {STAGE_KINDS}")
        return self.contention_by_stage.get(stage, self.contention)

    def compute_factor(self, stage: str | None, *, ranks_on_node: int,
                       threads_per_rank: int = 1) -> float:
        r = max(1, ranks_on_node)
        factor = 1.0 + self.stage_contention(stage) * (r - 1)
        if self.cores_per_node > 0:
            factor *= max(1.0, r * max(1, threads_per_rank) / self.cores_per_node)
        return factor

    def comm_factor(self, ranks_on_node: int) -> float:
        """``1 + comm_contention`` where ranks share a node's cores and compute between
        collectives (1 alone, or without cores to share)."""
        if self.cores_per_node <= 0 or ranks_on_node <= 1:
            return 1.0
        return 1.0 + self.comm_contention

    def straggle(self, group_size: int) -> float:
        """0 for one rank or no straggler; else ``straggler * E[max of n] / E[max of 2]``."""
        if self.straggler <= 0 or group_size <= 1:
            return 0.0
        return self.straggler * expected_max_normal(group_size) / expected_max_normal(2)


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
def host_from_table(t: Table) -> HostModel:
    """Read a ``[host]`` table (or a ``kfacperf-cluster-1`` file's ``[compute]``) strictly."""
    cores = t.int("cores_per_node", minimum=0)
    contention = t.float("contention", nonnegative=True)
    by_stage: dict[str, float] = {}
    if t.has("contention_by_stage"):
        bt = t.table("contention_by_stage")
        for key in bt.keys():
            if key not in STAGE_KINDS:
                raise bt.error(key, "unknown stage kind; the stage kinds are: "
                               + ", ".join(STAGE_KINDS))
            by_stage[key] = bt.float(key, nonnegative=True)
        bt.done()
    straggler = t.float("straggler", nonnegative=True) if t.has("straggler") else 0.0
    comm_contention = (t.float("comm_contention", nonnegative=True)
                       if t.has("comm_contention") else 0.0)
    t.done()
    return HostModel(cores_per_node=cores, contention=contention, contention_by_stage=by_stage,
                     straggler=straggler, comm_contention=comm_contention)


def host_to_dict(host: HostModel) -> dict[str, Any]:
    """The ``[host]`` table; optional keys that are 0 (or empty) are left out."""
    out: dict[str, Any] = {"cores_per_node": host.cores_per_node,
                           "contention": float(host.contention)}
    if host.straggler:
        out["straggler"] = float(host.straggler)
    if host.comm_contention:
        out["comm_contention"] = float(host.comm_contention)
    if host.contention_by_stage:  # absent table: every stage uses ``contention``
        out["contention_by_stage"] = dict(host.contention_by_stage)
    return out
