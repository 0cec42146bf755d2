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

The result depends only on the layer shapes and the world size, so every rank computes the
same assignment without communicating.  LPT is within 4/3 of the optimal makespan (Graham,
1969).  With more ranks than layers the extra ranks own nothing but still take part in every
collective.

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
        if not self.blocks:
            return inverse_cost(self.dim_a, self.dim_g)
        return blocks_cost(self.blocks)


def inverse_cost(dim_a: int, dim_g: int) -> int:
    """Relative cost of inverting one layer's factors: ``dim_a**3 + dim_g**3``."""
    if dim_a < 1 or dim_g < 1:
        raise ValueError(f"factor dimensions must be >= 1, got dim_a={dim_a}, dim_g={dim_g}")
    return dim_a**3 + dim_g**3


def blocks_cost(blocks: Sequence[tuple[int, int]]) -> int:
    """Relative cost of inverting ``count`` symmetric ``n x n`` matrices per ``(n, count)``."""
    if not blocks or any(n < 1 or count < 1 for n, count in blocks):
        raise ValueError(f"blocks must be (n >= 1, count >= 1) pairs, got {list(blocks)}")
    return sum(count * n**3 for n, count in blocks)


def lpt_assign(
    costs: Sequence[tuple[str, float]], bins: int, *, loads: Sequence[float] | None = None
) -> dict[str, int]:
    """Greedy LPT: ``name -> bin index`` (deterministic; see the module docstring)."""
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    names = [n for n, _ in costs]
    if len(set(names)) != len(names):
        raise ValueError("layer names must be unique")
    load = list(loads) if loads is not None else [0.0] * bins
    if len(load) != bins:
        raise ValueError(f"loads has {len(load)} entries for {bins} bins")
    order = sorted(range(len(costs)), key=lambda i: (-costs[i][1], i))
    out: dict[str, int] = {}
    for i in order:
        name, cost = costs[i]
        b = min(range(bins), key=lambda k: (load[k], k))
        out[name] = b
        load[b] += cost
    return {n: out[n] for n in names}


def grad_workers_count(world_size: int, grad_worker_fraction: float) -> int:
    """``gw = f * P``, validated: an integer in [1, P] that divides P."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    f = grad_worker_fraction
    if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 < f <= 1.0:
        raise ValueError(f"grad_worker_fraction must be in (0, 1], got {f!r}")
    gw = round(f * world_size)
    if gw < 1 or abs(gw - f * world_size) > 1e-6 or world_size % gw:
        raise ValueError(
            f"grad_worker_fraction={f} gives {f * world_size:g} gradient workers per layer "
            f"at world size {world_size}; f * world_size must be an integer that divides "
            f"{world_size} (e.g. 1, 1/2, 1/{world_size})"
        )
    return gw


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


def _costs(layers: Sequence[LayerShape]) -> list[tuple[str, float]]:
    if not layers:
        raise ValueError("no K-FAC layers to assign")
    return [(s.name, float(s.cost)) for s in layers]


def spngd_assignment(layers: Sequence[LayerShape], world_size: int) -> Assignment:
    """One owner per layer by LPT over all ranks; the owner also preconditions."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    owner = lpt_assign(_costs(layers), world_size)
    return Assignment(
        world_size=world_size, layers=tuple(layers), inverse_worker=owner,
        grad_workers={n: (r,) for n, r in owner.items()},
    )


def kaisa_assignment(
    layers: Sequence[LayerShape], world_size: int, grad_worker_fraction: float
) -> Assignment:
    """KAISA placement: LPT over grad-worker columns, then over ranks inside the column."""
    gw = grad_workers_count(world_size, grad_worker_fraction)
    costs = _costs(layers)
    groups = grad_worker_groups(world_size, gw)
    col_of = lpt_assign(costs, len(groups))
    rank_load = [0.0] * world_size
    inverse_worker: dict[str, int] = {}
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i][1], i)):
        name, cost = costs[i]
        members = groups[col_of[name]]
        r = min(members, key=lambda m: (rank_load[m], m))
        inverse_worker[name] = r
        rank_load[r] += cost
    return Assignment(
        world_size=world_size, layers=tuple(layers),
        inverse_worker={s.name: inverse_worker[s.name] for s in layers},
        grad_workers={s.name: groups[col_of[s.name]] for s in layers},
    )
