"""The K-FAC state one GPU holds: the one definition that the simulator's summary (its
``factors MiB`` and ``inverses MiB`` columns) and the planner's memory check
(:func:`kfacperf.plan.memory.memory_per_gpu`) both use.  Torch-free.

What the real optimizer keeps (:mod:`kfacperf.kfac.layers`, :mod:`kfacperf.kfac.preconditioner`
and the strategies), every matrix in fp32 and full (``n x n``: packing to triangles happens
only on the wire, and what arrives is unpacked):

* **factors** — on *every* rank, every Fisher block's batch statistics (``a_batch``,
  ``g_batch``: each rank's backward hooks form them for every layer on a factor step, and
  ``step()`` releases them once the running averages have taken them, so they are held from
  that backward to that step only: ``statistics``), plus the running averages
  (``a_factor``, ``g_factor``) of the layers the rank *inverts*: SP-NGD's owner, KAISA's
  inverse worker (``needs_factors`` is ``inverts``); on one GPU, of every layer
  (``running``, kept between steps).  A Kronecker-factored layer's statistics are A and G
  (``dim_a² + dim_g²`` elements), a BatchNorm block's its own stack
  (:func:`kfacperf.sim.costs.blocks.stored_elements`).
* **inverses** — the inverse state of the layers the rank *preconditions* (its grad-worker
  column: SP-NGD's owner; KAISA's ``gw`` column members, who get it by broadcast): ``QA, QG,
  dA, dG`` (eigen) or ``A⁻¹, G⁻¹`` (cholesky)
  (:func:`kfacperf.sim.costs.blocks.inverse_elements`, unpacked).

Ranks differ only by their running averages and inverse state, so the GPU that holds the
most is found among the inverse workers and, per column, one member that inverts nothing;
:func:`kfac_state_per_gpu` reports both terms *of that one GPU* (ties to the lowest rank),
so that their sum is what it holds at a factor step's peak (``persistent`` is what stays
between steps).  Buffers in flight (the statistics as sent, the inverse-state broadcasts) are
not state: the planner counts them as communication buffers (KAISA's global statistics, views
into the all-reduce bucket that carried them, go with the statistics).
``tests/kfac/test_memory_held.py`` weighs the tensors themselves, during a step and after it.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kfacperf import vocab as S
from kfacperf.sim.costs import blocks
from kfacperf.sim.graphs.placement import Placement

if TYPE_CHECKING:  # pragma: no cover
    from kfacperf.sim.graphs.strategies.common import LayerCosts

FP32 = S.DTYPE_BYTES["fp32"]

FisherBlock = tuple[str, int, int]
"""``(form, dim_a, dim_g)`` of one Fisher block (:data:`kfacperf.sim.costs.blocks.FORMS`;
a BatchNorm block has ``dim_a = 2``, ``dim_g = C``)."""


@dataclass(frozen=True, kw_only=True)
class KfacState:
    """Bytes of K-FAC state on the GPU that holds the most (``rank``)."""

    rank: int
    statistics: int
    """Every block's batch statistics: held on a factor step only, from its backward pass
    to the running averages' update."""
    running: int
    """The running averages of the blocks it inverts (kept between steps)."""
    inverses: int
    """The inverse state of the blocks it preconditions (kept between steps)."""

    @property
    def factors(self) -> int:
        """The statistics plus the running averages: both are held on a factor step."""
        return self.statistics + self.running

    @property
    def persistent(self) -> int:
        """What stays allocated between steps: running averages and inverse state."""
        return self.running + self.inverses

    @property
    def total(self) -> int:
        return self.factors + self.inverses


def fisher_blocks_of(costs: LayerCosts) -> list[FisherBlock]:
    """The Fisher blocks of a step graph's layers, in forward order."""
    return [(costs.form(l), costs.dim_a[l], costs.dim_g[l]) for l in range(costs.n)]


def factor_store_bytes(block: FisherBlock) -> int:
    """One copy of a block's statistics as kept (fp32, full matrices)."""
    form, dim_a, dim_g = block
    return FP32 * blocks.stored_elements(form, dim_a, dim_g)


def inverse_store_bytes(block: FisherBlock, inverse_method: str) -> int:
    """A block's inverse state as kept (fp32, full matrices: what arrives packed is
    unpacked)."""
    S.check_choice("inverse method", inverse_method, S.INVERSE_METHODS)
    form, dim_a, dim_g = block
    return FP32 * blocks.inverse_elements(form, dim_a, dim_g, inverse_method, False)


class _Loads:
    """Per-rank K-FAC state of one placement: what every rank keeps, and what depends on the
    layers it inverts (by rank) and preconditions (by column)."""

    def __init__(self, fisher_blocks: Sequence[FisherBlock], placement: Placement,
                 inverse_method: str) -> None:
        n = len(fisher_blocks)
        if len(placement.column) != n or len(placement.inverse_worker) != n:
            raise ValueError(f"a placement of {len(placement.column)} layers for {n} Fisher "
                             "blocks")
        self.placement = placement
        stored = [factor_store_bytes(b) for b in fisher_blocks]
        self.statistics = sum(stored)
        self.running: dict[int, int] = {}
        for l, r in enumerate(placement.inverse_worker):
            self.running[r] = self.running.get(r, 0) + stored[l]
        self.inverse: dict[int, int] = {}
        for l, c in enumerate(placement.column):
            self.inverse[c] = (self.inverse.get(c, 0)
                               + inverse_store_bytes(fisher_blocks[l], inverse_method))

    def of(self, rank: int) -> KfacState:
        return KfacState(rank=rank, statistics=self.statistics,
                         running=self.running.get(rank, 0),
                         inverses=self.inverse.get(rank % self.placement.cols, 0))

    def candidates(self) -> list[int]:
        """Ranks among which one holds the most: every inverse worker, and per column one
        member that inverts nothing (ascending)."""
        out = set(self.running)
        for c in self.inverse:
            spare = next((r for r in self.placement.column_members(c)
                          if r not in self.running), None)
            if spare is not None:
                out.add(spare)
        return sorted(out) or [0]


def kfac_state_of_rank(fisher_blocks: Sequence[FisherBlock], placement: Placement,
                       inverse_method: str, rank: int) -> KfacState:
    """The K-FAC state rank ``rank`` holds under ``placement`` (module docstring)."""
    if not 0 <= rank < placement.world_size:
        raise ValueError(f"rank {rank} is not in a world of {placement.world_size}")
    return _Loads(fisher_blocks, placement, inverse_method).of(rank)


def kfac_state_per_gpu(fisher_blocks: Sequence[FisherBlock], placement: Placement,
                       inverse_method: str) -> KfacState:
    """The K-FAC state of the GPU holding the most under ``placement`` (ties to the lowest
    rank): what memory per GPU must make room for."""
    loads = _Loads(fisher_blocks, placement, inverse_method)
    return max((loads.of(r) for r in loads.candidates()), key=lambda st: st.total)
