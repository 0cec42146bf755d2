"""Which rank inverts (and, for SP-NGD, preconditions) each K-FAC layer.

The placement is kept apart from the maths: strategies ask an :class:`Assignment` who owns a
layer and which ranks work on its gradient; they never compute loads themselves.

Load balancing is the classic *longest-processing-time-first* greedy (LPT):

1. every layer costs ``dim(A)**3 + dim(G)**3`` — the flops of its two eigendecompositions or
   inverses up to a constant; both factors of a layer stay on one rank.  A Fisher block of
   another form costs ``count * n**3`` summed over the symmetric matrices it inverts
   (``LayerShape.blocks``): a BatchNorm layer's C unit-wise 2x2 blocks ``8 C``, its full
   2C x 2C block ``(2C)**3``;
2. layers are sorted by cost, largest first; ties keep the layer order (forward order);
3. each layer goes to the least-loaded bin; ties go to the lowest rank.

The rule is implemented once, torch-free, in :mod:`kfacperf.sim.graphs.placement`, which the
simulator uses too; this module names the layers and builds the communication groups.  The
result depends only on the layer shapes and the world size, so every rank computes the
same assignment without communicating.  With more ranks than layers the extra ranks own
nothing but still take part in every collective.

KAISA (grad_worker_fraction ``f``) arranges the P ranks as a ``gw x (P/gw)`` grid with
``gw = f*P`` gradient workers per layer, following kfac-pytorch:

* *grad-worker groups* are the columns ``{i, i + P/gw, i + 2P/gw, ...}`` (``P/gw`` of them,
  ``gw`` ranks each): a layer is assigned to one column, which receives its inverses and
  preconditions it; its inverse worker is one rank of that column;
* *receiver groups* are the rows ``{j*P/gw, ..., (j+1)*P/gw - 1}`` (``gw`` of them): every row
  holds exactly one grad worker of each layer, which broadcasts the preconditioned gradient to
  the rest of its row (nothing to send when ``f = 1``).

A layer goes to the least-loaded column (LPT over columns), then to the least-loaded rank of
that column.  ``f = 1`` is COMM-OPT (one column: every rank preconditions every layer),
``f = 1/P`` MEM-OPT (P columns of one rank: the inverse worker alone preconditions and
broadcasts), anything in between HYBRID-OPT.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kfacperf.sim.graphs.placement import (
    blocks_cost,
    grad_workers,
    kaisa_placement,
    layer_cost,
    lpt_bins,
    spngd_placement,
)

inverse_cost = layer_cost
"""Relative cost of inverting one layer's factors: ``dim_a**3 + dim_g**3``."""
grad_workers_count = grad_workers
"""``gw = f * P``, validated: an integer in [1, P] that divides P."""


@dataclass(frozen=True, kw_only=True)
class LayerShape:
    """The factor dimensions of one K-FAC layer (``dim_a`` includes the bias column).

    ``blocks`` lists the ``(n, count)`` stacks of symmetric matrices the layer inverts when
    they are not its two Kronecker factors (empty: ``((dim_a, 1), (dim_g, 1))``).
    """

    name: str
    dim_a: int
    dim_g: int
    blocks: tuple[tuple[int, int], ...] = ()

    @property
    def cost(self) -> int:
        """Its placement cost (see the module docstring)."""
        return blocks_cost(self.blocks) if self.blocks else inverse_cost(self.dim_a, self.dim_g)


def lpt_assign(costs: Sequence[tuple[str, float]], bins: int) -> dict[str, int]:
    """Greedy LPT: ``name -> bin index`` (deterministic; see the module docstring)."""
    names = [n for n, _ in costs]
    if len(set(names)) != len(names):
        raise ValueError("layer names must be unique")
    return dict(zip(names, lpt_bins([c for _, c in costs], bins)))


def grad_worker_groups(world_size: int, gw: int) -> list[tuple[int, ...]]:
    """The ``P/gw`` columns ``{i, i + P/gw, ...}`` of ``gw`` ranks each."""
    cols = world_size // gw
    return [tuple(range(i, world_size, cols)) for i in range(cols)]


def receiver_groups(world_size: int, gw: int) -> list[tuple[int, ...]]:
    """The ``gw`` rows of ``P/gw`` consecutive ranks each."""
    cols = world_size // gw
    return [tuple(range(j * cols, (j + 1) * cols)) for j in range(gw)]


@dataclass(frozen=True, kw_only=True)
class Assignment:
    """Who does what for each layer.

    ``inverse_worker[name]`` computes the layer's inverse (for SP-NGD: owns the layer);
    ``grad_workers[name]`` precondition its gradient (SP-NGD: just the owner).
    """

    world_size: int
    layers: tuple[LayerShape, ...]
    inverse_worker: Mapping[str, int]
    grad_workers: Mapping[str, tuple[int, ...]]

    def owned_by(self, rank: int) -> list[str]:
        """Layers whose inverse ``rank`` computes, in layer order."""
        return [s.name for s in self.layers if self.inverse_worker[s.name] == rank]

    def preconditioned_by(self, rank: int) -> list[str]:
        """Layers whose gradient ``rank`` preconditions, in layer order."""
        return [s.name for s in self.layers if rank in self.grad_workers[s.name]]

    def loads(self) -> list[int]:
        """Summed inverse cost per rank."""
        out = [0] * self.world_size
        for s in self.layers:
            out[self.inverse_worker[s.name]] += s.cost
        return out

    def grad_source(self, name: str, rank: int) -> int:
        """The grad worker of ``name`` whose preconditioned gradient ``rank`` receives."""
        workers = self.grad_workers[name]
        if rank in workers:
            return rank
        gw = len(workers)
        cols = self.world_size // gw
        row = rank // cols
        return next(w for w in workers if w // cols == row)


def _costs(layers: Sequence[LayerShape]) -> list[int]:
    if not layers:
        raise ValueError("no K-FAC layers to assign")
    if len({s.name for s in layers}) != len(layers):
        raise ValueError("layer names must be unique")
    return [s.cost for s in layers]


def spngd_assignment(layers: Sequence[LayerShape], world_size: int) -> Assignment:
    """One owner per layer by LPT over all ranks; the owner also preconditions."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    place = spngd_placement(_costs(layers), world_size)
    owner = {s.name: r for s, r in zip(layers, place.inverse_worker)}
    return Assignment(
        world_size=world_size, layers=tuple(layers), inverse_worker=owner,
        grad_workers={n: (r,) for n, r in owner.items()},
    )


def kaisa_assignment(
    layers: Sequence[LayerShape], world_size: int, grad_worker_fraction: float
) -> Assignment:
    """KAISA placement: LPT over grad-worker columns, then over ranks inside the column."""
    gw = grad_workers(world_size, grad_worker_fraction)
    place = kaisa_placement(_costs(layers), world_size, gw)
    return Assignment(
        world_size=world_size, layers=tuple(layers),
        inverse_worker={s.name: r for s, r in zip(layers, place.inverse_worker)},
        grad_workers={s.name: tuple(place.column_members(c))
                      for s, c in zip(layers, place.column)},
    )
