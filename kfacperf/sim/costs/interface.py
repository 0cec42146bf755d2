"""What the simulator asks of a cost model: one protocol, :class:`StepCosts`.

:class:`kfacperf.sim.costs.model.CostModel` is the implementation built from a workload, a
device and a cluster model; the simulator's tests give tables instead.  Everything the step
graphs and the engine need passes through here: which Fisher blocks there are and how the
Fisher is estimated, the time of each compute stage per layer or for the whole model, its
FLOPs, the factor steps' capture overhead, the host work between stages, each collective's
time, the host's delays, and the model for another GPU count.
"""
from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Protocol

from kfacperf.sim.models.host import HostDelays
from kfacperf.sim.models.workload import LayerModel, WorkloadModel


class StepCosts(Protocol):
    """Stage and collective times of one workload (see the module docstring)."""

    @property
    def options(self) -> Hashable:
        """Models with equal options give equal times (the simulator shares their caches)."""
        ...

    @property
    def bn_blocks(self) -> str:
        """BatchNorm layers as Fisher blocks: ``none``, ``unit`` or ``full``
        (:data:`kfacperf.vocab.BN_BLOCKS`)."""
        ...

    @property
    def fisher(self) -> str:
        """``emp``, or ``mc``: factor steps run the Monte-Carlo backward."""
        ...

    @property
    def host(self) -> HostDelays:
        """The delays of ranks sharing a host (:data:`~kfacperf.sim.models.host.DEDICATED`
        on dedicated devices)."""
        ...

    def compute_us(self, stage: str, layer: LayerModel | None, *, batch: int,
                   workload: WorkloadModel | None = None) -> float:
        """One call of compute ``stage`` on ``layer`` (None: the whole model)."""
        ...

    def flops(self, stage: str, layer: LayerModel | None, *, batch: int,
              workload: WorkloadModel | None = None) -> float:
        """Analytic FLOPs of that call (0 when unknown)."""
        ...

    def capture_scale(self, stage: str) -> float:
        """Forward/backward on a factor step take this times their plain-step time."""
        ...

    def layer_host_us(self, step: str) -> float:
        """Host time per K-FAC layer of the optimizer's ``step`` between stages."""
        ...

    def collective_us(self, op: str, nbytes: float | Sequence[float], *, group_size: int,
                      nodes: int) -> float:
        """Time of collective ``op`` on ``group_size`` ranks over ``nodes`` nodes."""
        ...

    def for_gpus(self, gpus: int) -> StepCosts:
        """This model for a run on ``gpus`` GPUs (ranks filling nodes in order)."""
        ...
