"""Which rank inverts and preconditions each K-FAC layer: the one implementation of the
placement rule, used by the real optimizer (:mod:`kfacperf.kfac.assignment`, which adds the
layers' names and the communication groups) and by the simulator.  Torch-free.

Every layer costs ``dim_a**3 + dim_g**3`` (a Fisher block of another form, e.g. a BatchNorm
layer's, ``count * n**3`` over the stacks of matrices it inverts: :func:`blocks_cost`); layers
are taken largest cost first (ties in
forward order); each goes to the least-loaded bin (ties to the lowest index): the greedy
*longest-processing-time-first* rule (LPT, within 4/3 of the optimal makespan; Graham,
1969).  KAISA first picks the least-loaded grad-worker *column* ``{i, i + P/gw, ...}``,
then the least-loaded rank of that column.

It takes O(L log L + L log P) instead of O(L * P): bins
that hold nothing yet have load 0, which is below every loaded bin (costs are positive), so the
least-loaded bin is the lowest untouched one while any is left, and otherwise the top of a heap.
That is what lets an assignment over 65,536 ranks take microseconds.
"""
from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass


def layer_cost(dim_a: int, dim_g: int) -> int:
    """The load-balancing cost of one layer's inverse (both factors on one rank):
    ``dim_a**3 + dim_g**3``, the FLOPs of its two decompositions up to a constant."""
    if dim_a < 1 or dim_g < 1:
        raise ValueError(f"factor dimensions must be >= 1, got dim_a={dim_a}, dim_g={dim_g}")
    return dim_a**3 + dim_g**3


def blocks_cost(blocks: Sequence[tuple[int, int]]) -> int:
    """The load-balancing cost of inverting ``count`` symmetric ``n x n`` matrices per
    ``(n, count)``: ``sum(count * n**3)`` (a Kronecker-factored layer's is
    :func:`layer_cost`, the blocks ``(dim_a, 1), (dim_g, 1)``)."""
    if not blocks or any(n < 1 or count < 1 for n, count in blocks):
        raise ValueError(f"blocks must be (n >= 1, count >= 1) pairs, got {list(blocks)}")
    return sum(count * n**3 for n, count in blocks)


def lpt_order(costs: Sequence[float]) -> list[int]:
    """Layer indices, largest cost first, ties in forward order."""
    return sorted(range(len(costs)), key=lambda i: (-costs[i], i))


class _LeastLoaded:
    """The least-loaded of ``count`` bins (ties to the lowest index) under repeated loading."""

    __slots__ = ("count", "fresh", "heap")

    def __init__(self, count: int) -> None:
        self.count = count
        self.fresh = 0
        self.heap: list[tuple[float, int]] = []

    def add(self, cost: float) -> int:
        """Put ``cost`` on the least-loaded bin; return the bin's index."""
        if self.fresh < self.count:
            b = self.fresh
            self.fresh += 1
            heapq.heappush(self.heap, (cost, b))
            return b
        load, b = heapq.heappop(self.heap)
        heapq.heappush(self.heap, (load + cost, b))
        return b


def lpt_bins(costs: Sequence[float], bins: int) -> list[int]:
    """Greedy LPT: the bin index of each item (``costs`` must be > 0)."""
    if bins < 1:
        raise ValueError(f"number of bins must be >= 1, got {bins}")
    if any(not c > 0 for c in costs):
        raise ValueError("LPT costs must be > 0")
    chooser = _LeastLoaded(bins)
    out = [0] * len(costs)
    for i in lpt_order(costs):
        out[i] = chooser.add(costs[i])
    return out


def grad_workers(world_size: int, fraction: float) -> int:
    """``gw = f * P`` gradient workers per layer: an integer in [1, P] that divides P."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world size (number of ranks) must be >= 1, got {world_size!r}")
    if (isinstance(fraction, bool) or not isinstance(fraction, (int, float))
            or not 0.0 < fraction <= 1.0):
        raise ValueError(f"kaisa grad_worker_fraction must be in (0, 1], got {fraction!r}")
    gw = round(fraction * world_size)
    if gw < 1 or abs(gw - fraction * world_size) > 1e-6 or world_size % gw:
        valid = [f"{d}/{world_size}" if d < world_size else "1"
                 for d in range(1, world_size + 1) if world_size % d == 0]
        shown = ", ".join(valid[:4] + (["...", valid[-1]] if len(valid) > 5 else valid[4:]))
        raise ValueError(
            f"kaisa grad_worker_fraction={fraction:g} gives {fraction * world_size:g} gradient "
            f"workers per layer at {world_size} ranks; f * ranks must be an integer dividing "
            f"{world_size} (valid there: f = {shown}; kaisa:mem-opt means 1/P at every P)"
        )
    return gw


@dataclass(frozen=True, kw_only=True)
class Placement:
    """Layer placement on a ``gw x cols`` grid of ``world_size`` ranks.

    Rank ``r`` sits in column ``r % cols`` and row ``r // cols``.  ``column[l]`` is the column
    of grad workers of layer ``l`` (its ``gw`` members precondition it), ``inverse_worker[l]``
    the rank of that column that inverts it.  SP-NGD is the case ``gw = 1``, ``cols = P``: the
    single grad worker is the owner.
    """

    world_size: int
    gw: int
    column: tuple[int, ...]
    inverse_worker: tuple[int, ...]

    @property
    def cols(self) -> int:
        return self.world_size // self.gw

    def column_members(self, col: int) -> range:
        return range(col, self.world_size, self.cols)


def kaisa_placement(costs: Sequence[float], world_size: int, gw: int) -> Placement:
    """LPT over the ``P/gw`` columns, then over the ranks inside the chosen column."""
    if world_size % gw:
        raise ValueError(f"{gw} grad workers do not divide {world_size} GPUs")
    cols = world_size // gw
    column = lpt_bins(costs, cols)
    inside: dict[int, _LeastLoaded] = {}
    worker = [0] * len(costs)
    for i in lpt_order(costs):
        c = column[i]
        chooser = inside.get(c)
        if chooser is None:
            chooser = inside[c] = _LeastLoaded(gw)
        worker[i] = c + chooser.add(costs[i]) * cols
    return Placement(
        world_size=world_size, gw=gw, column=tuple(column), inverse_worker=tuple(worker)
    )


def spngd_placement(costs: Sequence[float], world_size: int) -> Placement:
    """One owner per layer by LPT over all ranks; the owner also preconditions."""
    owner = lpt_bins(costs, world_size)
    return Placement(
        world_size=world_size, gw=1, column=tuple(owner), inverse_worker=tuple(owner)
    )


def contiguous_placement(names: Sequence[str], world_size: int) -> Placement:
    """Owners of layers sorted by name, in ``world_size`` contiguous runs (array_split)."""
    if world_size < 1:
        raise ValueError(f"number of GPUs must be >= 1, got {world_size}")
    order = sorted(range(len(names)), key=lambda i: names[i])
    base, extra = divmod(len(names), world_size)
    owner = [0] * len(names)
    pos = 0
    for rank in range(min(world_size, len(names))):
        take = base + (1 if rank < extra else 0)
        for i in order[pos:pos + take]:
            owner[i] = rank
        pos += take
    return Placement(world_size=world_size, gw=1, column=tuple(owner),
                     inverse_worker=tuple(owner))


def nodes_spanned(first: int, count: int, stride: int, gpus_per_node: int) -> int:
    """Distinct nodes of the ranks ``first + k * stride`` (k < count), ranks packed by node."""
    if count <= 0:
        return 0
    g = gpus_per_node
    if stride == 1:
        return (first + count - 1) // g - first // g + 1
    if stride % g == 0:
        return count
    if g % stride == 0:
        # every stride-th rank inside consecutive nodes: contiguous span of nodes
        return (first + (count - 1) * stride) // g - first // g + 1
    return len({(first + k * stride) // g for k in range(count)})
